"""`BatchScheduler`: continuous batching of generation requests on one background thread that owns a `Sampler`.

Requests (`GenerationRequest`: prompt token ids, ``max_tokens``, `SamplingParams`, stop strings, a PRNG key,
``want_logprobs``, a cancel flag and a ``sink`` that receives `Delta`s) come in through a thread-safe queue
(`BatchScheduler.submit`). The thread loops over *chunk boundaries*:

1. cancelled requests (a client that went away) leave their slots; waiting requests are admitted into the free
   slots in arrival order (one batched `Sampler.start`, prefilling their prompts), so a new request joins the
   batch that is already running;
2. the active slots are grouped by their SamplingParams and each group is decoded for at most ``decode_chunk``
   tokens with ``Sampler.decode(group_mask, max_new, sampling=group_params)`` (one compiled decode program per
   distinct SamplingParams);
3. each slot's new tokens go through its `GeneratedText` (incremental detokenization, stop strings, hold-back)
   and a `Delta` (new text, token ids, their log-probs) goes to its sink; a finished request frees its slot.

Finish reasons: EOS -> ``"stop"``, a stop string -> ``"stop"`` (text cut before it, later tokens dropped),
``max_tokens`` reached or a full cache row -> ``"length"``.

Randomness: the sampler draws the token at sequence index p of a slot with fold_in(slot key, p), so a request's
tokens depend only on its key, prompt and settings, never on the other requests in the batch.
`BatchScheduler.request_keys` gives the keys of a request's ``n`` choices: choice i uses fold_in(base, i), the
base being the seed's key (`seed_key`, = ``jax.random.PRNGKey(seed)`` for 0 <= seed < 2**32) or, without a seed,
the server key folded with a request counter.

An exception in the loop fails the requests in the slots (and those being admitted) with a 500 message, prints
the traceback to stderr, replaces the sampler by a fresh one and goes on serving.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Sequence

import jax
import numpy as np

from appo_jax.rollout.sampler import CHUNK_EOS, CHUNK_LENGTH, Sampler
from appo_jax.rollout.sampling import SamplingParams
from appo_jax.rollout.slots import rollout_cache_len
from appo_jax.serving.generated_text import GeneratedText


@dataclasses.dataclass
class Delta:
    """What a request's sink receives after a chunk: the new ``text``, the new ``token_ids`` with their
    ``logprobs`` (log softmax(logits / T) of each chosen token, T = 1 for greedy), the running
    ``completion_tokens``; the last delta has ``finish_reason`` ("stop" / "length"), or ``error`` with
    ``error_status`` (the request failed; nothing follows)."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 500

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclasses.dataclass(eq=False)
class GenerationRequest:
    """One generation (one choice of an HTTP request): non-empty ``prompt_ids``, ``max_tokens`` >= 1,
    ``sampling``, ``key`` (uint32 [2] PRNG key data), ``sink`` (called on the scheduler thread with each
    `Delta`; it must not block), ``stop`` strings, ``want_logprobs`` (log-probs are always delivered; the flag
    is for the consumer)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    key: np.ndarray
    sink: Callable[[Delta], None]
    stop: tuple[str, ...] = ()
    want_logprobs: bool = False
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (its slot is freed at the next chunk boundary)."""
        self.cancelled.set()


@dataclasses.dataclass(eq=False)
class _Running:
    """A request in a slot: its generated text, log-probs, and how many tokens were delivered."""

    request: GenerationRequest
    text: GeneratedText
    logprobs: list[float] = dataclasses.field(default_factory=list)
    delivered: int = 0


def seed_key(seed: int) -> np.ndarray:
    """uint32 [2] key data of an integer seed in [-2**63, 2**63): (high, low) 32-bit words of the seed as a
    64-bit two's-complement integer, i.e. ``jax.random.PRNGKey(seed)`` with 64-bit integers (and for
    0 <= seed < 2**32 also without them)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < (1 << 63):
        raise ValueError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    value = seed % (1 << 64)
    return np.array([value >> 32, value & 0xFFFFFFFF], np.uint32)


class BatchScheduler:
    """Continuous batching over one `Sampler` of ``num_slots`` rows (module doc).

    ``context_len``: the most prompt + generated tokens of one request (each cache row fits it, prefill padding
    included); ``seed``: the server key of requests without a seed; ``decode_chunk``: tokens per slot between
    two chunk boundaries (admission, cancellation and streaming happen there); ``prefill_chunk``: tokens per
    prefill piece. ``detokenize`` (ids -> text, without special tokens) is only called on the scheduler thread.
    """

    def __init__(self, config, params, detokenize: Callable[[list[int]], str], *, num_slots: int,
                 context_len: int, seed: int = 0, decode_chunk: int = 8, prefill_chunk: int = 128):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if context_len < 2:
            raise ValueError(f"the context must hold at least 2 tokens (a prompt token and a generated one), got "
                             f"{context_len}")
        self.config = config
        self.params = params
        self.detokenize = detokenize
        self.num_slots = int(num_slots)
        self.context_len = int(context_len)
        self.decode_chunk = int(decode_chunk)
        self.prefill_chunk = int(prefill_chunk)
        self.cache_len = rollout_cache_len(self.context_len, 0, 0, self.prefill_chunk)
        self.sampler = self._new_sampler()
        self._server_key = seed_key(seed)
        self._counter = itertools.count()
        self._counter_lock = threading.Lock()
        self._inbox: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._slots: list[_Running | None] = [None] * self.num_slots
        self._admitting: list[GenerationRequest] = []  # taken from the queue, not in a slot yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0     # exceptions caught in the loop (each failed the requests in the slots)
        self.cancelled = 0  # requests dropped unfinished because they were cancelled (client gone)

    def _new_sampler(self) -> Sampler:
        return Sampler(self.config, self.params, num_slots=self.num_slots, max_len=self.cache_len,
                       stop_strings=(), decode_chunk=self.decode_chunk, prefill_chunk=self.prefill_chunk)

    # ------------------------------------------------------------------------------------------ public API
    def start(self) -> None:
        """Start the scheduler thread (once)."""
        if self._thread is not None:
            raise RuntimeError("BatchScheduler.start: already started")
        self._thread = threading.Thread(target=self._loop, name="appo-jax-serve-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still waiting or running get a 503 error delta."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail([r for r in self._drain_inbox()] + list(self._waiting)
                   + [r.request for r in self._slots if r is not None], "the server is shutting down", 503)
        self._waiting.clear()
        self._slots = [None] * self.num_slots

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; it is admitted at the next chunk boundary with a free slot."""
        if self._stop.is_set():
            raise RuntimeError("the scheduler is stopped")
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the scheduler thread is not running")
        self._inbox.put(request)

    def request_keys(self, seed: int | None, n: int) -> list[np.ndarray]:
        """uint32 [2] keys of the ``n`` choices of one request (module doc: choice i uses fold_in(base, i))."""
        if seed is None:
            with self._counter_lock:
                count = next(self._counter)
            base = jax.random.fold_in(self._server_key, count)
        else:
            base = seed_key(seed)
        return [np.asarray(jax.random.fold_in(base, i), np.uint32) for i in range(n)]

    def status(self) -> dict:
        """``slots``, ``busy_slots``, ``waiting`` (queued, not admitted yet), ``errors``, ``cancelled`` and
        ``running`` (whether the thread is alive)."""
        return {"slots": self.num_slots, "busy_slots": sum(r is not None for r in list(self._slots)),
                "waiting": len(self._waiting) + self._inbox.qsize(), "errors": self.errors,
                "cancelled": self.cancelled, "running": self._thread is not None and self._thread.is_alive()}

    # ------------------------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._collect(block=not any(self._slots) and not self._waiting)
                self._drop_cancelled()
                self._admit()
                self._decode_groups()
            except Exception as err:  # noqa: BLE001 -- keep serving: fail the affected requests instead
                self._recover(err)

    def _recover(self, err: Exception) -> None:
        """Fail every request in a slot (and the ones being admitted) and start over with a fresh sampler: after
        a failed jitted call the cache may hold donated (deleted) buffers."""
        self.errors += 1
        print(f"appo-jax serve: error in the generation loop, failing the running requests: {err!r}",
              file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        running = [r.request for r in self._slots if r is not None]
        self._fail(running + self._admitting, f"internal error while generating: {type(err).__name__}: {err}", 500)
        self._slots = [None] * self.num_slots
        self._admitting = []
        try:
            self.sampler = self._new_sampler()
        except Exception:  # noqa: BLE001 -- reported; the next iteration tries again
            traceback.print_exc(file=sys.stderr)

    def _drain_inbox(self) -> list[GenerationRequest]:
        out = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return out
            if item is not None:
                out.append(item)

    def _collect(self, block: bool) -> None:
        """Move queued requests to the waiting list (waiting up to 0.2 s for one when ``block``)."""
        if block:
            try:
                item = self._inbox.get(timeout=0.2)
            except queue.Empty:
                return
            if item is not None:
                self._waiting.append(item)
        self._waiting.extend(self._drain_inbox())

    def _drop_cancelled(self) -> None:
        for s, running in enumerate(self._slots):
            if running is not None and running.request.cancelled.is_set():
                self._slots[s] = None
                self.cancelled += 1
        kept = collections.deque(r for r in self._waiting if not r.cancelled.is_set())
        self.cancelled += len(self._waiting) - len(kept)
        self._waiting = kept

    def _admit(self) -> None:
        """Start waiting requests in the free slots (one batched prefill)."""
        free = [s for s, r in enumerate(self._slots) if r is None]
        admitted = self._admitting
        while free[len(admitted):] and self._waiting:
            request = self._waiting.popleft()
            problem = self._check(request)
            if problem:
                self._fail([request], problem, 400)
            else:
                admitted.append(request)
        if not admitted:
            return
        slots = free[:len(admitted)]
        self.sampler.start(slots, [r.prompt_ids for r in admitted], [r.key for r in admitted])
        for s, request in zip(slots, admitted):
            self._slots[s] = _Running(request, GeneratedText(self.detokenize, request.stop))
        self._admitting = []

    def _check(self, request: GenerationRequest) -> str:
        """Why ``request`` cannot run ('' if it can): the HTTP layer refuses these before they get here."""
        if not request.prompt_ids:
            return "the prompt is empty (it needs at least one token)"
        if request.max_tokens < 1:
            return f"max_tokens must be >= 1, got {request.max_tokens}"
        if len(request.prompt_ids) + request.max_tokens > self.context_len:
            return (f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                    f"the context of {self.context_len} tokens")
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= self.config.vocab_size:
            return f"prompt token ids must be in [0, {self.config.vocab_size})"
        return ""

    def _decode_groups(self) -> None:
        """One chunk for every active slot, one `Sampler.decode` per distinct SamplingParams."""
        groups: dict[SamplingParams, list[int]] = {}
        for s, running in enumerate(self._slots):
            if running is not None:
                groups.setdefault(running.request.sampling, []).append(s)
        for sampling, slots in groups.items():
            active = np.zeros(self.num_slots, bool)
            active[slots] = True
            max_new = np.zeros(self.num_slots, np.int64)
            for s in slots:
                running = self._slots[s]
                max_new[s] = min(self.decode_chunk, running.request.max_tokens - len(running.text.ids))
            out = self.sampler.decode(active, max_new, sampling=sampling)
            for s in slots:
                k = int(out.num_new[s])
                self._advance(s, out.tokens[s, :k].tolist(), out.logprobs[s, :k].tolist(), int(out.finish[s]))

    def _advance(self, slot: int, tokens: list[int], logprobs: list[float], code: int) -> None:
        """Feed a slot's new tokens to its text, deliver the delta, free the slot when the request finished."""
        running = self._slots[slot]
        request, text = running.request, running.text
        kept = text.extend(tokens)
        running.logprobs.extend(logprobs if kept is None else logprobs[:kept])
        if kept is not None or code == CHUNK_EOS:
            finish = "stop"
        elif len(text.ids) >= request.max_tokens or code == CHUNK_LENGTH or self.sampler.free_cache_slots(slot) < 1:
            finish = "length"
        else:
            finish = None
        delta = Delta(text.take(final=finish is not None), text.ids[running.delivered:],
                      running.logprobs[running.delivered:], len(text.ids), finish)
        running.delivered = len(text.ids)
        if finish is not None:
            self._slots[slot] = None
        if not self._deliver(request, delta) and finish is None:
            self._slots[slot] = None
            self.cancelled += 1

    @staticmethod
    def _deliver(request: GenerationRequest, delta: Delta) -> bool:
        """Call the request's sink; a sink that raises (its consumer is gone) cancels the request."""
        try:
            request.sink(delta)
            return True
        except Exception:  # noqa: BLE001 -- e.g. the event loop of a closed connection
            request.cancel()
            return False

    def _fail(self, requests: Sequence[GenerationRequest], message: str, status: int) -> None:
        for request in requests:
            self._deliver(request, Delta(error=message, error_status=status))
