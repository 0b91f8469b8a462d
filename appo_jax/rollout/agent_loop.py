"""The multi-turn tool loop (docs/protocol.md) over the slots of a :class:`~appo_jax.rollout.slots.SlotSampler`.

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
KV forks: a request whose ``fork`` names a row starts from a copy of that row's KV instead of prefilling its
prefix: a row of a ``CacheSnapshot``, or a live slot (APPO's branches and Tree-GRPO's expansions name the slots
their parents ended in; with ``LoopConfig.kv_fork`` the requests a hook returns from ``on_probe`` name the probed
rollout's slot: ARPO / AEPO's copies after a tool result). A live slot is checked when the request starts: one
that no longer holds the prefix (its rollout ended and the slot was reused) means a prefill. Forks from live
slots run before anything else of the same prefill, so a slot restarted there is copied first.
A prefix may end anywhere: inside an unfinished call generation just continues; right after a completed call the
call is run first; inside a stop string (e.g. ``</python``) the loop detects the stop that straddles the prefix
end (the policy only searches text generated since the slot's start), drops what followed it and re-syncs the
slot.
Rewards are computed off the decode thread (``submit_reward``) as soon as a rollout finishes.

Structure: :class:`AgentLoop` holds the policy, tokenizer, config and callbacks; each :meth:`AgentLoop.run`
keeps the state of that run in a ``_Run`` (request queue and enqueue count, one ``_Slot`` per policy slot,
finished rollouts, reward futures, the policy starts / appends not yet sent, stats, the last progress report)
and repeats its named steps until no request is left: ``poll_tools`` (append the results of resolved tool
calls), ``fill_slots`` (start queued requests on free slots), ``prefill`` (send the pending starts and appends
to the policy), ``decode`` (one chunk for the generating slots, then each slot's outcome: stop string, EOS,
budget) or, when no slot can generate, ``wait_tools`` (block until a tool call resolves). The stop strings,
:func:`find_stop`, :func:`parse_segment_end` and the token look-back of a stop string live in :mod:`appo_jax.protocol`.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from appo_jax.core.trajectory import FINISH_ANSWER, FINISH_EOS, FINISH_LENGTH, FINISH_TOOL_LIMIT
from appo_jax.protocol import STOP_LOOKBACK, STOP_STRINGS, TOOL_TAGS, find_stop, format_observation, parse_segment_end
from appo_jax.rollout.slots import CHUNK_EOS, CHUNK_LENGTH, CHUNK_RUNNING, CHUNK_STOP, DecodeChunk, SlotSampler


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
    response ``prefix`` to continue from, and caller data (``tag``, ``meta``) carried to the result. ``fork``:
    ``(snapshot, row)`` -- the sampler's ``CacheSnapshot`` row that holds ``prompt + prefix`` (all but its last
    token): the slot starts from a copy of that row's KV (``Sampler.fork``) instead of prefilling; ``(None, slot)``
    -- the loop's live slot ``slot``, when it still holds them at the start (else the slot prefills)."""

    prompt_ids: Sequence[int]
    key: Any
    prefix: Prefix | None = None
    tag: Any = None
    meta: dict = field(default_factory=dict)
    fork: tuple | None = None


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
    slot: int = -1

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
    for hooks (ARPO: 20); ``kv_fork``: the requests ``on_probe`` returns fork from the probed slot (module doc)."""

    max_response_len: int
    tool_call_limit: int
    decode_chunk: int = 16
    probe_len: int = 20
    kv_fork: bool = False

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
    (``tool_wait_s``), time spent collecting rewards after the last rollout (``reward_wait_s``), counts
    (``kv_forked``: slots started from a copy of another row's KV)."""

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
    kv_forked: int = 0


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
        # a prefix ending inside a generated segment: a stop string may straddle its end
        # (see `_Run.stop_across_prefix`)
        self.boundary = self.n if self.n > self.seg_start else -1

    def prefix(self, end: int) -> Prefix:
        """The response prefix ``[:end]`` with all of the slot's tool calls so far."""
        return Prefix(self.tokens[:end].copy(), self.gen[:end].copy(), self.obs[:end].copy(),
                      self.logp[:end].copy(), self.ent[:end].copy(),
                      [ToolCall(c.name, c.input, c.output) for c in self.tool_calls])


class _Run:
    """The state of one :meth:`AgentLoop.run` and the steps that advance it (see the module doc).

    ``queue``: ``(index, request)`` pairs not started yet; ``enqueued``: requests enqueued so far (the next
    index); ``slots[s]``: the rollout in policy slot ``s`` (None: free); ``done``: finished rollouts;
    ``reward_futures``: ``(rollout, future)`` of their rewards; ``starts`` / ``appends``: policy starts
    ``(slot, _Slot, tokens, fork)`` and tool-result appends ``(slot, tokens)`` not sent yet (:meth:`prefill` sends
    them together); ``stats``: the run's :class:`LoopStats`; ``reported``: ``(finished, enqueued, generated
    tokens)`` at the last ``progress`` call."""

    def __init__(self, loop: AgentLoop, hooks: LoopHooks | None, progress: Callable[[int, int, int], None] | None):
        self.loop, self.hooks, self.progress = loop, hooks, progress
        self.cfg, self.sampler, self.length = loop.cfg, loop.sampler, loop.cfg.max_response_len
        self.stats = LoopStats()
        self.t_start = time.perf_counter()
        self.queue: deque[tuple[int, RolloutRequest]] = deque()
        self.enqueued = 0
        self.reported = (0, 0, 0)
        self.slots: list[_Slot | None] = [None] * self.sampler.num_slots
        self.done: list[Rollout] = []
        self.reward_futures: list[tuple[Rollout, Future]] = []
        self.starts: list[tuple[int, _Slot, list[int], tuple | None]] = []
        self.appends: list[tuple[int, list[int]]] = []

    # -- helpers -----------------------------------------------------------------------------------------------
    def event(self, event: str, **info) -> None:
        """Report ``event`` to the loop's ``on_event`` callback, if any."""
        if self.loop.on_event is not None:
            self.loop.on_event(event, **info)

    def decode_text(self, tokens: np.ndarray, skip_special: bool = False) -> str:
        """The text of ``tokens`` (special tokens kept unless ``skip_special``)."""
        return self.loop.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=skip_special)

    def enqueue(self, reqs: Iterable[RolloutRequest]) -> None:
        """Append ``reqs`` to the queue, numbered in enqueue order; a request with an empty prompt is an error."""
        for r in reqs:
            if not len(r.prompt_ids):
                raise ValueError("a rollout request has an empty prompt")
            self.queue.append((self.enqueued, r))
            self.enqueued += 1

    def report(self) -> None:
        """Call ``progress`` (if given) with the rollouts finished, requests enqueued and tokens generated since
        its last call."""
        if self.progress is None:
            return
        now = (len(self.done), self.enqueued, self.stats.generated_tokens)
        self.progress(now[0] - self.reported[0], now[1] - self.reported[1], now[2] - self.reported[2])
        self.reported = now

    # -- the steps of the loop ---------------------------------------------------------------------------------
    def poll_tools(self) -> None:
        """Append the result of every slot whose tool call has resolved (:meth:`tool_done`)."""
        for s, st in enumerate(self.slots):
            if st is not None and st.state == _TOOL and st.future.done():
                self.tool_done(s)

    def fill_slots(self) -> None:
        """Start queued requests on the free slots (a rollout that ends at its start frees its slot again)."""
        for s in range(len(self.slots)):
            while self.slots[s] is None and self.queue:
                self.start(s, *self.queue.popleft())

    def prefill(self) -> None:
        """Send the pending starts (of rollouts still in their slot) and tool-result appends to the policy."""
        if not (self.starts or self.appends):
            return
        t0 = time.perf_counter()
        pending = [x for x in self.starts if self.slots[x[0]] is x[1]]  # skip rollouts that finished at start
        # forks from live slots first: a slot they copy from may be restarted by this call's other starts
        view = self.sampler.live() if any(x[3] is not None and x[3][0] is None for x in pending) else None
        sources = [(view if x[3][0] is None else x[3][0]) if x[3] is not None else None for x in pending]
        sources = [None if src is not None and src is view and src.cannot_fork(x[3][1], x[2]) else src
                   for x, src in zip(pending, sources)]
        for snapshot in sorted({id(src): src for src in sources if src is not None}.values(), key=lambda v: not v.live):
            forks = [x for x, src in zip(pending, sources) if src is snapshot]
            self.sampler.fork([x[0] for x in forks], snapshot, [x[3][1] for x in forks], [x[2] for x in forks],
                              [x[1].request.key for x in forks])
            self.stats.kv_forked += len(forks)
        plain = [x for x, src in zip(pending, sources) if src is None]
        if plain:
            self.sampler.start([x[0] for x in plain], [x[2] for x in plain], [x[1].request.key for x in plain])
        if self.appends:
            self.sampler.append([a[0] for a in self.appends], [a[1] for a in self.appends])
        self.starts.clear()
        self.appends.clear()
        self.stats.prefill_s += time.perf_counter() - t0

    def decode(self) -> bool:
        """Decode one chunk for the generating slots, act on each slot's outcome (:meth:`take_chunk`) and report
        progress. Returns False, doing nothing, when no slot is generating."""
        active = np.array([st is not None and st.state == _DECODING for st in self.slots], bool)
        if not active.any():
            return False
        max_new = np.array([min(self.cfg.decode_chunk, self.length - st.n) if a else 0
                            for st, a in zip(self.slots, active)], np.int32)
        t0 = time.perf_counter()
        chunk = self.sampler.decode(active, max_new)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_calls += 1
        self.event("decode", slots=[int(s) for s in np.flatnonzero(active)])
        for s in map(int, np.flatnonzero(active)):
            self.take_chunk(s, chunk)
        self.report()
        return True

    def wait_tools(self) -> bool:
        """Block until one of the occupied slots' tool calls resolves (called when no slot can generate, so every
        occupied slot waits on a tool). Returns False, without waiting, when every slot is free."""
        futures = [st.future for st in self.slots if st is not None]
        if not futures:
            return False
        t0 = time.perf_counter()
        wait(futures, return_when=FIRST_COMPLETED)
        self.stats.tool_wait_s += time.perf_counter() - t0
        return True

    def results(self) -> list[Rollout]:
        """After the last rollout: the final progress report, the rewards and the wall time; the rollouts in
        enqueue order."""
        self.report()
        t0 = time.perf_counter()
        for ro, fut in self.reward_futures:
            ro.reward = float(fut.result())
        self.stats.reward_wait_s = time.perf_counter() - t0
        self.stats.wall_s = time.perf_counter() - self.t_start
        self.done.sort(key=lambda r: r.index)
        return self.done

    # -- per-slot handling -------------------------------------------------------------------------------------
    def start(self, s: int, index: int, req: RolloutRequest) -> None:
        """Put request ``req`` (enqueue number ``index``) into the free slot ``s`` and queue its policy start
        (prompt + response prefix). A prefix that fills the budget ends the rollout; one that ends with a
        completed stop string is acted on as if just generated."""
        st = _Slot(index, req, self.length, self.loop.pad_id)
        self.slots[s] = st
        self.starts.append((s, st, list(req.prompt_ids) + [int(t) for t in st.tokens[:st.n]], req.fork))
        self.event("start", slot=s, index=index)
        if st.n >= self.length:
            self.finish(s, FINISH_LENGTH)
        elif st.n > st.seg_start and parse_segment_end(self.decode_text(st.tokens[st.seg_start:st.n])):
            st.boundary = -1
            self.segment_end(s)

    def take_chunk(self, s: int, chunk: DecodeChunk) -> None:
        """Record slot ``s``'s new tokens of ``chunk``, probe for the hooks, and act on how the slot's chunk ended:
        a stop string ends the segment (:meth:`segment_end`), EOS or the budget ends the rollout."""
        st = self.slots[s]
        k = int(chunk.num_new[s])
        st.tokens[st.n:st.n + k] = chunk.tokens[s, :k]
        st.gen[st.n:st.n + k] = True
        st.logp[st.n:st.n + k] = chunk.logprobs[s, :k]
        st.ent[st.n:st.n + k] = chunk.entropies[s, :k]
        st.n += k
        self.stats.generated_tokens += k
        fin = int(chunk.finish[s])
        if st.boundary >= 0:
            fin = self.stop_across_prefix(s, fin)
        self.maybe_probe(s, force=fin != CHUNK_RUNNING or st.n >= self.length)
        if fin == CHUNK_STOP:
            self.segment_end(s)
            if self.slots[s] is not None and self.slots[s].state == _DECODING and st.n >= self.length:
                self.finish(s, FINISH_LENGTH)
        elif fin == CHUNK_EOS:
            self.finish(s, FINISH_EOS)
        elif fin == CHUNK_LENGTH or st.n >= self.length:
            self.finish(s, FINISH_LENGTH)

    def maybe_probe(self, s: int, force: bool) -> None:
        """Call ``hooks.on_probe`` for slot ``s``'s pending probe once its first ``probe_len`` generated tokens
        exist (or at once with ``force``: the segment ended sooner) and enqueue the requests it returns."""
        st = self.slots[s]
        if self.hooks is None or st.probe_start < 0:
            return
        stop = min(st.n, st.probe_start + self.cfg.probe_len)
        if stop - st.probe_start < self.cfg.probe_len and not force:
            return
        sel = st.gen[st.probe_start:stop]
        ent = st.ent[st.probe_start:stop][sel]
        mean = float(ent.mean()) if ent.size else 0.0
        first, start = st.probe_first, st.probe_start
        st.probe_start, st.probe_first = -1, False
        children = list(self.hooks.on_probe(st.request, st.prefix(start), mean, first))
        if self.cfg.kv_fork:
            for child in children:
                child.fork = child.fork or (None, s)
        self.enqueue(children)

    def segment_end(self, s: int) -> None:
        """Slot ``s``'s segment completed a stop string: finish (answer, call limit, no room left), or submit its
        tool call (:meth:`submit_call`)."""
        st = self.slots[s]
        parsed = parse_segment_end(self.decode_text(st.tokens[st.seg_start:st.n]))
        if parsed is None:
            return  # no stop string in the decoded text after all: keep generating
        name, arg = parsed
        if name == "answer":
            self.finish(s, FINISH_ANSWER)
        elif len(st.tool_calls) >= self.cfg.tool_call_limit:
            self.finish(s, FINISH_TOOL_LIMIT)
        elif st.n >= self.length:
            self.finish(s, FINISH_LENGTH)
        else:
            self.submit_call(s, name, arg)

    def submit_call(self, s: int, name: str, arg: str | None) -> None:
        """Record slot ``s``'s call of tool ``name`` on ``arg`` and submit it; the slot waits for the result. A
        close tag without an opening tag (``arg`` None) still counts as a call, answered with an error text."""
        st = self.slots[s]
        st.tool_calls.append(ToolCall(name, arg if arg is not None else ""))
        self.stats.tool_calls += 1
        if arg is None:
            fut: Future = Future()
            fut.set_result(f"Error: {TOOL_TAGS[name][1]} without a matching {TOOL_TAGS[name][0]}")
        else:
            fut = self.loop.submit_tool(name, arg)
        st.state, st.future = _TOOL, fut
        self.event("tool_submit", slot=s, index=st.index, tool=name)

    def tool_done(self, s: int) -> None:
        """Append slot ``s``'s resolved tool result as observation tokens (truncated to the room left) and queue
        them for the policy, or finish with ``FINISH_LENGTH`` when the result fills the budget."""
        st = self.slots[s]
        try:
            res = st.future.result()
            output = res.text if hasattr(res, "text") else str(res)
        except Exception as e:  # a tool must never take the loop down: the error becomes the result
            output = f"Error: {type(e).__name__}: {e}"
        st.tool_calls[-1].output = output
        st.future = None
        ids = list(self.loop.tokenizer.encode(format_observation(output), add_special_tokens=False))
        room = self.length - st.n
        k = min(len(ids), room)
        st.tokens[st.n:st.n + k] = ids[:k]
        st.obs[st.n:st.n + k] = True
        st.n += k
        self.stats.observation_tokens += k
        self.event("tool_result", slot=s, index=st.index)
        if k >= room:
            self.finish(s, FINISH_LENGTH)
            return
        st.seg_start, st.state = st.n, _DECODING
        st.probe_start, st.probe_first = st.n, False
        self.appends.append((s, ids))

    def finish(self, s: int, reason: int) -> None:
        """End the rollout in slot ``s`` with ``reason`` (``FINISH_*``): free the slot, submit the reward and
        enqueue the requests ``hooks.on_finish`` returns."""
        st = self.slots[s]
        n = st.n
        ro = Rollout(st.index, st.request, st.tokens[:n].copy(), st.gen[:n].copy(), st.obs[:n].copy(),
                     st.logp[:n].copy(), st.ent[:n].copy(), st.tool_calls, reason,
                     self.decode_text(st.tokens[:n], skip_special=True), slot=s)
        self.slots[s] = None
        self.done.append(ro)
        self.stats.rollouts += 1
        self.event("finish", slot=s, index=st.index, reason=reason)
        if self.loop.submit_reward is not None:
            self.reward_futures.append((ro, self.loop.submit_reward(ro)))
        if self.hooks is not None:
            self.enqueue(self.hooks.on_finish(ro))

    # -- a stop string straddling a prefix's end ---------------------------------------------------------------
    def stop_across_prefix(self, s: int, fin: int) -> int:
        """A stop string straddling a branch prefix's end is invisible to the policy (it searches the text
        generated since the start): find it, drop the tokens after it and re-sync the slot (restart from
        prompt + response, same key). The check ends once the stop is found, the chunk ended, or the slot has
        ``STOP_LOOKBACK`` tokens past the prefix. Returns the chunk finish code to act on."""
        st = self.slots[s]
        j = self.stop_across(st)
        if j is not None:
            drop = st.n - j
            st.tokens[j:st.n], st.gen[j:st.n], st.logp[j:st.n], st.ent[j:st.n] = self.loop.pad_id, False, 0, 0
            st.n = j
            self.stats.generated_tokens -= drop
            self.starts.append((s, st, list(st.request.prompt_ids) + [int(t) for t in st.tokens[:j]], None))
            fin = CHUNK_STOP
        if j is not None or fin != CHUNK_RUNNING or st.n >= st.boundary + STOP_LOOKBACK:
            st.boundary = -1
        return fin

    def stop_across(self, st: _Slot) -> int | None:
        """Smallest ``j`` in ``(boundary, boundary + STOP_LOOKBACK]`` such that the segment text up to token ``j``
        has a stop string that begins inside the prefix part (which alone holds no complete stop), or None.
        Stops wholly inside the new text are the policy's to report."""
        end = min(st.n, st.boundary + STOP_LOOKBACK)
        head = len(self.decode_text(st.tokens[st.seg_start:st.boundary]))

        def straddles(j: int) -> bool:
            """Whether the first stop of the segment text up to token ``j`` begins inside the prefix part."""
            found = find_stop(self.decode_text(st.tokens[st.seg_start:j]))
            return found is not None and found[0] < head

        if end <= st.boundary or not straddles(end):
            return None
        return next(j for j in range(st.boundary + 1, end + 1) if straddles(j))


class AgentLoop:
    """Runs rollout requests through the tool loop on the slots of ``sampler`` (see the module doc).

    ``submit_tool(name, input) -> Future`` runs a tool off the decode thread (the tool registry's bounded
    pool) and resolves to its output text (a ``str``, or a ``ToolResult`` whose ``.text`` is used);
    ``submit_reward(rollout) -> Future[float]`` computes a finished rollout's reward off the decode thread
    (``None``: rewards stay 0). ``on_event(event, **info)``, if given, is called for "start", "decode",
    "tool_submit", "tool_result" and "finish" (tests read the event order)."""

    def __init__(self, sampler: SlotSampler, tokenizer, cfg: LoopConfig,
                 submit_tool: Callable[[str, str], Future],
                 submit_reward: Callable[[Rollout], Future] | None = None,
                 on_event: Callable[..., None] | None = None, pad_id: int = 0):
        self.sampler, self.tokenizer, self.cfg = sampler, tokenizer, cfg
        self.submit_tool, self.submit_reward, self.on_event = submit_tool, submit_reward, on_event
        self.pad_id = pad_id
        self.stats = LoopStats()

    def run(self, requests: Iterable[RolloutRequest], hooks: LoopHooks | None = None,
            progress: Callable[[int, int, int], None] | None = None) -> list[Rollout]:
        """Run every request (and every request the hooks add) to completion; returns the rollouts ordered by
        ``Rollout.index`` (enqueue order). Rewards are filled before returning. ``self.stats`` describes the run.
        ``progress(finished, added, tokens)`` (e.g. `appo_jax.progress.RolloutProgress`) is called after every
        decode chunk with the rollouts finished, requests added and tokens generated since its last call.
        """
        state = _Run(self, hooks, progress)
        self.stats = state.stats
        state.enqueue(requests)
        while True:
            state.poll_tools()
            state.fill_slots()
            state.prefill()
            if not (state.decode() or state.wait_tools() or state.queue):
                break
        return state.results()


__all__ = ["STOP_STRINGS", "AgentLoop", "LoopConfig", "LoopHooks", "LoopStats", "Prefix", "Rollout",
           "RolloutRequest", "ToolCall", "find_stop", "parse_segment_end"]
