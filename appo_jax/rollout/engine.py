"""The rollout engine: rollout requests -> static-shape Trajectory batches (docs/algorithm.md §1.3, §1.7;
docs/protocol.md).

:class:`RolloutEngine` runs the multi-turn tool loop (:mod:`appo_jax.rollout.agent_loop`) on the slots of the
jitted sampler and assembles :class:`~appo_jax.core.trajectory.Trajectory` batches. It has one primitive,

    engine.rollout(requests, num_groups, rows_per_group, hooks=None, progress=None, parent_tree=None) -> RolloutBatch

which runs a set of requests through the tool loop (``hooks`` may add requests while it runs: ARPO) and assembles
a batch of ``num_groups * rows_per_group`` rows, group-major: the request for row ``local`` of prompt group ``g``
lands in row ``g * rows_per_group + local``; rows no request reached are padding (``row_valid`` False). Requests
are built with :meth:`RolloutEngine.request` (a fresh rollout of a prompt :class:`~appo_jax.data.records.Record`
whose ``prompt_ids`` are filled, or a continuation of a response prefix: :meth:`RolloutEngine.branch_prefix`)
and carry the row's fields (kind, parent row, branch position, branch score). Every rollout scheme (independent
rollouts, APPO branches, ARPO / AEPO, Tree-GRPO) is a strategy over this primitive
(:mod:`appo_jax.rollout.strategies`, :mod:`~appo_jax.rollout.arpo`, :mod:`~appo_jax.rollout.tree`), and
:class:`~appo_jax.rollout.host_sharded.HostShardedEngine` shards it over the processes of a multi-host job.

Every row is scored off the decode thread by ``reward_fn(record, text)`` (default: the record's ability reward,
`appo_jax.rewards.RecordReward`). A :class:`RolloutBatch` is the Trajectory plus, per row, the decoded response
text, the tool calls (name, input, output), the answer accuracy and the tree id (row index of the row's root:
itself for a row without parent; Tree-GRPO's tree groups).
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import numpy as np

from appo_jax.core.trajectory import KIND_BRANCH, KIND_INIT, Trajectory, TrajectoryBuilder
from appo_jax.data.records import Record
from appo_jax.rewards.arpo import RewardOutput
from appo_jax.rewards.registry import RecordReward
from appo_jax.rollout.agent_loop import (AgentLoop, LoopConfig, LoopHooks, Prefix, Rollout, RolloutRequest,
                                         ToolCall, parse_segment_end)
from appo_jax.rollout.config import RolloutConfig
from appo_jax.rollout.slots import SlotSampler, make_slot_sampler
from appo_jax.tools.registry import ToolRegistry, build_registry


@dataclass
class RolloutBatch:
    """A Trajectory plus host-side per-row extras: decoded response ``texts``, ``tool_calls``, ``accuracy``
    (float32 [N]: the reward's answer accuracy, 0 for padding rows), ``tree_id`` (int32 [N]: row index of the
    row's root, -1 for padding rows), ``format_ok`` (float32 [N]: 1 where the reward's format check passed,
    0 elsewhere and for padding rows) and ``slot`` (int32 [N]: the sampler slot each row's rollout ended in, -1 for
    padding rows; None after `concat_batches`); ``kv_forked``: rollouts that started from a copy of another row's
    KV instead of prefilling their prefix (`LoopStats.kv_forked`, summed over the calls a batch combines)."""

    traj: Trajectory
    texts: list[str]
    tool_calls: list[list[ToolCall]]
    accuracy: np.ndarray
    tree_id: np.ndarray
    format_ok: np.ndarray
    slot: np.ndarray | None = None
    kv_forked: int = 0


def concat_trajectories(a: Trajectory, b: Trajectory) -> Trajectory:
    """Rows of ``a`` then rows of ``b`` (same L and P). Parent indices of ``b``'s rows keep pointing into
    ``a``'s rows, which come first, so they are left unchanged."""
    if a.tokens.shape[1] != b.tokens.shape[1] or a.prompt_tokens.shape[1] != b.prompt_tokens.shape[1]:
        raise ValueError(f"concat_trajectories: shapes differ: L {a.tokens.shape[1]} vs {b.tokens.shape[1]}, "
                         f"P {a.prompt_tokens.shape[1]} vs {b.prompt_tokens.shape[1]}")
    return jax.tree_util.tree_map(lambda x, y: np.concatenate([np.asarray(x), np.asarray(y)], axis=0), a, b)


def concat_batches(a: RolloutBatch, b: RolloutBatch) -> RolloutBatch:
    """:func:`concat_trajectories` for :class:`RolloutBatch` (tree ids of ``b`` index rows of ``a`` too)."""
    return RolloutBatch(concat_trajectories(a.traj, b.traj), a.texts + b.texts, a.tool_calls + b.tool_calls,
                        np.concatenate([a.accuracy, b.accuracy]), np.concatenate([a.tree_id, b.tree_id]),
                        np.concatenate([a.format_ok, b.format_ok]), kv_forked=a.kv_forked + b.kv_forked)


def overlay_batches(base: RolloutBatch, top: RolloutBatch) -> RolloutBatch:
    """The rows of ``top`` where it has a rollout (``row_valid``), else the rows of ``base`` (same shapes): how a
    scheme that fills one batch in several calls of the primitive (Tree-GRPO's rounds) puts them together."""
    if top.traj.tokens.shape != base.traj.tokens.shape or top.traj.prompt_tokens.shape != base.traj.prompt_tokens.shape:
        raise ValueError("overlay_batches: the two batches differ in shape")
    take = np.asarray(top.traj.row_valid, bool)

    def pick(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return np.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)

    traj = jax.tree_util.tree_map(pick, base.traj, top.traj)
    texts = [t if k else b for b, t, k in zip(base.texts, top.texts, take)]
    calls = [t if k else b for b, t, k in zip(base.tool_calls, top.tool_calls, take)]
    slot = None if base.slot is None or top.slot is None else pick(base.slot, top.slot)
    return RolloutBatch(traj, texts, calls, pick(base.accuracy, top.accuracy), pick(base.tree_id, top.tree_id),
                        pick(base.format_ok, top.format_ok), slot, base.kv_forked + top.kv_forked)


def default_tools(cfg: RolloutConfig, search_backend: tuple[str, dict] | None = None) -> ToolRegistry:
    """The built-in tool registry (python sandbox + offline search) sized by ``cfg``: ``cfg.tool_workers``
    pool threads, python wall-clock limit ``cfg.tool_timeout_s``, search over ``cfg.search_cache`` (empty: the
    shipped cache) or, when given, the registered backend ``search_backend = (name, kwargs)`` (a generated
    task's own search engine). Close it (or use ``with``) when done."""
    search = {"backend_kwargs": {"path": cfg.search_cache}} if cfg.search_cache else {}
    if search_backend is not None:
        search = {"backend": search_backend[0], "backend_kwargs": dict(search_backend[1])}
    return build_registry(("python", "search"), max_workers=cfg.tool_workers,
                          python={"timeout_s": cfg.tool_timeout_s}, search=search)


def tree_ids(parent: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Root row of every row, following ``parent`` pointers (-1 = root) inside the same batch; -1 for invalid
    rows. A parent always precedes its child (``parent[i] < i``), else ``ValueError``."""
    parent = np.asarray(parent)
    out = np.full(parent.shape, -1, np.int32)
    for i in range(parent.shape[0]):
        if not valid[i]:
            continue
        p = int(parent[i])
        if p >= i:
            raise ValueError(f"tree_ids: row {i} has parent {p}, which does not precede it")
        out[i] = i if p < 0 else out[p]
    return out


def resolve_tree_ids(parent: np.ndarray, valid: np.ndarray, parent_tree: np.ndarray | None = None) -> np.ndarray:
    """Tree ids of a batch: :func:`tree_ids` when parents are rows of the same batch (``parent_tree`` None);
    otherwise parents index another batch whose tree ids are ``parent_tree`` (a row without parent is its own
    root). -1 for invalid rows."""
    if parent_tree is None:
        return tree_ids(parent, valid)
    parent, parent_tree = np.asarray(parent), np.asarray(parent_tree)
    own = np.arange(parent.shape[0], dtype=np.int32)
    inherited = parent_tree[np.clip(parent, 0, max(len(parent_tree) - 1, 0))] if len(parent_tree) else own
    return np.where(np.asarray(valid, bool), np.where(parent >= 0, inherited, own), -1).astype(np.int32)


def tool_calls_from_tokens(tokenizer, tokens: np.ndarray, gen_mask: np.ndarray, obs_mask: np.ndarray
                           ) -> list[ToolCall]:
    """Reconstruct the tool calls of a response from its tokens: each observation run is the result of the call
    parsed from the text generated before it (since the previous run); the output is the run's text without the
    ``<result>\\n`` / ``\\n</result>`` wrapper (a truncated run keeps what is there)."""
    obs = np.asarray(obs_mask, bool)
    calls, seg_start, i, n = [], 0, 0, len(obs)
    while i < n:
        if not obs[i]:
            i += 1
            continue
        j = i
        while j < n and obs[j]:
            j += 1
        parsed = parse_segment_end(tokenizer.decode([int(t) for t in tokens[seg_start:i]]))
        out = tokenizer.decode([int(t) for t in tokens[i:j]])
        out = out.removeprefix("<result>\n").removesuffix("\n</result>")
        name, arg = parsed if parsed is not None and parsed[0] != "answer" else ("unknown", None)
        calls.append(ToolCall(name, arg or "", out))
        seg_start = i = j
    return calls


class RolloutEngine:
    """Rollouts with the tool loop on a sampler (module doc).

    ``tools``: a tool registry with ``submit(name, input) -> Future[ToolResult]`` (:func:`default_tools`).
    ``cfg``: a :class:`RolloutConfig` with ``num_slots >= 1`` (`RolloutConfig.fitted` sizes one to a call).
    ``mesh``: the mesh ``params`` live on; the sampler runs with the params' own shardings, so it is only
    recorded. ``sampler``: a ready :class:`SlotSampler` to use instead of building the jitted sampler from
    ``model_config`` / ``params`` (tests use scripted policies); ``reward_fn(record, text)`` returns a
    `RewardOutput` or a float (then the accuracy is ``score >= 1``); ``on_event`` is passed to the
    :class:`AgentLoop`. Call :meth:`close` when done.
    """

    def __init__(self, model_config, params, tokenizer, tools, cfg: RolloutConfig, mesh=None, *,
                 sampler: SlotSampler | None = None,
                 reward_fn: Callable[[Record, str], RewardOutput | float] | None = None,
                 on_event: Callable[..., None] | None = None):
        if cfg.num_slots < 1:
            raise ValueError("RolloutEngine needs rollout.num_slots >= 1; size the config to the call with "
                             "RolloutConfig.fitted(prompts, rollouts)")
        self.cfg, self.tokenizer, self.tools, self.mesh = cfg, tokenizer, tools, mesh
        pad = getattr(model_config, "pad_token_id", None)
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad)
        self.vocab_size = int(getattr(model_config, "vocab_size", None) or len(tokenizer))
        if cfg.entropy != "exact" and cfg.entropy_k > self.vocab_size:
            raise ValueError(f"rollout.entropy_k={cfg.entropy_k} is larger than the vocabulary ({self.vocab_size})")
        if sampler is None:
            if cfg.dtype:  # the sampler computes in its own precision (e.g. bf16 against an fp32 trainer)
                model_config = dataclasses.replace(model_config, dtype=cfg.dtype)
            if cfg.weights_dtype:  # the sampler keeps its weights in their own dtype (cast per new policy)
                model_config = dataclasses.replace(model_config, param_dtype=cfg.weights_dtype)
            sampler = make_slot_sampler(model_config, params, tokenizer, num_slots=cfg.num_slots,
                                         max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                                         tool_call_limit=cfg.tool_call_limit, temperature=cfg.temperature,
                                         top_p=cfg.top_p, top_k=cfg.top_k,
                                         repetition_penalty=cfg.repetition_penalty, entropy=cfg.entropy,
                                         entropy_k=cfg.entropy_k, decode_chunk=cfg.decode_chunk,
                                         cpu_kernels=cfg.cpu_kernels)
        self.sampler = sampler
        self.reward_fn = reward_fn if reward_fn is not None else RecordReward("auto")
        self._reward_pool = ThreadPoolExecutor(max(1, min(4, cfg.tool_workers)), thread_name_prefix="reward")
        self.loop = AgentLoop(sampler, tokenizer,
                              LoopConfig(cfg.max_response_len, cfg.tool_call_limit, cfg.decode_chunk,
                                         cfg.probe_len, cfg.kv_fork and hasattr(sampler, "live")),
                              submit_tool=tools.submit, submit_reward=self._submit_reward,
                              on_event=on_event, pad_id=self.pad_id)

    # -- plumbing ----------------------------------------------------------------------------------------------
    def set_params(self, params) -> None:
        """Use new policy weights for the following rollouts."""
        self.sampler.set_params(params)

    def describe(self) -> str:
        """One line: sampler slots, KV-cache row length and bytes, response budget, tool-call limit and what runs
        the decode steps (the CPU kernels, or XLA and why: ``rollout.cpu_kernels``)."""
        cache = getattr(self.sampler, "cache", None)
        kv = "" if cache is None else (f", KV cache {cache.batch} x {cache.max_len} slots "
                                       f"({(cache.k.nbytes + cache.v.nbytes) / 2**20:.0f} MiB)")
        status = getattr(self.sampler, "cpu_kernels_status", None)
        decode = "" if status is None else ("; decode steps in the CPU kernels" if status[0]
                                            else f"; decode steps in XLA ({status[1]})")
        cfg = self.cfg
        return (f"{cfg.num_slots} sampler slots{kv}; prompts <= {cfg.max_prompt_len} tokens, responses <= "
                f"{cfg.max_response_len} tokens (tool results included), <= {cfg.tool_call_limit} tool "
                f"calls{decode}")

    def snapshot(self):
        """A copy of the sampler's KV cache and slot sequences (`Sampler.snapshot`), to fork branches from after
        the slots are reused; None when the sampler cannot fork (a scripted test policy)."""
        return self.sampler.snapshot() if hasattr(self.sampler, "fork") else None

    @property
    def stats(self):
        """:class:`~appo_jax.rollout.agent_loop.LoopStats` of the last loop run."""
        return self.loop.stats

    def close(self) -> None:
        """Stop the reward threads (after the rewards in flight)."""
        self._reward_pool.shutdown(wait=True)

    def _score(self, request: RolloutRequest, text: str) -> float:
        """The reward of a finished rollout (on a reward thread); its answer accuracy and format check go to
        ``request.meta["accuracy"]`` / ``["format_ok"]`` (the caller data the loop carries to the result; a plain
        float reward has no format check: ok)."""
        out = self.reward_fn(request.meta["item"], text)
        score, accuracy = (out.score, out.accuracy) if isinstance(out, RewardOutput) else (out, float(out) >= 1.0)
        request.meta["accuracy"] = float(accuracy)
        request.meta["format_ok"] = float(out.format_ok) if isinstance(out, RewardOutput) else 1.0
        return float(score)

    def _submit_reward(self, rollout: Rollout) -> Future:
        return self._reward_pool.submit(self._score, rollout.request, rollout.text)

    # -- requests ----------------------------------------------------------------------------------------------
    def _check_prompt(self, item: Record, group: int) -> None:
        if not len(item.prompt_ids):
            raise ValueError(f"prompt {group} (record {item.id!r} of {item.dataset!r}) has no prompt_ids; encode the "
                             "records first (appo_jax.data.encode_records)")
        if len(item.prompt_ids) > self.cfg.max_prompt_len:
            raise ValueError(f"prompt {group} (record {item.id!r} of {item.dataset!r}) has {len(item.prompt_ids)} "
                             f"tokens > max_prompt_len {self.cfg.max_prompt_len}")

    def request(self, key, item: Record, group: int, local: int, *, prompt_ids=None, prefix: Prefix | None = None,
                kind: int = KIND_INIT, parent: int = -1, branch_pos: int = -1, score: float = 0.0) -> RolloutRequest:
        """The request for row ``local`` of prompt group ``group`` (row ``group * rows_per_group + local`` of the
        batch :meth:`rollout` assembles): the prompt of ``item`` (checked against ``max_prompt_len``) or the given
        ``prompt_ids``, sampling key ``fold_in(fold_in(key, group), local)``, an optional response ``prefix`` to
        continue, and the row's ``kind``, ``parent`` row (-1: none; a row of this batch, or of the batch whose tree
        ids :meth:`rollout` receives as ``parent_tree``), ``branch_pos`` and branch ``score``."""
        if prompt_ids is None:
            self._check_prompt(item, group)
            prompt_ids = item.prompt_ids
        return RolloutRequest(list(prompt_ids), jax.random.fold_in(jax.random.fold_in(key, group), local), prefix,
                              meta=dict(item=item, group=int(group), local=int(local), kind=int(kind),
                                        parent=int(parent), branch_pos=int(branch_pos), score=float(score)))

    def branch_prefix(self, parents: Trajectory, row: int, t: int, tool_calls: Sequence[ToolCall] | None = None
                      ) -> Prefix:
        """Response prefix ``[: t + 1]`` of row ``row`` of ``parents``; its tool calls are the first of the row's
        recorded ``tool_calls`` (one per observation run that starts in the prefix) when given, else reconstructed
        from the tokens."""
        end = t + 1
        if not 0 <= end <= parents.tokens.shape[1]:
            raise ValueError(f"branch position {t} outside the response (L = {parents.tokens.shape[1]})")
        tok = np.asarray(parents.tokens[row, :end], np.int32)
        gen = np.asarray(parents.gen_mask[row, :end], bool)
        obs = np.asarray(parents.obs_mask[row, :end], bool)
        if tool_calls is None:
            calls = tool_calls_from_tokens(self.tokenizer, tok, gen, obs)
        else:
            starts = int(np.count_nonzero(obs & ~np.concatenate([[False], obs[:-1]])))
            calls = [ToolCall(c.name, c.input, c.output) for c in list(tool_calls)[:starts]]
        logp = np.asarray(parents.behavior_logp[row, :end], np.float32).copy()
        return Prefix(tok.copy(), gen.copy(), obs.copy(), logp, np.asarray(parents.entropy[row, :end], np.float32).copy(),
                      calls)

    def own_groups(self, num_groups: int) -> range:
        """The prompt groups whose requests this engine runs (all of them; a process of a multi-host job runs its
        block): a scheme may skip building the requests of other groups, which :meth:`rollout` ignores."""
        return range(num_groups)

    # -- the primitive -----------------------------------------------------------------------------------------
    def run(self, requests: Sequence[RolloutRequest], hooks: LoopHooks | None = None, progress=None) -> list[Rollout]:
        """Run requests through the tool loop (``meta["item"]`` must hold their :class:`Record`); the finished
        rollouts in enqueue order. ``progress`` as in :meth:`AgentLoop.run`."""
        return self.loop.run(requests, hooks, progress)

    def rollout(self, requests: Sequence[RolloutRequest], num_groups: int, rows_per_group: int, *,
                hooks: LoopHooks | None = None, progress=None, parent_tree: np.ndarray | None = None) -> RolloutBatch:
        """Run ``requests`` (made by :meth:`request`; ``hooks`` may add requests while the loop runs) and assemble
        the ``num_groups * rows_per_group`` rows, group-major (module doc); rows without a rollout are padding.
        ``tree_id``: parents are rows of this batch, or, with ``parent_tree``, rows of another batch whose tree ids
        it holds (:func:`resolve_tree_ids`). Requests of groups outside ``range(num_groups)`` are an error."""
        batch = self.rollout_block(requests, range(num_groups), rows_per_group, hooks=hooks, progress=progress)
        batch.tree_id = resolve_tree_ids(batch.traj.parent, batch.traj.row_valid, parent_tree)
        return batch

    def rollout_block(self, requests: Sequence[RolloutRequest], groups: range, rows_per_group: int, *,
                      hooks: LoopHooks | None = None, progress=None) -> RolloutBatch:
        """:meth:`rollout` for the prompt groups ``groups`` only (the requests of other groups are skipped): rows
        ``(g - groups.start) * rows_per_group + local``, group ids and parent rows as the requests give them
        (global), ``tree_id`` left -1. What :meth:`rollout` and the host-sharded engine build on."""
        if rows_per_group < 1:
            raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
        mine = [r for r in requests if r.meta["group"] in groups]
        batch = self._assemble(self.run(mine, hooks, progress), groups, rows_per_group)
        batch.kv_forked = self.loop.stats.kv_forked
        return batch

    def _assemble(self, rollouts: Sequence[Rollout], groups: range, rows_per_group: int) -> RolloutBatch:
        """The block of rows of ``groups`` (padding rows: kind branch) from finished rollouts."""
        cfg, num_rows = self.cfg, len(groups) * rows_per_group
        build = TrajectoryBuilder(num_rows, cfg.max_response_len, cfg.max_prompt_len, self.pad_id)
        texts: list[str] = [""] * num_rows
        calls: list[list[ToolCall]] = [[] for _ in range(num_rows)]
        accuracy, format_ok = np.zeros(num_rows, np.float32), np.zeros(num_rows, np.float32)
        for i in range(num_rows):
            build.set_kind(i, KIND_BRANCH)
        taken = np.zeros(num_rows, bool)
        slot = np.full(num_rows, -1, np.int32)
        for ro in rollouts:
            m = ro.request.meta
            if m["group"] not in groups or not 0 <= m["local"] < rows_per_group:
                raise ValueError(f"a request for row {m['local']} of group {m['group']} is outside the batch "
                                 f"(groups {groups.start}..{groups.stop - 1}, {rows_per_group} rows each)")
            i = (m["group"] - groups.start) * rows_per_group + m["local"]
            if taken[i]:
                raise ValueError(f"two requests for row {m['local']} of group {m['group']}")
            taken[i] = True
            build.set_row(i, prompt_ids=ro.request.prompt_ids, tokens=ro.tokens, gen_mask=ro.gen_mask,
                          obs_mask=ro.obs_mask, behavior_logp=ro.logprobs, entropy=ro.entropies, group=m["group"],
                          kind=m["kind"], parent=m["parent"], branch_pos=m["branch_pos"], branch_score=m["score"],
                          reward=ro.reward, tool_calls=len(ro.tool_calls), finish_reason=ro.finish_reason)
            accuracy[i], format_ok[i] = m.get("accuracy", 0.0), m.get("format_ok", 0.0)
            texts[i], calls[i], slot[i] = ro.text, ro.tool_calls, ro.slot
        return RolloutBatch(build.build(), texts, calls, accuracy, np.full(num_rows, -1, np.int32), format_ok, slot)


__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine", "concat_batches", "concat_trajectories",
           "default_tools", "overlay_batches", "resolve_tree_ids", "tool_calls_from_tokens", "tree_ids"]
