"""How an algorithm draws its rollouts: one interface, one class per kind, registered by name with its typed options
(docs/algorithm.md §1.3, §1.7; adding one: docs/architecture.md, "Adding a rollout strategy").

A strategy turns ``num_prompts`` prompts into a :class:`Sampled`: the rollout batch (group-major rows), the
prompt of each group, how many leading rows enter the policy update, and what it computed on the way (APPO's
branch points and the current-policy log-probs of the initial rows). Each strategy owns its scheme, written over
the engine's one primitive (``engine.request`` / ``engine.rollout``, `appo_jax.rollout.engine`), and is built by
:func:`make_strategy` from its options dataclass (``STRATEGIES.options(name)``: frozen, every knob typed, an
unknown key an error) and a :class:`StrategyContext` (what the trainer provides: branch-candidate table,
log-prob callback, placement):

    independent   n rollouts per prompt                                         (GRPO, DAPO)        here
    appo          n_init initial rollouts, then n - n_init branches at the best Branching Scores     here
    arpo / aepo   entropy-triggered branching after tool results (AEPO: consecutive-branch penalty)  arpo.py
    tree          Tree-GRPO step-level tree expansion                                              tree.py

`DynamicSampling` wraps `Independent` for DAPO (keep groups whose rewards are not all equal). The helpers
:func:`initial_rollouts` and :func:`branch_rollouts` are the two phases of APPO, usable on their own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import jax
import numpy as np

from appo_jax.core.branch_points import BranchPoints, choose_branch_points
from appo_jax.core.registry import Registry
from appo_jax.core.trajectory import KIND_BRANCH, Trajectory, TrajectoryBuilder
from appo_jax.data.records import Record
from appo_jax.rollout.engine import RolloutBatch, RolloutEngine, concat_batches, tree_ids

#: ``logprobs(params, traj) -> (lc, lb)``: log-probs ``[N, L]`` of a batch under ``params`` and the behaviour
#: baseline of Omega (`appo_jax.training.policies.Policies.current_and_baseline`).
LogProbs = Callable[[Any, Trajectory], tuple[jax.Array, jax.Array]]

#: The rollout strategies: ``STRATEGIES.get(name)(options, context)`` with ``options`` an instance of
#: ``STRATEGIES.options(name)``; use :func:`make_strategy`. ARPO / AEPO and Tree-GRPO register themselves in their
#: own modules (imported on the first lookup).
STRATEGIES = Registry("rollout strategy", provider=("appo_jax.rollout.arpo", "appo_jax.rollout.tree"))


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

    def sample(self, engine: RolloutEngine, params, next_prompts: Callable[[int], list[Record]], num_prompts: int,
               key, progress=None) -> Sampled:
        """Draw ``num_prompts`` prompts with ``next_prompts`` and sample their rollouts; ``params``: the current
        policy's parameters (the sampler already holds them; strategies that score rollouts pass them to
        ``context.logprobs``)."""


def _identity(x):
    return x


@dataclass
class StrategyContext:
    """What a strategy may need besides its options, provided by the trainer (or the ``rollout`` CLI): ``table``
    (branch-candidate tokens), ``logprobs(params, traj) -> (lc, lb)``, ``place`` / ``to_host`` (a host Trajectory
    to where jitted selection runs, and results back) and ``labeller(traj, prompts)`` (decision tokens, for the
    oracle score)."""

    table: Any = None
    logprobs: LogProbs | None = None
    place: Callable[[Trajectory], Trajectory] = _identity
    to_host: Callable = jax.device_get
    labeller: Callable[[Trajectory, Sequence], np.ndarray] | None = None


def make_strategy(name: str, options=None, context: StrategyContext | None = None) -> RolloutStrategy:
    """The strategy registered as ``name``, built from ``options`` (an instance of ``STRATEGIES.options(name)``, a
    mapping of its fields, whose unknown keys are an error naming the strategy and its known keys, or None for
    the defaults) and ``context``."""
    options_class = STRATEGIES.options(name)
    if options is None:
        options = options_class()
    elif isinstance(options, Mapping):
        options = STRATEGIES.make_options(name, options)
    elif not isinstance(options, options_class):
        raise TypeError(f"rollout strategy {name!r} takes {options_class.__name__}, got {type(options).__name__}")
    return STRATEGIES.get(name)(options, context or StrategyContext())


def check_budget(n: int, n_init: int, branches: bool = False) -> None:
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


# ---------------------------------------------------------------------------------------------------- the phases
def initial_rollouts(engine: RolloutEngine, prompts: Sequence[Record], n: int, key, progress=None) -> RolloutBatch:
    """``n`` fresh rollouts per prompt; row ``g * n + i`` is rollout ``i`` of prompt ``g`` (kind init, rewards
    filled). ``progress``: see `RolloutEngine.run`."""
    if n < 1:
        raise ValueError(f"n_init must be >= 1, got {n}")
    reqs = [engine.request(key, prompts[g], g, i) for g in engine.own_groups(len(prompts)) for i in range(n)]
    return engine.rollout(reqs, len(prompts), n, progress=progress)


def branch_rollouts(engine: RolloutEngine, parents: Trajectory, prompts: Sequence[Record], rows, positions, scores,
                    valid, key, progress=None, parent_tree=None, fork=None) -> RolloutBatch:
    """APPO branch rollouts (docs/algorithm.md §1.3). ``rows`` / ``positions`` / ``scores`` / ``valid`` are
    ``[G, B]`` (from ``choose_branch_points``): output row ``g * B + j`` continues row ``rows[g, j]`` of
    ``parents`` (a row of group g) from ``prompt + response[: positions[g, j] + 1]`` (tokens, masks, behaviour
    log-probs and entropies of the prefix copied; tool calls reconstructed from the tokens), kind branch, sampling
    key ``fold_in(fold_in(key, g), j)``; invalid slots give padding rows. ``parent`` indexes ``parents`` and
    ``tree_id`` is the parent's tree: ``parent_tree`` (the tree ids of ``parents``, needed when they are branch
    rows of another batch, e.g. a previous branching level), else computed from ``parents.parent``. ``fork``:
    ``(source, slots)`` -- the slot each parent row ended in (``RolloutBatch.slot``) and where its KV is: None =
    the live cache (`fork_source`), or a `Sampler.snapshot` taken after the parents ran: a branch whose parent's
    row still holds the parent starts from a copy of its KV (``RolloutRequest.fork``, `attach_fork`), the others
    prefill their prefix; ``kv_forked`` of the batch counts the forks."""
    rows, positions = np.asarray(rows), np.asarray(positions)
    scores, valid = np.asarray(scores, np.float32), np.asarray(valid, bool)
    if not rows.shape == positions.shape == scores.shape == valid.shape or rows.ndim != 2:
        raise ValueError(f"rows/positions/scores/valid must share one [G, B] shape, got {rows.shape}, "
                         f"{positions.shape}, {scores.shape}, {valid.shape}")
    num_g, budget = rows.shape
    prompt_tokens, prompt_mask = np.asarray(parents.prompt_tokens), np.asarray(parents.prompt_mask)
    group_id, own = np.asarray(parents.group_id), engine.own_groups(num_g)
    reqs = []
    for g, j in zip(*np.nonzero(valid)):
        r, t = int(rows[g, j]), int(positions[g, j])
        if not 0 <= r < parents.tokens.shape[0]:
            raise ValueError(f"branch slot ({g}, {j}): parent row {r} outside the parent batch")
        grp = int(group_id[r])
        if grp != g or not 0 <= grp < len(prompts):
            raise ValueError(f"branch slot ({g}, {j}): parent row {r} has group {grp}, not {g} "
                             f"({len(prompts)} prompts were given)")
        if g in own:  # another process runs the others (HostShardedEngine)
            req = engine.request(key, prompts[grp], grp, int(j), prompt_ids=prompt_tokens[r][prompt_mask[r]],
                                 prefix=engine.branch_prefix(parents, r, t), kind=KIND_BRANCH, parent=r,
                                 branch_pos=t, score=float(scores[g, j]))
            reqs.append(attach_fork(req, fork, r))
    if parent_tree is None:
        parent_tree = tree_ids(np.asarray(parents.parent), np.asarray(parents.row_valid))
    return engine.rollout(reqs, num_g, budget, progress=progress, parent_tree=np.asarray(parent_tree))


def fork_source(engine: RolloutEngine, parents: RolloutBatch):
    """``(None, slots)`` to fork the branches of ``parents``' rows from (`branch_rollouts`' ``fork``): the live
    cache and the slot each row ended in, when ``rollout.kv_fork`` is on, the sampler can fork and the batch knows
    its slots; else None. No copy of the cache is made: the branches that start in the call's first wave of
    slots (all of them when the sampler has a slot per branch, as the trainer sizes it) copy their parents' rows
    before any slot is reused (`AgentLoop` forks before it starts anything); a later branch whose parent's slot
    was reused by then prefills its prefix."""
    if not engine.cfg.kv_fork or parents.slot is None or not hasattr(engine.sampler, "live"):
        return None
    return None, parents.slot


def attach_fork(req, fork, row: int):
    """``req`` with ``fork`` set to fork from the row parent ``row`` ended in: ``fork = (None, slots)`` (live, the
    loop checks the slot when the request starts) or ``(snapshot, slots)`` (a `Sampler.snapshot`: only when the
    snapshot's row holds the request's ``prompt + prefix``, all but its last token, `CacheSnapshot.cannot_fork`);
    else ``req`` unchanged (the branch prefills)."""
    if fork is None:
        return req
    snapshot, slots = fork
    slot = int(slots[row]) if 0 <= row < len(slots) else -1
    if slot < 0:
        return req
    tokens = list(req.prompt_ids) + ([] if req.prefix is None else req.prefix.tokens.tolist())
    if snapshot is None or snapshot.cannot_fork(slot, tokens) is None:
        req.fork = (snapshot, slot)
    return req


# ---------------------------------------------------------------------------------------------------- strategies
@dataclass
class EveryRowTrains:
    """Base of the strategies that sample ``options.n`` rows per prompt, all of which train: ``sample`` draws the
    prompts, times the rollouts and wraps the batch; a subclass implements :meth:`draw`."""

    options: Any
    context: StrategyContext = field(default_factory=StrategyContext)
    #: the strategy branches rows off others (``branch/kv_forked`` is logged when ``rollout.kv_fork`` is on)
    branches: ClassVar[bool] = False

    @property
    def rollouts_per_prompt(self) -> int:
        """``options.n`` (the sampler runs every row of a group at once)."""
        return self.options.n

    @property
    def train_rows_per_prompt(self) -> int:
        """``options.n``: every row trains."""
        return self.options.n

    def sample(self, engine, params, next_prompts, num_prompts, key, progress=None) -> Sampled:
        """:meth:`draw` on ``num_prompts`` new prompts (module doc)."""
        metrics: dict = {}
        prompts = next_prompts(num_prompts)
        batch = _timed(metrics, "time/rollout_s", self.draw, engine, prompts, key, progress)
        if self.branches and engine.cfg.kv_fork:
            metrics["branch/kv_forked"] = float(batch.kv_forked)
        return Sampled(batch, list(prompts), num_prompts * self.options.n, metrics=metrics)

    def draw(self, engine: RolloutEngine, prompts: Sequence[Record], key, progress) -> RolloutBatch:
        """The batch of ``len(prompts) * options.n`` rows, group-major."""
        raise NotImplementedError


@dataclass(frozen=True)
class IndependentOptions:
    """``n`` rollouts per prompt (``algorithm.n``)."""

    n: int = 16

    def __post_init__(self):
        check_budget(self.n, 1)


@dataclass
class Independent(EveryRowTrains):
    """``n`` independent rollouts per prompt; every row trains."""

    options: IndependentOptions = field(default_factory=IndependentOptions)

    def draw(self, engine, prompts, key, progress):
        """:func:`initial_rollouts` with ``n`` per prompt."""
        return initial_rollouts(engine, prompts, self.options.n, key, progress)


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
        """The base strategy's ``n``."""
        return self.base.options.n

    @property
    def train_rows_per_prompt(self) -> int:
        """The base strategy's ``n``."""
        return self.base.options.n

    def sample(self, engine, params, next_prompts, num_prompts, key, progress=None) -> Sampled:
        """Rounds of independent rollouts until ``num_prompts`` groups with reward variance are kept (class doc)."""
        n = self.base.options.n
        kept: list[tuple[RolloutBatch, int, Record]] = []
        metrics: dict = {}
        sampled, first_rewards, rounds = 0, None, 0
        for rounds in range(self.max_rounds + 1):
            if len(kept) >= num_prompts:
                break
            prompts = next_prompts(num_prompts)
            batch = _timed(metrics, "time/rollout_s", initial_rollouts, engine, prompts, n,
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


BRANCH_SELECTIONS = ("per_group", "per_rollout")


def budget_n(n_init: int, branches: int, levels: int) -> int:
    """Total rollouts per prompt of the paper's budget: ``M = N (1 + B + ... + B^L)`` (docs/algorithm.md §1.10)."""
    return n_init * sum(branches ** level for level in range(levels + 1))


def branches_per_rollout(n: int, n_init: int, levels: int) -> int | None:
    """The B with ``n = budget_n(n_init, B, levels)``, or None when there is none."""
    for b in range(1, n + 1):
        total = budget_n(n_init, b, levels)
        if total >= n:
            return b if total == n else None
    return None


@dataclass(frozen=True)
class AppoOptions:
    """APPO's rollout knobs (the ``algorithm`` section's fields of the same names): ``n`` / ``n_init`` (branch
    budget ``n - n_init`` per prompt), ``levels`` and ``branch_selection`` (the paper's N / B / L budgets,
    docs/algorithm.md §1.10: ``per_group`` takes the top ``n - n_init`` Branching Scores of a prompt group, one
    level; ``per_rollout`` takes B per rollout of the previous level, ``n = n_init (1 + B + ... + B^levels)``),
    ``score`` (Branching Score mode of the algorithm), ``omega_gamma`` / ``omega_clip`` (gamma and eps of Omega) and
    ``branching_parity`` (``appo_jax`` or ``official`` arithmetic)."""

    n: int = 16
    n_init: int = 8
    levels: int = 1
    branch_selection: str = "per_group"
    score: str = "appo"
    omega_gamma: float = 1.0
    omega_clip: float = 0.2
    branching_parity: str = "appo_jax"

    def __post_init__(self):
        check_budget(self.n, self.n_init, branches=True)
        if self.branch_selection not in BRANCH_SELECTIONS:
            raise ValueError(f"algorithm.branch_selection={self.branch_selection!r}; expected one of "
                             f"{', '.join(BRANCH_SELECTIONS)}")
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"algorithm.levels={self.levels!r}; expected an integer >= 1")
        if self.levels > 1 and self.branch_selection != "per_rollout":
            raise ValueError(f"algorithm.levels={self.levels} branches the rollouts of each level: it needs "
                             "algorithm.branch_selection=per_rollout")
        if self.branch_selection == "per_rollout" and self.branches is None:
            options = [budget_n(self.n_init, b, self.levels) for b in (1, 2, 3, 4)]
            raise ValueError(f"algorithm.n={self.n} is not n_init (1 + B + ... + B^L) for any B with "
                             f"n_init={self.n_init}, levels={self.levels}; B = 1, 2, 3, 4 give n = "
                             f"{', '.join(map(str, options))}")

    @property
    def branches(self) -> int | None:
        """B, branches per rollout of the previous level (``per_rollout``; None when n does not fit)."""
        return branches_per_rollout(self.n, self.n_init, self.levels)

    def level_budget(self) -> tuple[int, bool]:
        """``(budget, per_row)`` of one level's selection: B per row, or ``n - n_init`` per group."""
        if self.branch_selection == "per_rollout":
            return self.branches, True
        return self.n - self.n_init, False


@dataclass
class AppoBranching:
    """APPO (docs/algorithm.md §1.1-§1.3): ``n_init`` initial rollouts per prompt; ``context.logprobs(params,
    traj)`` gives their current and baseline log-probs; `choose_branch_points` picks ``n - n_init`` branch points
    per prompt (``per_group``) or B per initial rollout (``per_rollout``) with the ``score`` mode and the
    ``branching_parity`` arithmetic (jitted where ``context.place`` puts the batch); the branches continue their
    parents' prefixes. With ``levels`` L > 1 (§1.10) the branches of level l - 1 are scored and branched the same
    way, B each; rows are the initial rows, then level 1's, ..., then level L's, each branch's ``parent`` a row
    of the previous level. Only the initial rows train; their current log-probs are returned as ``old_logp``."""

    options: AppoOptions = field(default_factory=AppoOptions)
    context: StrategyContext = field(default_factory=StrategyContext)

    @property
    def rollouts_per_prompt(self) -> int:
        """The largest phase: ``max(n_init, n - n_init)`` concurrent rollouts per prompt with one level, the
        last level's ``n_init B^levels`` with several."""
        o = self.options
        if o.levels == 1:
            return max(o.n_init, o.n - o.n_init)
        return o.n_init * o.branches ** o.levels

    @property
    def train_rows_per_prompt(self) -> int:
        """``n_init``: only the initial rows train."""
        return self.options.n_init

    def sample(self, engine, params, next_prompts, num_prompts, key, progress=None) -> Sampled:
        """Initial rollouts -> log-probs -> branch points -> branch rollouts, once per level (class doc)."""
        o, c = self.options, self.context
        if c.logprobs is None or c.table is None:
            raise ValueError("APPO branching needs context.logprobs and context.table (StrategyContext)")
        k_init, k_branch = jax.random.split(key)
        metrics: dict = {}
        prompts = next_prompts(num_prompts)
        init = _timed(metrics, "time/rollout_s", initial_rollouts, engine, prompts, o.n_init, k_init, progress)
        batch, parents, start, first = init, init, 0, None
        for level in range(1, o.levels + 1):
            points, lc, branches = self._level(engine, params, prompts, parents, num_prompts, metrics,
                                               k_branch if level == 1 else jax.random.fold_in(k_branch, level),
                                               progress)
            if first is None:  # level 1: the initial rows' log-probs (they train) and branch points (metrics)
                first, old_logp = points, lc
            if o.levels > 1:
                metrics[f"branch/level{level}_count"] = float(np.asarray(branches.traj.row_valid).sum())
            branches = _shift_parents(branches, start)
            start = batch.traj.tokens.shape[0]
            batch, parents = concat_batches(batch, branches), branches
        return Sampled(batch, list(prompts), num_prompts * o.n_init, old_logp=old_logp, branching=first,
                       metrics=metrics)

    def _level(self, engine, params, prompts, parents: RolloutBatch, num_prompts, metrics, key, progress):
        """One level: log-probs of ``parents``, their branch points, the branch rollouts (rows of ``parents``)."""
        o, c = self.options, self.context
        lc, lb = c.to_host(_timed(metrics, "time/logprobs_s", c.logprobs, params, parents.traj))
        decisions = None
        if o.score == "oracle":
            if c.labeller is None:
                raise ValueError("the oracle branching score needs a decision-token labeller (a generated task with "
                                 "labelled decisions, e.g. kb_multihop or arith_program)")
            decisions = c.labeller(parents.traj, prompts)
        budget, per_row = o.level_budget()
        points = _timed(metrics, "time/branching_s", choose_branch_points, c.place(parents.traj), lc, lb, c.table,
                        num_groups=num_prompts, budget=budget, score=o.score, gamma=float(o.omega_gamma),
                        clip_eps=float(o.omega_clip), decisions=decisions, parity=o.branching_parity,
                        per_row=per_row)
        points = c.to_host(points)
        branches = _timed(metrics, "time/branch_rollout_s", branch_rollouts, engine, parents.traj, prompts,
                          points.rows, points.positions, points.selected_scores, points.valid, key, progress,
                          parents.tree_id, fork_source(engine, parents))
        metrics["branch/kv_forked"] = metrics.get("branch/kv_forked", 0.0) + float(branches.kv_forked)
        if "omega/abs_log_ratio_mean" not in metrics:  # of the initial rows
            metrics["omega/abs_log_ratio_mean"] = _masked_abs_mean(np.asarray(lc) - np.asarray(lb), parents.traj)
        return points, lc, branches


def _shift_parents(batch: RolloutBatch, start: int) -> RolloutBatch:
    """``batch`` with its parent indices moved by ``start`` (its parents' first row in the concatenated batch);
    tree ids already index the whole batch."""
    if not start:
        return batch
    parent = np.asarray(batch.traj.parent)
    traj = batch.traj.replace(parent=np.where(parent >= 0, parent + start, parent).astype(parent.dtype))
    return RolloutBatch(traj, batch.texts, batch.tool_calls, batch.accuracy, batch.tree_id, batch.format_ok,
                        batch.slot, batch.kv_forked)


def _masked_abs_mean(x: np.ndarray, traj: Trajectory) -> float:
    mask = np.asarray(traj.gen_mask) & np.asarray(traj.row_valid)[:, None]
    return float(np.abs(x)[mask].mean()) if mask.any() else 0.0


STRATEGIES.register("independent", Independent, options=IndependentOptions)
STRATEGIES.register("appo", AppoBranching, options=AppoOptions)
