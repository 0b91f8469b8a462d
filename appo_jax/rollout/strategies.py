"""How an algorithm draws its rollouts: one interface, one class per kind, chosen by name (docs/algorithm.md §1.3,
§1.7).

A strategy turns ``num_prompts`` prompts into a :class:`Sampled`: the rollout batch (group-major rows), the
prompt of each group, how many leading rows enter the policy update, and what it computed on the way (APPO's
branch points and the current-policy log-probs of the initial rows). Every strategy is built by
``STRATEGIES[name](**options)`` from the same keyword options (each takes what it needs):

    independent   n rollouts per prompt                                         (GRPO, DAPO)
    appo          n_init initial rollouts, then n - n_init branches at the best Branching Scores
    arpo / aepo   entropy-triggered branching after tool results (AEPO: consecutive-branch penalty)
    tree          Tree-GRPO step-level tree expansion

`DynamicSampling` wraps `Independent` for DAPO (keep groups whose rewards are not all equal).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from appo_jax.core.branch_points import BranchPoints, choose_branch_points
from appo_jax.core.registry import Registry
from appo_jax.core.trajectory import Trajectory, TrajectoryBuilder
from appo_jax.data.records import Record
from appo_jax.rollout.engine import RolloutBatch, RolloutEngine, concat_batches

#: ``logprobs(traj) -> (lc, lb)``: current-policy and behaviour-baseline log-probs ``[N, L]`` of a batch.
LogProbs = Callable[[Trajectory], tuple[jax.Array, jax.Array]]


@dataclass
class Sampled:
    """One iteration's rollouts. ``batch``: rows group-major (APPO: the initial rows, then the branch rows);
    ``prompts``: the prompt of each group (None for a padding group); ``train_rows``: leading rows that enter the
    update; ``old_logp``: current-policy log-probs of those rows when the strategy computed them (else None);
    ``branching``: APPO's branch points (host arrays); ``metrics``: timings and strategy statistics."""

    batch: RolloutBatch
    prompts: list[Record | None]
    train_rows: int
    old_logp: Any = None
    branching: BranchPoints | None = None
    metrics: dict = field(default_factory=dict)


class RolloutStrategy(Protocol):
    """What the trainer and the ``rollout`` CLI call."""

    #: concurrent rollouts per prompt (sizes the sampler)
    rollouts_per_prompt: int
    #: rows per prompt that enter the update
    train_rows_per_prompt: int

    def sample(self, engine: RolloutEngine, next_prompts: Callable[[int], list[Record]], num_prompts: int, key,
               progress=None) -> Sampled:
        """Draw ``num_prompts`` prompts with ``next_prompts`` and sample their rollouts."""


def _check_budget(n: int, n_init: int, branches: bool = False) -> None:
    """``1 <= n_init <= n`` (``< n`` when the strategy needs a branch budget ``n - n_init >= 1``)."""
    if n < 1:
        raise ValueError(f"algorithm.n={n}; expected at least 1 rollout per prompt")
    if not 1 <= n_init <= n:
        raise ValueError(f"algorithm.n_init={n_init} must be in [1, algorithm.n={n}]")
    if branches and n_init == n:
        raise ValueError(f"algorithm.n_init={n_init} equals algorithm.n: branching needs a branch budget "
                         "n - n_init >= 1")


def _timed(metrics: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    metrics[name] = metrics.get(name, 0.0) + time.perf_counter() - t0
    return out


@dataclass
class _EveryRowTrains:
    """Strategies that sample ``n`` rows per prompt, all of which train; `_draw` makes the batch."""

    n: int

    @property
    def rollouts_per_prompt(self) -> int:
        return self.n

    @property
    def train_rows_per_prompt(self) -> int:
        return self.n

    def sample(self, engine, next_prompts, num_prompts, key, progress=None) -> Sampled:
        metrics: dict = {}
        prompts = next_prompts(num_prompts)
        batch = _timed(metrics, "time/rollout_s", self._draw, engine, prompts, key, progress)
        return Sampled(batch, list(prompts), num_prompts * self.n, metrics=metrics)

    def _draw(self, engine: RolloutEngine, prompts, key, progress) -> RolloutBatch:
        raise NotImplementedError


@dataclass
class Independent(_EveryRowTrains):
    """``n`` independent rollouts per prompt; every row trains."""

    def __post_init__(self):
        _check_budget(self.n, 1)

    def _draw(self, engine, prompts, key, progress):
        return engine.initial_batch(prompts, self.n, key, progress)


@dataclass
class DynamicSampling:
    """DAPO's dynamic sampling over `Independent`: keep the groups whose rewards are not all equal, refill with
    fresh prompts for up to ``max_rounds`` extra rounds, pad with empty groups if still short."""

    base: Independent
    max_rounds: int

    def __post_init__(self):
        if not isinstance(self.base, Independent):
            raise ValueError(f"dynamic sampling needs independent rollouts, not {type(self.base).__name__}")

    @property
    def rollouts_per_prompt(self) -> int:
        return self.base.n

    @property
    def train_rows_per_prompt(self) -> int:
        return self.base.n

    def sample(self, engine, next_prompts, num_prompts, key, progress=None) -> Sampled:
        n = self.base.n
        kept: list[tuple[RolloutBatch, int, Record]] = []
        metrics: dict = {}
        sampled, first_rewards, rounds = 0, None, 0
        for rounds in range(self.max_rounds + 1):
            if len(kept) >= num_prompts:
                break
            prompts = next_prompts(num_prompts)
            batch = _timed(metrics, "time/rollout_s", engine.initial_batch, prompts, n,
                           jax.random.fold_in(key, rounds), progress)
            r = np.asarray(batch.traj.reward).reshape(num_prompts, n)
            ok = np.asarray(batch.traj.row_valid).reshape(num_prompts, n)
            first_rewards = r[ok] if first_rewards is None else first_rewards
            sampled += num_prompts
            for g in range(num_prompts):
                values = r[g][ok[g]]
                if len(kept) < num_prompts and values.size > 1 and np.ptp(values) > 0:
                    kept.append((batch, g, prompts[g]))
        out = select_groups([(b, g) for b, g, _ in kept], n, num_prompts, engine.pad_id, like=batch)
        metrics.update({"dynamic_sampling/kept_groups": float(len(kept)),
                        "dynamic_sampling/sampled_groups": float(sampled),
                        "dynamic_sampling/rounds": float(rounds + 1),
                        "dynamic_sampling/sampled_reward_mean": float(first_rewards.mean())
                        if first_rewards.size else 0.0})
        prompts_out = [p for _, _, p in kept] + [None] * (num_prompts - len(kept))
        return Sampled(out, prompts_out, num_prompts * n, metrics=metrics)


def select_groups(groups: Sequence[tuple[RolloutBatch, int]], n: int, num_groups: int, pad_id: int,
                  like: RolloutBatch) -> RolloutBatch:
    """A batch of ``num_groups`` groups of ``n`` rows made of chosen groups ``(batch, group)`` of earlier
    independent-sampling batches (rows ``g n .. g n + n - 1``), renumbered 0, 1, ...; missing groups become
    padding rows (``row_valid`` False). ``like`` gives the static shapes."""
    t = like.traj
    build = TrajectoryBuilder(num_groups * n, t.tokens.shape[1], t.prompt_tokens.shape[1], pad_id)
    texts, calls = [""] * (num_groups * n), [[] for _ in range(num_groups * n)]
    accuracy = np.zeros(num_groups * n, np.float32)
    format_ok = np.zeros(num_groups * n, np.float32)
    for new_g, (batch, g) in enumerate(groups[:num_groups]):
        src, dst = slice(g * n, (g + 1) * n), slice(new_g * n, (new_g + 1) * n)
        build.copy_rows(dst, batch.traj, src, group=new_g)
        texts[dst], calls[dst] = batch.texts[src], batch.tool_calls[src]
        accuracy[dst] = batch.accuracy[src]
        format_ok[dst] = batch.format_ok[src]
    traj = build.build()
    tree = np.where(traj.row_valid, np.arange(num_groups * n), -1).astype(np.int32)
    return RolloutBatch(traj, texts, calls, accuracy, tree, format_ok)


@dataclass
class AppoBranching:
    """APPO (docs/algorithm.md §1.1-§1.3): ``n_init`` initial rollouts per prompt; ``logprobs`` gives their
    current and baseline log-probs; `choose_branch_points` picks ``n - n_init`` branch points per prompt with
    the ``score`` mode and the ``parity`` arithmetic; the branches continue their parents' prefixes. Only the
    initial rows train; their current log-probs are returned as ``old_logp``. ``place`` puts a host Trajectory
    where the jitted selection runs (the trainer's mesh)."""

    n: int
    n_init: int
    table: Any
    logprobs: LogProbs
    score: str = "appo"
    gamma: float = 1.0
    clip_eps: float = 0.2
    place: Callable[[Trajectory], Trajectory] = lambda t: t
    labeller: Callable[[Trajectory, Sequence], np.ndarray] | None = None
    parity: str = "appo_jax"
    to_host: Callable = jax.device_get

    def __post_init__(self):
        _check_budget(self.n, self.n_init, branches=True)

    @property
    def rollouts_per_prompt(self) -> int:
        return max(self.n_init, self.n - self.n_init)

    @property
    def train_rows_per_prompt(self) -> int:
        return self.n_init

    def sample(self, engine, next_prompts, num_prompts, key, progress=None) -> Sampled:
        k_init, k_branch = jax.random.split(key)
        metrics: dict = {}
        prompts = next_prompts(num_prompts)
        init = _timed(metrics, "time/rollout_s", engine.initial_batch, prompts, self.n_init, k_init, progress)
        lc, lb = self.to_host(_timed(metrics, "time/logprobs_s", self.logprobs, init.traj))
        decisions = None
        if self.score == "oracle":
            if self.labeller is None:
                raise ValueError("the oracle branching score needs a decision-token labeller (a generated task with "
                                 "labelled decisions, e.g. kb_multihop or arith_program)")
            decisions = self.labeller(init.traj, prompts)
        points = _timed(metrics, "time/branching_s", choose_branch_points, self.place(init.traj), lc, lb,
                        self.table, num_groups=num_prompts, budget=self.n - self.n_init, score=self.score,
                        gamma=self.gamma, clip_eps=self.clip_eps, decisions=decisions, parity=self.parity)
        points = self.to_host(points)
        branches = _timed(metrics, "time/branch_rollout_s", engine.branches_batch, init.traj, prompts,
                          points.rows, points.positions, points.selected_scores, points.valid, k_branch, progress)
        metrics["omega/abs_log_ratio_mean"] = _masked_abs_mean(np.asarray(lc) - np.asarray(lb), init.traj)
        return Sampled(concat_batches(init, branches), list(prompts), num_prompts * self.n_init, old_logp=lc,
                       branching=points, metrics=metrics)


def _masked_abs_mean(x: np.ndarray, traj: Trajectory) -> float:
    mask = np.asarray(traj.gen_mask) & np.asarray(traj.row_valid)[:, None]
    return float(np.abs(x)[mask].mean()) if mask.any() else 0.0


@dataclass
class ArpoBranching(_EveryRowTrains):
    """ARPO / AEPO (docs/algorithm.md §1.7): groups of ``n`` rows grown by entropy-triggered copies after tool
    results (consecutive-branch ``penalty`` 0 for ARPO, ``rollout.aepo_penalty`` for AEPO); every row trains."""

    n_init: int = 1
    penalty: float = 0.0

    def __post_init__(self):
        _check_budget(self.n, self.n_init)

    def _draw(self, engine, prompts, key, progress):
        return engine.arpo_batch(prompts, self.n, self.n_init, key, self.penalty, progress)


@dataclass
class TreeSearch(_EveryRowTrains):
    """Tree-GRPO (docs/algorithm.md §1.7): ``n_init`` trees per prompt expanded at random step nodes to ``n``
    rows; every row trains."""

    n_init: int = 1

    def __post_init__(self):
        _check_budget(self.n, self.n_init)

    def _draw(self, engine, prompts, key, progress):
        return engine.tree_batch(prompts, self.n, self.n_init, key, progress)


#: ``STRATEGIES.get(name)(**options)``: options ``n``, ``n_init``, ``table``, ``logprobs``, ``score``,
#: ``gamma``, ``clip_eps``, ``place``, ``aepo_penalty``, ``labeller``, ``parity``, ``to_host`` (each strategy
#: takes what it needs).
STRATEGIES = Registry("rollout strategy")
STRATEGIES.register("independent", lambda *, n, **_: Independent(n))
STRATEGIES.register("appo", lambda *, n, n_init, table, logprobs, score="appo", gamma=1.0, clip_eps=0.2,
                    place=lambda t: t, labeller=None, parity="appo_jax", to_host=jax.device_get, **_: AppoBranching(
                        n, n_init, table, logprobs, score, gamma, clip_eps, place, labeller, parity, to_host))
STRATEGIES.register("arpo", lambda *, n, n_init, **_: ArpoBranching(n, n_init, 0.0))
STRATEGIES.register("aepo", lambda *, n, n_init, aepo_penalty, **_: ArpoBranching(n, n_init, aepo_penalty))
STRATEGIES.register("tree", lambda *, n, n_init, **_: TreeSearch(n, n_init))
