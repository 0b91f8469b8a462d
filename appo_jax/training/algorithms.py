"""The RL iteration of every algorithm, built from the core functions and the rollout engine (docs/algorithm.md §1, §3).

One iteration (:meth:`Collector.collect`) turns a batch of prompts into a train batch:

    appo family   initial(n_init) -> lc = logp_theta, lb = baseline logp -> Omega = future_values(lc - lb)
                  -> BS = branching_scores(H, Omega) (ablations: Omega := 1 or H := 1) -> select_branch_points
                  -> branches(n - n_init per prompt) -> rewards -> appo advantages (dual groups, prefix
                  credit, procedure scaling) -> train rows = the initial rollouts
    grpo / dapo   initial(n) [dapo: dynamic sampling] -> GRPO advantages -> train rows = all rollouts
    arpo / aepo   engine.arpo(n, n_init) -> ARPO (GRPO over all n) / AEPO entropy-aware advantages -> all rows
    tree_grpo     engine.tree(n, n_init) -> prompt-group + tree-group GRPO -> all rows

``omega_baseline`` picks lb (docs/algorithm.md §1.1): ``sampler`` (the behaviour log-probs the sampler recorded),
``lagged`` (log-probs under the policy of ``omega_lag`` RL iterations ago; the current policy before that many
iterations exist, i.e. Omega = 1 and entropy-only ranking) or ``reference`` (the reference model). The PPO
``old_logp`` is lc, the current policy's recomputed log-probs; ``ref_logp`` feeds the KL term.

All array work runs in jitted functions over the mesh (rows sharded over ``data x fsdp``); only the rollout
engine, the reward functions and the assembly of DAPO's kept groups touch the host.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.core.advantages import advantages_from_trajectory
from appo_jax.core.branching import branching_scores, future_values, select_branch_points
from appo_jax.core.candidates import candidate_mask
from appo_jax.core.trajectory import FINISH_NAMES, KIND_INIT, Trajectory
from appo_jax.models.config import ModelConfig
from appo_jax.rollout.engine import RolloutBatch, concat_batches
from appo_jax.training.config import AlgorithmSpec, ExperimentConfig
from appo_jax.training.logprobs import token_logprobs


# ------------------------------------------------------------------------------------------------ placement
class Placer:
    """Puts host arrays on the mesh: rows (axis 0) over ``data x fsdp``, or on the default device."""

    def __init__(self, mesh=None):
        self.mesh = mesh

    def rows(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        from appo_jax.parallel.rules import batch_sharding
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

    def traj(self, traj: Trajectory) -> Trajectory:
        return jax.tree_util.tree_map(self.rows, traj)

    def context(self):
        import contextlib
        if self.mesh is None:
            return contextlib.nullcontext()
        from appo_jax.parallel.rules import activation_sharding
        return activation_sharding(self.mesh)


# ------------------------------------------------------------------------------------------------ jitted parts
@lru_cache(maxsize=32)
def make_logprob_fn(config: ModelConfig, *, chunk: int, temperature: float, micro_rows: int = 0):
    """(Cached) jitted ``(params, prompt_tokens, prompt_mask, tokens, response_mask) -> logp [N, L]`` evaluated in
    row micro-batches of ``micro_rows`` (0 = all rows at once; rows ``j U + u`` form micro-batch u, which keeps
    the split local to each data shard)."""

    def fn(params, prompt_tokens, prompt_mask, tokens, response_mask):
        n, length = tokens.shape
        micro = micro_rows if micro_rows and n % micro_rows == 0 else n
        u, m = n // micro, micro
        inputs = (prompt_tokens, prompt_mask, tokens, response_mask)
        xs = tuple(jnp.moveaxis(x.reshape((m, u) + x.shape[1:]), 1, 0) for x in inputs)

        def one(args):
            return token_logprobs(params, *args, config=config, chunk=chunk, temperature=temperature)[0]

        out = jax.lax.map(one, xs)  # [U, m, L]
        return jnp.moveaxis(out, 0, 1).reshape(n, length)

    return jax.jit(fn)


@partial(jax.jit, static_argnames=("num_groups", "budget", "score", "gamma", "clip_eps"))
def branch_points(lc, lb, entropy, gen_mask, tokens, table, group_id, max_response_len, *, num_groups: int,
                  budget: int, score: str = "appo", gamma: float = 1.0, clip_eps: float = 0.2):
    """Omega, Branching Scores and the selected branch points of the initial rollouts (docs/algorithm.md §1.1-§1.2).

    ``score``: ``appo`` (Z(H) Z(Omega)), ``entropy`` (Omega := 1, so BS = Z(H)) or ``omega`` (H := 1, so
    BS = Z(Omega)). Returns ``(omega, scores, strict, candidates, (rows, positions, sel_scores, valid))``.
    """
    omega = future_values(lc - lb, gen_mask, gamma, clip_eps)
    cand = candidate_mask(tokens, gen_mask, table, max_response_len)
    ent = jnp.ones_like(entropy) if score == "omega" else entropy
    om = jnp.ones_like(omega) if score == "entropy" else omega
    scores, strict = branching_scores(ent, om, cand)
    selection = select_branch_points(scores, strict, cand, group_id, num_groups, budget)
    return omega, scores, strict, cand, selection


@partial(jax.jit, static_argnames=("name", "num_groups", "num_trees", "options"))
def trajectory_advantages(traj: Trajectory, tree_ids, *, name: str, num_groups: int, num_trees: int | None,
                          options: tuple):
    """``advantages_from_trajectory(name, traj, num_groups, **options)`` (jitted; ``tree_ids`` for Tree-GRPO)."""
    extra = dict(options)
    if name == "tree_grpo":
        extra.update(tree_ids=tree_ids, num_trees=num_trees)
    return advantages_from_trajectory(name, traj, num_groups, **extra)


# ------------------------------------------------------------------------------------------------ host helpers
def select_groups(batches: Sequence[tuple[RolloutBatch, int]], n: int, num_groups: int, pad_id: int = 0
                  ) -> RolloutBatch:
    """A batch of ``num_groups`` groups of ``n`` rows made of chosen groups of earlier batches
    (``(batch, group)`` pairs, rows ``g n .. g n + n - 1`` of an independent-sampling batch), renumbered
    0, 1, ...; missing groups become padding rows (``row_valid`` False)."""
    ref = batches[0][0].traj if batches else None
    if ref is None:
        raise ValueError("select_groups needs at least one group")
    out = Trajectory.empty(num_groups * n, ref.tokens.shape[1], ref.prompt_tokens.shape[1], pad_id)
    texts, calls = [""] * (num_groups * n), [[] for _ in range(num_groups * n)]
    for new_g, (batch, g) in enumerate(batches[:num_groups]):
        src = slice(g * n, (g + 1) * n)
        dst = slice(new_g * n, (new_g + 1) * n)
        for name in out.__dataclass_fields__:
            getattr(out, name)[dst] = np.asarray(getattr(batch.traj, name))[src]
        out.group_id[dst] = np.where(out.row_valid[dst], new_g, -1)
        texts[dst] = batch.texts[src]
        calls[dst] = batch.tool_calls[src]
    tree = np.where(out.row_valid, np.arange(num_groups * n), -1).astype(np.int32)
    return RolloutBatch(out, texts, calls, tree)


def _mean(x, mask) -> float:
    x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
    return float(x[mask].mean()) if mask.any() else 0.0


def _std(x, mask) -> float:
    x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
    return float(x[mask].std()) if mask.any() else 0.0


def rollout_metrics(traj: Trajectory, rows: np.ndarray, accuracy: np.ndarray | None, prefix: str = "") -> dict:
    """Reward / length / tool / entropy / finish statistics over the valid rows among ``rows`` (bool [N])."""
    valid = np.asarray(traj.row_valid, bool) & rows
    gen, obs = np.asarray(traj.gen_mask, bool), np.asarray(traj.obs_mask, bool)
    out = {
        f"{prefix}reward/mean": _mean(traj.reward, valid),
        f"{prefix}reward/std": _std(traj.reward, valid),
        f"{prefix}response/length": _mean((gen | obs).sum(1), valid),
        f"{prefix}response/generated_tokens": _mean(gen.sum(1), valid),
        f"{prefix}tools/calls_per_rollout": _mean(traj.tool_calls, valid),
        f"{prefix}entropy/mean": _mean(traj.entropy, gen & valid[:, None]),
        f"{prefix}rollouts/count": float(valid.sum()),
    }
    if accuracy is not None:
        out[f"{prefix}reward/accuracy"] = _mean(accuracy, valid)
    for code, name in enumerate(FINISH_NAMES):
        if code:
            out[f"{prefix}finish/{name}_frac"] = _mean(np.asarray(traj.finish_reason) == code, valid)
    return out


# ------------------------------------------------------------------------------------------------ collection
@dataclass
class Collected:
    """One iteration's rollouts and train batch. ``batch``: the full RolloutBatch (initial rows first, then
    branch rows for APPO); ``train_rows``: number of leading rows that enter the update (the update uses
    ``batch.traj`` rows ``[:train_rows]``); ``advantages`` / ``old_logp`` / ``ref_logp`` for those rows;
    ``branching``: host arrays of Omega / scores / candidates / selection for the rollout dump (APPO only)."""

    batch: RolloutBatch
    train_rows: int
    train_branches: bool
    advantages: Any
    old_logp: Any
    ref_logp: Any
    metrics: dict = field(default_factory=dict)
    branching: dict | None = None


class Collector:
    """Runs the rollout phase of one RL iteration for the algorithm of ``cfg`` (module doc).

    ``engine``: a :class:`~appo_jax.rollout.engine.RolloutEngine` holding the current policy; ``logprob_fn``
    from :func:`make_logprob_fn`; ``candidate_table``: ``bool[V]`` of branch candidates; ``accuracy_of``:
    ``(item, text) -> float`` (answer accuracy for the metrics) or None.
    """

    def __init__(self, cfg: ExperimentConfig, spec: AlgorithmSpec, engine, logprob_fn: Callable,
                 candidate_table, placer: Placer, accuracy_of: Callable | None = None):
        self.cfg, self.spec, self.engine = cfg, spec, engine
        self.logprob_fn, self.placer, self.accuracy_of = logprob_fn, placer, accuracy_of
        self.table = jnp.asarray(candidate_table)
        a = cfg.algorithm
        opts = dict(norm_by_std=a.norm_by_std)
        if spec.advantage == "appo":
            opts.update(procedure_scaling=spec.procedure_scaling, reward_scale_discount=a.reward_scale_discount,
                        prefix_credit=spec.prefix_credit)
        if spec.advantage == "aepo":
            opts.update(entropy_alpha=a.aepo_entropy_alpha)
        self.adv_options = tuple(sorted(opts.items()))

    # -- pieces ----------------------------------------------------------------------------------------------
    def _logp(self, params, traj: Trajectory):
        t = self.placer
        with t.context():
            return self.logprob_fn(params, t.rows(traj.prompt_tokens), t.rows(traj.prompt_mask), t.rows(traj.tokens),
                                   t.rows(np.asarray(traj.gen_mask) | np.asarray(traj.obs_mask)))

    def _accuracy(self, batch: RolloutBatch, prompts_of_row: Sequence) -> np.ndarray | None:
        if self.accuracy_of is None:
            return None
        acc = np.zeros(len(batch.texts), np.float32)
        for i, (item, text) in enumerate(zip(prompts_of_row, batch.texts)):
            if item is not None and batch.traj.row_valid[i]:
                acc[i] = self.accuracy_of(item, text)
        return acc

    def _advantages(self, batch: RolloutBatch, num_groups: int):
        traj = self.placer.traj(batch.traj)
        tree = self.placer.rows(batch.tree_id if batch.tree_id is not None else np.full(traj.num_rows, -1))
        return trajectory_advantages(traj, tree, name=self.spec.advantage, num_groups=num_groups,
                                     num_trees=batch.traj.num_rows, options=self.adv_options)

    # -- entry point -----------------------------------------------------------------------------------------
    def collect(self, next_prompts: Callable[[int], list], params, ref_params, lagged_params, key) -> Collected:
        """One iteration's rollouts, log-probs, branching, rewards and advantages (module doc).
        ``next_prompts(k)`` draws k prompts from the data iterator (DAPO may call it several times)."""
        if self.spec.rollout == "appo":
            return self._collect_appo(next_prompts, params, ref_params, lagged_params, key)
        return self._collect_full_groups(next_prompts, params, ref_params, key)

    def _collect_appo(self, next_prompts, params, ref_params, lagged_params, key) -> Collected:
        cfg, a = self.cfg, self.cfg.algorithm
        g_count, n_init, budget = cfg.train.prompts_per_step, a.n_init, a.n - a.n_init
        k_init, k_branch = jax.random.split(key)
        times = {}
        t0 = time.perf_counter()
        prompts = next_prompts(g_count)
        init = self.engine.initial_batch(prompts, n_init, k_init)
        times["time/rollout_s"] = time.perf_counter() - t0
        traj0 = init.traj

        t0 = time.perf_counter()
        lc = self._logp(params, traj0)
        ref = self._logp(ref_params, traj0) if ref_params is not None else None
        if a.omega_baseline == "sampler":
            lb = self.placer.rows(traj0.behavior_logp)
        elif a.omega_baseline == "reference":
            lb = ref
        else:
            lb = self._logp(lagged_params, traj0) if lagged_params is not None else lc
        jax.block_until_ready((lc, lb))
        times["time/logprobs_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        p = self.placer
        group = np.where(traj0.row_valid, traj0.group_id, -1)
        omega, scores, strict, cand, sel = branch_points(
            lc, lb, p.rows(traj0.entropy), p.rows(traj0.gen_mask), p.rows(traj0.tokens), self.table,
            p.rows(group), cfg.rollout.max_response_len, num_groups=g_count, budget=budget,
            score=self.spec.score, gamma=float(a.omega_gamma), clip_eps=float(a.omega_clip))
        rows, positions, sel_scores, valid = (np.asarray(x) for x in sel)
        times["time/branching_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        branches = self.engine.branches_batch(traj0, prompts, rows, positions, sel_scores, valid, k_branch)
        times["time/branch_rollout_s"] = time.perf_counter() - t0
        full = concat_batches(init, branches)

        t0 = time.perf_counter()
        adv = self._advantages(full, g_count)
        train_rows = g_count * n_init
        adv = adv[:train_rows]
        jax.block_until_ready(adv)
        times["time/advantages_s"] = time.perf_counter() - t0

        prompt_of_row = [prompts[g] if g >= 0 else None for g in np.asarray(full.traj.group_id)]
        acc = self._accuracy(full, prompt_of_row)
        is_init = np.asarray(full.traj.kind) == KIND_INIT
        metrics = rollout_metrics(full.traj, is_init, acc)
        metrics.update({k: v for k, v in rollout_metrics(full.traj, ~is_init, acc, "branch_").items()
                        if k.startswith("branch_reward/") or k == "branch_rollouts/count"})
        gen0 = np.asarray(traj0.gen_mask) & np.asarray(traj0.row_valid)[:, None]
        omega_h, scores_h, cand_h = np.asarray(omega), np.asarray(scores), np.asarray(cand)
        log_ratio = np.asarray(lc) - np.asarray(lb)
        metrics.update({
            "branch/count": float(branches.traj.row_valid.sum()),
            "branch/groups_without_candidates": float((~valid.any(axis=1)).sum()) if budget else 0.0,
            "branch/score_mean": _mean(sel_scores, valid),
            "branch/score_max": float(sel_scores[valid].max()) if valid.any() else 0.0,
            "branch/score_min": float(sel_scores[valid].min()) if valid.any() else 0.0,
            "branch/strict_frac": _mean(np.asarray(strict)[rows.clip(0), positions.clip(0)], valid),
            "branch/position_mean": _mean(positions, valid),
            "branch/candidates_per_rollout": _mean(cand_h.sum(1), np.asarray(traj0.row_valid)),
            "omega/mean": _mean(omega_h, gen0),
            "omega/min": float(omega_h[gen0].min()) if gen0.any() else 0.0,
            "omega/max": float(omega_h[gen0].max()) if gen0.any() else 0.0,
            "omega/abs_log_ratio_mean": _mean(np.abs(log_ratio), gen0),
        })
        metrics.update(self._adv_metrics(adv, full.traj.loss_mask[:train_rows]))
        metrics.update(times)
        metrics["throughput/rollout_tokens_per_s"] = float(
            (np.asarray(full.traj.gen_mask).sum()) / max(times["time/rollout_s"] + times["time/branch_rollout_s"],
                                                         1e-9))
        branching = dict(omega=omega_h, scores=scores_h, candidates=cand_h, strict=np.asarray(strict),
                         rows=rows, positions=positions, sel_scores=sel_scores, valid=valid)
        return Collected(full, train_rows, False, adv, lc, ref, metrics, branching)

    def _collect_full_groups(self, next_prompts, params, ref_params, key) -> Collected:
        cfg, a, spec = self.cfg, self.cfg.algorithm, self.spec
        g_count, n = cfg.train.prompts_per_step, a.n
        times = {}
        t0 = time.perf_counter()
        metrics = {}
        if spec.rollout == "independent" and spec.dynamic_sampling:
            batch, prompts, ds = self._dynamic_sampling(next_prompts, key)
            metrics.update(ds)
        else:
            prompts = next_prompts(g_count)
            if spec.rollout == "independent":
                batch = self.engine.initial_batch(prompts, n, key)
            elif spec.rollout in ("arpo", "aepo"):
                batch = self.engine.arpo_batch(prompts, n, a.n_init, key, variant=spec.rollout)
            elif spec.rollout == "tree":
                batch = self.engine.tree_batch(prompts, n, a.n_init, key)
            else:
                raise ValueError(f"unknown rollout kind {spec.rollout!r}")
        times["time/rollout_s"] = time.perf_counter() - t0
        traj = batch.traj

        t0 = time.perf_counter()
        lc = self._logp(params, traj)
        ref = self._logp(ref_params, traj) if ref_params is not None else None
        jax.block_until_ready(lc)
        times["time/logprobs_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        adv = self._advantages(batch, g_count)
        jax.block_until_ready(adv)
        times["time/advantages_s"] = time.perf_counter() - t0

        prompt_of_row = [prompts[g] if g >= 0 else None for g in np.asarray(traj.group_id)]
        acc = self._accuracy(batch, prompt_of_row)
        all_rows = np.ones(traj.num_rows, bool)
        metrics.update(rollout_metrics(traj, all_rows, acc))
        is_branch = np.asarray(traj.is_branch) & np.asarray(traj.row_valid)
        metrics["branch/count"] = float(is_branch.sum())
        loss_mask = np.asarray(traj.gen_mask) & np.asarray(traj.row_valid)[:, None]
        metrics.update(self._adv_metrics(adv, loss_mask))
        metrics.update(times)
        metrics["throughput/rollout_tokens_per_s"] = float(
            np.asarray(traj.gen_mask).sum() / max(times["time/rollout_s"], 1e-9))
        return Collected(batch, traj.num_rows, spec.train_branches or spec.rollout == "independent", adv, lc, ref,
                         metrics)

    def _dynamic_sampling(self, next_prompts, key):
        """DAPO: keep groups whose rewards are not all equal; refill with fresh prompts up to
        ``max_resample_rounds`` extra rounds; pad with empty groups if still short."""
        cfg, a = self.cfg, self.cfg.algorithm
        g_count, n = cfg.train.prompts_per_step, a.n
        kept: list[tuple[RolloutBatch, int]] = []
        kept_prompts = []
        sampled = 0
        first_rewards = None
        rounds = 0
        for rounds in range(a.max_resample_rounds + 1):
            need = g_count - len(kept)
            if need <= 0:
                break
            prompts = next_prompts(g_count)
            batch = self.engine.initial_batch(prompts, n, jax.random.fold_in(key, rounds))
            r = np.asarray(batch.traj.reward).reshape(g_count, n)
            ok = np.asarray(batch.traj.row_valid).reshape(g_count, n)
            if first_rewards is None:
                first_rewards = r[ok]
            sampled += g_count
            for g in range(g_count):
                vals = r[g][ok[g]]
                if len(kept) < g_count and vals.size > 1 and np.ptp(vals) > 0:
                    kept.append((batch, g))
                    kept_prompts.append(prompts[g])
        out = select_groups(kept, n, g_count, self.engine.pad_id) if kept else _empty_batch(batch, g_count, n,
                                                                                                self.engine.pad_id)
        kept_prompts += [None] * (g_count - len(kept_prompts))
        metrics = {"dynamic_sampling/kept_groups": float(len(kept)), "dynamic_sampling/sampled_groups": float(sampled),
                   "dynamic_sampling/rounds": float(rounds + 1),
                   "dynamic_sampling/sampled_reward_mean": float(first_rewards.mean()) if first_rewards.size else 0.0}
        return out, kept_prompts, metrics

    @staticmethod
    def _adv_metrics(adv, mask) -> dict:
        a = np.asarray(adv)
        m = np.asarray(mask, bool)
        return {"advantage/mean": _mean(a, m), "advantage/abs_mean": _mean(np.abs(a), m),
                "advantage/nonzero_frac": _mean(a != 0, m)}


def _empty_batch(like: RolloutBatch, num_groups: int, n: int, pad_id: int) -> RolloutBatch:
    t = Trajectory.empty(num_groups * n, like.traj.tokens.shape[1], like.traj.prompt_tokens.shape[1], pad_id)
    return RolloutBatch(t, [""] * (num_groups * n), [[] for _ in range(num_groups * n)],
                        np.full(num_groups * n, -1, np.int32))
