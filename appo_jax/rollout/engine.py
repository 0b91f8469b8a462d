"""The rollout engine: question records -> static-shape Trajectory batches (docs/algorithm.md §1.3, §1.7;
docs/protocol.md).

:class:`RolloutEngine` runs the multi-turn tool loop (:mod:`appo_jax.rollout.agent_loop`) on the slots of the
jitted sampler and assembles :class:`~appo_jax.core.trajectory.Trajectory` batches. Prompts are
:class:`~appo_jax.data.records.Record` s whose ``prompt_ids`` are filled (`appo_jax.data.encode_records`):

* ``initial_batch(prompts, n_init, key)``: ``n_init`` rollouts per prompt, row ``g * n_init + i``, kind init;
* ``branches_batch(parents, prompts, rows, positions, scores, valid, key)``: APPO branches, row ``g * B + j``
  continues row ``rows[g, j]`` of ``parents`` from ``prompt + response[: positions[g, j] + 1]`` (tokens, masks,
  behaviour log-probs and entropies of the prefix copied; tool-call count continued), kind branch;
* ``arpo_batch(prompts, n, n_init, key, penalty)`` (ARPO; AEPO with a consecutive-branch penalty) and
  ``tree_batch(prompts, n, n_init, key)`` (Tree-GRPO): full ``n``-row groups, row ``g * n + j``, rows
  ``j < n_init`` the initial rollouts, later rows branches (or ARPO top-ups) whose ``parent`` is a row of the
  same group.

Every row is scored off the decode thread by ``reward_fn(record, text)`` (default: the record's ability reward,
`appo_jax.rewards.RecordReward`). A :class:`RolloutBatch` is the Trajectory plus, per row, the decoded response
text, the tool calls (name, input, output), the answer accuracy and the tree id (row index of the row's root:
itself for initial rows; Tree-GRPO's tree groups).
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
from appo_jax.rollout.agent_loop import (AgentLoop, LoopConfig, Prefix, Rollout, RolloutRequest, ToolCall,
                                         parse_segment_end)
from appo_jax.rollout.arpo import ArpoConfig, ArpoHooks
from appo_jax.rollout.config import RolloutConfig
from appo_jax.rollout.slots import SlotSampler, make_slot_sampler
from appo_jax.rollout.tree import choose_nodes, expansion_counts, round_quota, step_nodes
from appo_jax.tools.registry import ToolRegistry, build_registry


@dataclass
class RolloutBatch:
    """A Trajectory plus host-side per-row extras: decoded response ``texts``, ``tool_calls``, ``accuracy``
    (float32 [N]: the reward's answer accuracy, 0 for padding rows), ``tree_id`` (int32 [N]: row index of the
    row's root, -1 for padding rows) and ``format_ok`` (float32 [N]: 1 where the reward's format check passed,
    0 elsewhere and for padding rows)."""

    traj: Trajectory
    texts: list[str]
    tool_calls: list[list[ToolCall]]
    accuracy: np.ndarray
    tree_id: np.ndarray
    format_ok: np.ndarray


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
                        np.concatenate([a.format_ok, b.format_ok]))


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


@dataclass
class _Row:
    rollout: Rollout | None
    prompt_ids: Sequence[int]
    group: int
    kind: int
    parent: int = -1
    branch_pos: int = -1
    branch_score: float = 0.0


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
            sampler = make_slot_sampler(model_config, params, tokenizer, num_slots=cfg.num_slots,
                                         max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                                         tool_call_limit=cfg.tool_call_limit, temperature=cfg.temperature,
                                         top_p=cfg.top_p, top_k=cfg.top_k,
                                         repetition_penalty=cfg.repetition_penalty, entropy=cfg.entropy,
                                         entropy_k=cfg.entropy_k, decode_chunk=cfg.decode_chunk)
        self.sampler = sampler
        #: added to the group index of every row key (fold_in(fold_in(key, group + offset), local)): a host that
        #: samples groups [o, o + G) of a multi-host batch draws exactly what one process would (host_sharded.py)
        self.key_group_offset = 0
        self.reward_fn = reward_fn if reward_fn is not None else RecordReward("auto")
        self._reward_pool = ThreadPoolExecutor(max(1, min(4, cfg.tool_workers)), thread_name_prefix="reward")
        self.loop = AgentLoop(sampler, tokenizer,
                              LoopConfig(cfg.max_response_len, cfg.tool_call_limit, cfg.decode_chunk,
                                         cfg.probe_len),
                              submit_tool=tools.submit, submit_reward=self._submit_reward,
                              on_event=on_event, pad_id=self.pad_id)

    # -- plumbing ----------------------------------------------------------------------------------------------
    def set_params(self, params) -> None:
        """Use new policy weights for the following rollouts."""
        self.sampler.set_params(params)

    def describe(self) -> str:
        """One line: sampler slots, KV-cache row length and bytes, response budget and tool-call limit."""
        cache = getattr(self.sampler, "cache", None)
        kv = "" if cache is None else (f", KV cache {cache.batch} x {cache.max_len} slots "
                                       f"({(cache.k.nbytes + cache.v.nbytes) / 2**20:.0f} MiB)")
        cfg = self.cfg
        return (f"{cfg.num_slots} sampler slots{kv}; prompts <= {cfg.max_prompt_len} tokens, responses <= "
                f"{cfg.max_response_len} tokens (tool results included), <= {cfg.tool_call_limit} tool calls")

    @property
    def stats(self):
        """:class:`~appo_jax.rollout.agent_loop.LoopStats` of the last loop run."""
        return self.loop.stats

    def close(self) -> None:
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

    def _check_prompts(self, prompts: Sequence[Record]) -> None:
        for g, p in enumerate(prompts):
            if not len(p.prompt_ids):
                raise ValueError(f"prompt {g} (record {p.id!r} of {p.dataset!r}) has no prompt_ids; encode the "
                                 "records first (appo_jax.data.encode_records)")
            if len(p.prompt_ids) > self.cfg.max_prompt_len:
                raise ValueError(f"prompt {g} (record {p.id!r} of {p.dataset!r}) has {len(p.prompt_ids)} tokens > "
                                 f"max_prompt_len {self.cfg.max_prompt_len}")

    def _request(self, key, item: Record, group: int, local: int, *, prompt_ids=None,
                 prefix: Prefix | None = None, kind: int = KIND_INIT, parent: int = -1, branch_pos: int = -1,
                 score: float = 0.0) -> RolloutRequest:
        return RolloutRequest(list(item.prompt_ids if prompt_ids is None else prompt_ids),
                              jax.random.fold_in(jax.random.fold_in(key, group + self.key_group_offset), local),
                              prefix,
                              meta=dict(item=item, group=group, local=local, kind=kind, parent=parent,
                                        branch_pos=branch_pos, score=score))

    def run(self, requests: Sequence[RolloutRequest], hooks=None, progress=None) -> list[Rollout]:
        """Run requests through the tool loop (``meta["item"]`` must hold their :class:`Record`);
        ``progress`` as in :meth:`AgentLoop.run`."""
        return self.loop.run(requests, hooks, progress)

    def _assemble(self, rows: list[_Row], parents_in_batch: bool = True) -> RolloutBatch:
        cfg = self.cfg
        build = TrajectoryBuilder(len(rows), cfg.max_response_len, cfg.max_prompt_len, self.pad_id)
        texts: list[str] = []
        calls: list[list[ToolCall]] = []
        accuracy = np.zeros(len(rows), np.float32)
        format_ok = np.zeros(len(rows), np.float32)
        for i, row in enumerate(rows):
            ro = row.rollout
            build.set_kind(i, row.kind)
            if ro is None:
                texts.append("")
                calls.append([])
                continue
            accuracy[i] = ro.request.meta.get("accuracy", 0.0)
            format_ok[i] = ro.request.meta.get("format_ok", 0.0)
            build.set_row(i, prompt_ids=row.prompt_ids, tokens=ro.tokens, gen_mask=ro.gen_mask, obs_mask=ro.obs_mask,
                          behavior_logp=ro.logprobs, entropy=ro.entropies, group=row.group, kind=row.kind,
                          parent=row.parent, branch_pos=row.branch_pos, branch_score=row.branch_score,
                          reward=ro.reward, tool_calls=len(ro.tool_calls), finish_reason=ro.finish_reason)
            texts.append(ro.text)
            calls.append(ro.tool_calls)
        traj = build.build()
        tree = tree_ids(traj.parent, traj.row_valid) if parents_in_batch else np.full(len(rows), -1, np.int32)
        return RolloutBatch(traj, texts, calls, accuracy, tree, format_ok)

    def _rows_from_rollouts(self, rollouts: list[Rollout], num_rows: int, row_of) -> list[_Row]:
        rows: list[_Row] = [_Row(None, [], -1, KIND_BRANCH) for _ in range(num_rows)]
        for ro in rollouts:
            m = ro.request.meta
            rows[row_of(m)] = _Row(ro, ro.request.prompt_ids, m["group"], m["kind"],
                                   m["parent"], m["branch_pos"], m["score"])
        return rows

    # -- initial rollouts --------------------------------------------------------------------------------------
    def initial_batch(self, prompts: Sequence[Record], n_init: int, key, progress=None) -> RolloutBatch:
        """``n_init`` rollouts per prompt; row ``g * n_init + i`` is rollout ``i`` of prompt ``g`` (kind init,
        rewards filled). ``progress``: see :meth:`run`."""
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        self._check_prompts(prompts)
        reqs = [self._request(key, item, g, i) for g, item in enumerate(prompts) for i in range(n_init)]
        rollouts = self.run(reqs, progress=progress)
        return self._assemble(self._rows_from_rollouts(rollouts, len(reqs),
                                                       lambda m: m["group"] * n_init + m["local"]))

    # -- APPO branches -----------------------------------------------------------------------------------------
    def branch_prefix(self, parents: Trajectory, row: int, t: int) -> Prefix:
        """Response prefix ``[: t + 1]`` of row ``row`` of ``parents`` (tool calls reconstructed from tokens)."""
        end = t + 1
        if not 0 <= end <= parents.tokens.shape[1]:
            raise ValueError(f"branch position {t} outside the response (L = {parents.tokens.shape[1]})")
        tok = np.asarray(parents.tokens[row, :end], np.int32)
        gen = np.asarray(parents.gen_mask[row, :end], bool)
        obs = np.asarray(parents.obs_mask[row, :end], bool)
        return Prefix(tok.copy(), gen.copy(), obs.copy(),
                      np.asarray(parents.behavior_logp[row, :end], np.float32).copy(),
                      np.asarray(parents.entropy[row, :end], np.float32).copy(),
                      tool_calls_from_tokens(self.tokenizer, tok, gen, obs))

    def branches_batch(self, parents: Trajectory, prompts: Sequence[Record], rows, positions, scores, valid,
                       key, progress=None) -> RolloutBatch:
        """APPO branch rollouts (module doc). ``rows`` / ``positions`` / ``scores`` / ``valid`` are ``[G, B]``
        (from ``select_branch_points``); output row ``g * B + j`` is the branch of slot ``(g, j)``; invalid
        slots give padding rows (``row_valid`` False)."""
        rows, positions = np.asarray(rows), np.asarray(positions)
        scores, valid = np.asarray(scores, np.float32), np.asarray(valid, bool)
        if not rows.shape == positions.shape == scores.shape == valid.shape or rows.ndim != 2:
            raise ValueError(f"rows/positions/scores/valid must share one [G, B] shape, got {rows.shape}, "
                             f"{positions.shape}, {scores.shape}, {valid.shape}")
        num_g, budget = rows.shape
        prompt_tokens, prompt_mask = np.asarray(parents.prompt_tokens), np.asarray(parents.prompt_mask)
        group_id = np.asarray(parents.group_id)
        reqs = []
        for g, j in zip(*np.nonzero(valid)):
            r, t = int(rows[g, j]), int(positions[g, j])
            if not 0 <= r < parents.tokens.shape[0]:
                raise ValueError(f"branch slot ({g}, {j}): parent row {r} outside the parent batch")
            grp = int(group_id[r])
            if not 0 <= grp < len(prompts):
                raise ValueError(f"branch slot ({g}, {j}): parent row {r} has group {grp}, "
                                 f"but {len(prompts)} prompts were given")
            req = self._request(key, prompts[grp], int(g), int(j), prompt_ids=prompt_tokens[r][prompt_mask[r]],
                                prefix=self.branch_prefix(parents, r, t), kind=KIND_BRANCH, parent=r,
                                branch_pos=t, score=float(scores[g, j]))
            req.meta.update(group=grp, slot=int(g) * budget + int(j))
            reqs.append(req)
        rollouts = self.run(reqs, progress=progress)
        batch = self._assemble(self._rows_from_rollouts(rollouts, num_g * budget, lambda m: m["slot"]),
                               parents_in_batch=False)
        # branch rows' parents live in `parents`: their tree is their parent's
        parent_tree = tree_ids(np.asarray(parents.parent), np.asarray(parents.row_valid))
        t = batch.traj
        batch.tree_id = np.where(t.row_valid, parent_tree[np.maximum(t.parent, 0)], -1).astype(np.int32)
        return batch

    # -- ARPO / AEPO -------------------------------------------------------------------------------------------
    def arpo_batch(self, prompts: Sequence[Record], n: int, n_init: int, key, penalty: float = 0.0,
                   progress=None) -> RolloutBatch:
        """ARPO groups of ``n`` rows (:mod:`appo_jax.rollout.arpo`; AEPO: a consecutive-branch ``penalty`` > 0);
        row ``g * n + j``, ``parent`` indexes rows of this batch."""
        self._check_prompts(prompts)
        cfg = self.cfg
        acfg = ArpoConfig(cfg.arpo_alpha, cfg.arpo_beta, cfg.arpo_beam, penalty)
        seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))

        def make(g, local, prefix, parent_local, branch_pos, kind):
            return self._request(key, prompts[g], g, local, prefix=prefix, kind=kind,
                                 parent=-1 if parent_local < 0 else g * n + parent_local, branch_pos=branch_pos)

        hooks = ArpoHooks(len(prompts), n, n_init, self.vocab_size, acfg, seed, make)
        rollouts = self.run(hooks.initial_requests(), hooks, progress)
        return self._assemble(self._rows_from_rollouts(rollouts, len(prompts) * n,
                                                       lambda m: m["group"] * n + m["local"]))

    # -- Tree-GRPO ---------------------------------------------------------------------------------------------
    def tree_batch(self, prompts: Sequence[Record], n: int, n_init: int, key, progress=None) -> RolloutBatch:
        """Tree-GRPO groups of ``n`` rows (:mod:`appo_jax.rollout.tree`): rows ``g * n + i``, ``i < n_init``,
        are the tree roots; expansions follow in creation order with ``parent`` / ``branch_pos`` set and
        ``tree_id`` = their root row."""
        self._check_prompts(prompts)
        quota = expansion_counts(n, n_init)
        length = self.cfg.max_response_len
        rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
        done: dict[int, Rollout] = {}     # batch row -> rollout
        root: dict[int, int] = {}         # batch row -> tree root row
        reqs = [self._request(key, item, g, i) for g, item in enumerate(prompts) for i in range(n_init)]
        count = [n_init] * len(prompts)
        remaining = {g * n + i: quota[i] for g in range(len(prompts)) for i in range(n_init)}
        for rnd in range(self.cfg.tree_rounds + 1):
            for ro in self.run(reqs, progress=progress):
                m = ro.request.meta
                r = m["group"] * n + m["local"]
                done[r] = ro
                root[r] = r if m["parent"] < 0 else root[m["parent"]]
            rounds_left = self.cfg.tree_rounds - rnd
            if rounds_left <= 0:
                break
            reqs = []
            for tree_root, left in remaining.items():
                k = round_quota(left, rounds_left)
                if k == 0:
                    continue
                remaining[tree_root] = left - k
                members = [r for r in done if root[r] == tree_root]
                nodes = [(r, t) for r in members
                         for t in step_nodes(done[r].obs_mask, length, done[r].request.meta["branch_pos"])]
                picked = choose_nodes(nodes, k, rng) if nodes else [(tree_root, -1)] * k
                g = tree_root // n
                for r, t in picked:
                    prefix = done[r].prefix(t + 1) if t >= 0 else None
                    reqs.append(self._request(key, prompts[g], g, count[g], prefix=prefix, kind=KIND_BRANCH,
                                              parent=r, branch_pos=t))
                    count[g] += 1
        rows = self._rows_from_rollouts(list(done.values()), len(prompts) * n,
                                        lambda m: m["group"] * n + m["local"])
        return self._assemble(rows)


__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine", "concat_batches", "concat_trajectories",
           "default_tools", "tool_calls_from_tokens", "tree_ids"]
