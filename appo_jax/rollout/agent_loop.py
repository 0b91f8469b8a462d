"""The multi-turn tool loop (docs/protocol.md) over the slots of a :class:`~appo_jax.rollout.policy.SlotPolicy`.

Protocol of one rollout: the policy generates until ``</python>``, ``</search>``, ``</answer>`` or EOS. At a
tool stop the loop parses the *last* ``<python>…</python>`` / ``<search>…</search>`` of the new segment (the
text generated since the previous tool result), submits it to the tool pool and leaves the slot idle while the
other slots keep decoding; when the future resolves, ``<result>\\n{output}\\n</result>`` is tokenized and appended
to the slot as observation tokens (``obs_mask = 1``, ``gen_mask = 0``, log-prob 0, entropy 0) and generation
resumes. A rollout ends with

* ``FINISH_ANSWER`` at ``</answer>``, ``FINISH_EOS`` at an EOS token (kept as the last generated token),
* ``FINISH_TOOL_LIMIT`` when it makes call number ``tool_call_limit + 1`` (a format failure; the call is not run),
* ``FINISH_LENGTH`` when the response (generated + observation tokens) reaches ``max_response_len``: a tool
  result that would overflow is truncated to the remaining room, and a tool call made with no room left is not
  run.

Slot-level batching: a finished slot is refilled at once from the queue of pending rollout requests; requests
may start from a response prefix (branches), and hooks may enqueue new requests while the loop runs (ARPO).
A prefix may end anywhere: inside an unfinished call generation just continues; right after a completed call the
call is run first; inside a stop string (e.g. ``</python``) the loop detects the stop that straddles the prefix
end (the policy only searches text generated since the slot's start), drops what followed it and re-syncs the
slot.
Rewards are computed off the decode thread (``submit_reward``) as soon as a rollout finishes.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from appo_jax.core.trajectory import FINISH_ANSWER, FINISH_EOS, FINISH_LENGTH, FINISH_TOOL_LIMIT
from appo_jax.rollout.policy import CHUNK_EOS, CHUNK_LENGTH, CHUNK_RUNNING, CHUNK_STOP, SlotPolicy
from appo_jax.tools.result import format_observation

TOOL_TAGS = {"python": ("<python>", "</python>"), "search": ("<search>", "</search>")}
ANSWER_CLOSE = "</answer>"
STOP_STRINGS = ("</python>", "</search>", "</answer>")
# Tokens after a prefix within which a stop string that straddles the prefix end must complete (each token
# decodes to >= 1 character, with slack for byte tokens).
_STOP_SPAN = 2 * max(len(s) for s in STOP_STRINGS) + 8


def find_stop(text: str) -> tuple[int, str] | None:
    """``(index, stop)`` of the stop string that completes first in ``text``, or None."""
    best = None
    for stop in STOP_STRINGS:
        i = text.find(stop)
        if i >= 0 and (best is None or i + len(stop) < best[0] + len(best[1])):
            best = (i, stop)
    return best


def parse_segment_end(text: str) -> tuple[str, str | None] | None:
    """Classify a segment that ends with a stop string and extract its tool call.

    The stop is the stop string that completes first in ``text``. Returns ``("answer", None)`` for
    ``</answer>``; ``(name, input)`` for a tool close tag, where ``input`` is the stripped text between the last
    opening tag before the close tag and the close tag, or ``None`` when there is no opening tag; ``None`` when
    ``text`` contains no stop string.
    """
    best = find_stop(text)
    if best is None:
        return None
    i, stop = best
    if stop == ANSWER_CLOSE:
        return ("answer", None)
    name = next(n for n, (_, close) in TOOL_TAGS.items() if close == stop)
    j = text.rfind(TOOL_TAGS[name][0], 0, i)
    return (name, None if j < 0 else text[j + len(TOOL_TAGS[name][0]):i].strip())


@dataclass
class ToolCall:
    """One tool call of a rollout: tool ``name``, its ``input`` text and the tool's ``output`` text (before
    truncation to the length budget)."""

    name: str
    input: str
    output: str = ""


@dataclass
class Prefix:
    """A response prefix to continue from (1-D arrays of one length): tokens, masks, recorded log-probs and
    entropies, and the tool calls whose results lie inside the prefix."""

    tokens: np.ndarray
    gen_mask: np.ndarray
    obs_mask: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class RolloutRequest:
    """One rollout to run: ``prompt_ids`` (non-empty), a PRNG ``key`` for its sampling stream, an optional
    response ``prefix`` to continue from, and caller data (``tag``, ``meta``) carried to the result."""

    prompt_ids: Sequence[int]
    key: Any
    prefix: Prefix | None = None
    tag: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class Rollout:
    """A finished rollout: the response arrays (length ``len(tokens) <= max_response_len``), tool calls, finish
    reason (``FINISH_*`` of :mod:`appo_jax.core.trajectory`), decoded text and reward; ``index`` is the order in
    which its request entered the loop."""

    index: int
    request: RolloutRequest
    tokens: np.ndarray
    gen_mask: np.ndarray
    obs_mask: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    tool_calls: list[ToolCall]
    finish_reason: int
    text: str
    reward: float = 0.0

    def prefix(self, end: int) -> Prefix:
        """The response prefix ``[:end]`` with the tool calls whose observation starts before ``end``."""
        starts = np.flatnonzero(self.obs_mask[:end] & ~np.concatenate([[False], self.obs_mask[:end - 1]]))
        return Prefix(self.tokens[:end].copy(), self.gen_mask[:end].copy(), self.obs_mask[:end].copy(),
                      self.logprobs[:end].copy(), self.entropies[:end].copy(),
                      [ToolCall(c.name, c.input, c.output) for c in self.tool_calls[:len(starts)]])


class LoopHooks(Protocol):
    """Callbacks through which a branching scheme (ARPO, AEPO) adds rollouts while the loop runs."""

    def on_probe(self, request: RolloutRequest, prefix: Prefix, mean_entropy: float, first: bool
                 ) -> Iterable[RolloutRequest]:
        """Called once per probed segment when its first ``probe_len`` generated tokens exist (or it ended
        sooner): ``first`` for the first segment of a request without prefix, else for a segment right after a
        tool result appended in this run; ``prefix`` is the response up to the segment's start and
        ``mean_entropy`` the mean entropy of the probed tokens (nats). Returns requests to enqueue."""

    def on_finish(self, rollout: Rollout) -> Iterable[RolloutRequest]:
        """Called when a rollout finishes; returns requests to enqueue."""


@dataclass
class LoopConfig:
    """``max_response_len``: response budget L (generated + observation tokens); ``tool_call_limit``: calls
    allowed per rollout; ``decode_chunk``: steps per ``decode`` call; ``probe_len``: tokens of a segment probed
    for hooks (ARPO: 20)."""

    max_response_len: int
    tool_call_limit: int
    decode_chunk: int = 16
    probe_len: int = 20

    def __post_init__(self):
        if self.max_response_len < 1:
            raise ValueError(f"max_response_len must be >= 1, got {self.max_response_len}")
        if self.tool_call_limit < 0:
            raise ValueError(f"tool_call_limit must be >= 0, got {self.tool_call_limit}")
        if self.decode_chunk < 1:
            raise ValueError(f"decode_chunk must be >= 1, got {self.decode_chunk}")


@dataclass
class LoopStats:
    """Host-side accounting of one :meth:`AgentLoop.run`: wall time, time inside ``policy.decode`` and inside
    ``start`` + ``append`` (``prefill_s``; JAX dispatches prefill asynchronously, so most of its device time
    shows up in ``decode_s``), time the loop sat idle waiting for tool futures because no slot could decode
    (``tool_wait_s``), time spent collecting rewards after the last rollout (``reward_wait_s``), counts."""

    wall_s: float = 0.0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    tool_wait_s: float = 0.0
    reward_wait_s: float = 0.0
    decode_calls: int = 0
    generated_tokens: int = 0
    observation_tokens: int = 0
    tool_calls: int = 0
    rollouts: int = 0


_DECODING, _TOOL = 0, 1


class _Slot:
    """Mutable state of the rollout occupying one slot."""

    def __init__(self, index: int, request: RolloutRequest, length: int, pad_id: int):
        self.index, self.request = index, request
        self.tokens = np.full(length, pad_id, np.int32)
        self.gen = np.zeros(length, bool)
        self.obs = np.zeros(length, bool)
        self.logp = np.zeros(length, np.float32)
        self.ent = np.zeros(length, np.float32)
        self.n = 0
        p = request.prefix
        if p is not None and len(p):
            if len(p) > length:
                raise ValueError(f"prefix of length {len(p)} exceeds max_response_len {length}")
            k = len(p)
            self.tokens[:k], self.gen[:k], self.obs[:k] = p.tokens, p.gen_mask, p.obs_mask
            self.logp[:k], self.ent[:k] = p.logprobs, p.entropies
            self.n = k
        self.tool_calls = [ToolCall(c.name, c.input, c.output) for c in (p.tool_calls if p else [])]
        obs_idx = np.flatnonzero(self.obs[:self.n])
        self.seg_start = int(obs_idx[-1]) + 1 if obs_idx.size else 0
        self.state = _DECODING
        self.future: Future | None = None
        # probing (hooks): start of the probed segment, or -1 when no probe is pending
        self.probe_start = 0 if (p is None or not len(p)) else -1
        self.probe_first = self.probe_start == 0
        # a prefix ending inside a generated segment: a stop string may straddle its end (see `_stop_across`)
        self.boundary = self.n if self.n > self.seg_start else -1

    def prefix(self, end: int) -> Prefix:
        return Prefix(self.tokens[:end].copy(), self.gen[:end].copy(), self.obs[:end].copy(),
                      self.logp[:end].copy(), self.ent[:end].copy(),
                      [ToolCall(c.name, c.input, c.output) for c in self.tool_calls])


class AgentLoop:
    """Runs rollout requests through the tool loop on the slots of ``policy`` (see the module doc).

    ``submit_tool(name, input) -> Future`` runs a tool off the decode thread (the tool registry's bounded
    pool) and resolves to its output text (a ``str``, or a ``ToolResult`` whose ``.text`` is used);
    ``submit_reward(rollout) -> Future[float]`` computes a finished rollout's reward off the decode thread
    (``None``: rewards stay 0). ``on_event(event, **info)``, if given, is called for "start", "decode",
    "tool_submit", "tool_result" and "finish" (tests read the event order)."""

    def __init__(self, policy: SlotPolicy, tokenizer, cfg: LoopConfig,
                 submit_tool: Callable[[str, str], Future],
                 submit_reward: Callable[[Rollout], Future] | None = None,
                 on_event: Callable[..., None] | None = None, pad_id: int = 0):
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg
        self.submit_tool, self.submit_reward, self.on_event = submit_tool, submit_reward, on_event
        self.pad_id = pad_id
        self.stats = LoopStats()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _event(self, event: str, **info) -> None:
        if self.on_event is not None:
            self.on_event(event, **info)

    def _decode_text(self, tokens: np.ndarray, skip_special: bool = False) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=skip_special)

    def _stop_across(self, st: _Slot) -> int | None:
        """Smallest ``j`` in ``(boundary, boundary + _STOP_SPAN]`` such that the segment text up to token ``j``
        has a stop string that begins inside the prefix part (which alone holds no complete stop), or None.
        Stops wholly inside the new text are the policy's to report."""
        end = min(st.n, st.boundary + _STOP_SPAN)
        head = len(self._decode_text(st.tokens[st.seg_start:st.boundary]))

        def straddles(j: int) -> bool:
            found = find_stop(self._decode_text(st.tokens[st.seg_start:j]))
            return found is not None and found[0] < head

        if end <= st.boundary or not straddles(end):
            return None
        return next(j for j in range(st.boundary + 1, end + 1) if straddles(j))

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, requests: Iterable[RolloutRequest], hooks: LoopHooks | None = None,
            progress: Callable[[int, int, int], None] | None = None) -> list[Rollout]:
        """Run every request (and every request the hooks add) to completion; returns the rollouts ordered by
        ``Rollout.index`` (enqueue order). Rewards are filled before returning. ``self.stats`` describes the run.
        ``progress(finished, added, tokens)`` (e.g. `appo_jax.progress.RolloutProgress`) is called after every
        decode chunk with the rollouts finished, requests added and tokens generated since its last call.
        """
        cfg, policy = self.cfg, self.policy
        length = cfg.max_response_len
        self.stats = stats = LoopStats()
        t_start = time.perf_counter()
        queue: deque[tuple[int, RolloutRequest]] = deque()
        counter = [0]

        def enqueue(reqs: Iterable[RolloutRequest]) -> None:
            for r in reqs:
                if not len(r.prompt_ids):
                    raise ValueError("a rollout request has an empty prompt")
                queue.append((counter[0], r))
                counter[0] += 1

        enqueue(requests)
        reported = (0, 0, 0)  # (finished, enqueued, generated tokens) at the last progress call
        slots: list[_Slot | None] = [None] * policy.num_slots
        done: list[Rollout] = []
        reward_futures: list[tuple[Rollout, Future]] = []
        starts: list[tuple[int, _Slot, list[int]]] = []
        appends: list[tuple[int, list[int]]] = []

        def finish(s: int, reason: int) -> None:
            st = slots[s]
            n = st.n
            ro = Rollout(st.index, st.request, st.tokens[:n].copy(), st.gen[:n].copy(), st.obs[:n].copy(),
                         st.logp[:n].copy(), st.ent[:n].copy(), st.tool_calls, reason,
                         self._decode_text(st.tokens[:n], skip_special=True))
            slots[s] = None
            done.append(ro)
            stats.rollouts += 1
            self._event("finish", slot=s, index=st.index, reason=reason)
            if self.submit_reward is not None:
                reward_futures.append((ro, self.submit_reward(ro)))
            if hooks is not None:
                enqueue(hooks.on_finish(ro))

        def maybe_probe(s: int, force: bool) -> None:
            st = slots[s]
            if hooks is None or st.probe_start < 0:
                return
            stop = min(st.n, st.probe_start + cfg.probe_len)
            if stop - st.probe_start < cfg.probe_len and not force:
                return
            sel = st.gen[st.probe_start:stop]
            ent = st.ent[st.probe_start:stop][sel]
            mean = float(ent.mean()) if ent.size else 0.0
            first, start = st.probe_first, st.probe_start
            st.probe_start, st.probe_first = -1, False
            enqueue(hooks.on_probe(st.request, st.prefix(start), mean, first))

        def segment_end(s: int) -> None:
            """The slot's segment completed a stop string: finish, or submit its tool call."""
            st = slots[s]
            parsed = parse_segment_end(self._decode_text(st.tokens[st.seg_start:st.n]))
            if parsed is None:
                return  # no stop string in the decoded text after all: keep generating
            name, arg = parsed
            if name == "answer":
                return finish(s, FINISH_ANSWER)
            if len(st.tool_calls) >= cfg.tool_call_limit:
                return finish(s, FINISH_TOOL_LIMIT)
            if st.n >= length:
                return finish(s, FINISH_LENGTH)
            call = ToolCall(name, arg if arg is not None else "")
            st.tool_calls.append(call)
            stats.tool_calls += 1
            if arg is None:
                fut: Future = Future()
                fut.set_result(f"Error: {TOOL_TAGS[name][1]} without a matching {TOOL_TAGS[name][0]}")
            else:
                fut = self.submit_tool(name, arg)
            st.state, st.future = _TOOL, fut
            self._event("tool_submit", slot=s, index=st.index, tool=name)

        def tool_done(s: int) -> None:
            st = slots[s]
            try:
                res = st.future.result()
                output = res.text if hasattr(res, "text") else str(res)
            except Exception as e:  # a tool must never take the loop down: the error becomes the result
                output = f"Error: {type(e).__name__}: {e}"
            st.tool_calls[-1].output = output
            st.future = None
            ids = list(self.tokenizer.encode(format_observation(output), add_special_tokens=False))
            room = length - st.n
            k = min(len(ids), room)
            st.tokens[st.n:st.n + k] = ids[:k]
            st.obs[st.n:st.n + k] = True
            st.n += k
            stats.observation_tokens += k
            self._event("tool_result", slot=s, index=st.index)
            if k >= room:
                return finish(s, FINISH_LENGTH)
            st.seg_start, st.state = st.n, _DECODING
            st.probe_start, st.probe_first = st.n, False
            appends.append((s, ids))

        def start(s: int, index: int, req: RolloutRequest) -> None:
            st = _Slot(index, req, length, self.pad_id)
            slots[s] = st
            starts.append((s, st, list(req.prompt_ids) + [int(t) for t in st.tokens[:st.n]]))
            self._event("start", slot=s, index=index)
            if st.n >= length:
                return finish(s, FINISH_LENGTH)
            if st.n > st.seg_start and parse_segment_end(self._decode_text(st.tokens[st.seg_start:st.n])):
                st.boundary = -1
                segment_end(s)  # the prefix ends with a completed stop: act on it as if just generated

        def stop_across_prefix(s: int, fin: int) -> int:
            """A stop string straddling a branch prefix's end is invisible to the policy (it searches the text
            generated since the start): find it, drop the tokens after it and re-sync the slot (restart from
            prompt + response, same key). Returns the chunk finish code to act on."""
            st = slots[s]
            j = self._stop_across(st)
            if j is not None:
                drop = st.n - j
                st.tokens[j:st.n], st.gen[j:st.n], st.logp[j:st.n], st.ent[j:st.n] = self.pad_id, False, 0, 0
                st.n = j
                stats.generated_tokens -= drop
                starts.append((s, st, list(st.request.prompt_ids) + [int(t) for t in st.tokens[:j]]))
                fin = CHUNK_STOP
            if j is not None or fin != CHUNK_RUNNING or st.n >= st.boundary + _STOP_SPAN:
                st.boundary = -1
            return fin

        while True:
            for s, st in enumerate(slots):
                if st is not None and st.state == _TOOL and st.future.done():
                    tool_done(s)
            for s in range(len(slots)):
                while slots[s] is None and queue:
                    start(s, *queue.popleft())
            if starts or appends:
                t0 = time.perf_counter()
                live = [x for x in starts if slots[x[0]] is x[1]]  # skip rollouts that finished at start
                if live:
                    policy.start([x[0] for x in live], [x[2] for x in live], [x[1].request.key for x in live])
                if appends:
                    policy.append([a[0] for a in appends], [a[1] for a in appends])
                starts.clear()
                appends.clear()
                stats.prefill_s += time.perf_counter() - t0
            active = np.array([st is not None and st.state == _DECODING for st in slots], bool)
            if active.any():
                max_new = np.array([min(cfg.decode_chunk, length - st.n) if a else 0
                                    for st, a in zip(slots, active)], np.int32)
                t0 = time.perf_counter()
                chunk = policy.decode(active, max_new)
                stats.decode_s += time.perf_counter() - t0
                stats.decode_calls += 1
                self._event("decode", slots=[int(s) for s in np.flatnonzero(active)])
                for s in map(int, np.flatnonzero(active)):
                    st = slots[s]
                    k = int(chunk.num_new[s])
                    st.tokens[st.n:st.n + k] = chunk.tokens[s, :k]
                    st.gen[st.n:st.n + k] = True
                    st.logp[st.n:st.n + k] = chunk.logprobs[s, :k]
                    st.ent[st.n:st.n + k] = chunk.entropies[s, :k]
                    st.n += k
                    stats.generated_tokens += k
                    fin = int(chunk.finish[s])
                    if st.boundary >= 0:
                        fin = stop_across_prefix(s, fin)
                    maybe_probe(s, force=fin != 0 or st.n >= length)
                    if fin == CHUNK_STOP:
                        segment_end(s)
                        if slots[s] is not None and slots[s].state == _DECODING and st.n >= length:
                            finish(s, FINISH_LENGTH)
                    elif fin == CHUNK_EOS:
                        finish(s, FINISH_EOS)
                    elif fin == CHUNK_LENGTH or st.n >= length:
                        finish(s, FINISH_LENGTH)
                if progress is not None:
                    progress(len(done) - reported[0], counter[0] - reported[1], stats.generated_tokens - reported[2])
                    reported = (len(done), counter[0], stats.generated_tokens)
            elif any(st is not None for st in slots):
                t0 = time.perf_counter()
                wait([st.future for st in slots if st is not None], return_when=FIRST_COMPLETED)
                stats.tool_wait_s += time.perf_counter() - t0
            elif not queue:
                break
        if progress is not None:
            progress(len(done) - reported[0], counter[0] - reported[1], stats.generated_tokens - reported[2])
        t0 = time.perf_counter()
        for ro, fut in reward_futures:
            ro.reward = float(fut.result())
        stats.reward_wait_s = time.perf_counter() - t0
        stats.wall_s = time.perf_counter() - t_start
        done.sort(key=lambda r: r.index)
        return done


__all__ = ["AgentLoop", "LoopConfig", "LoopHooks", "LoopStats", "Prefix", "Rollout", "RolloutRequest",
           "ToolCall", "find_stop", "parse_segment_end"]
