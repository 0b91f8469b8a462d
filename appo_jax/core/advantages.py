"""Advantage estimators: GRPO, APPO dual groups with prefix credit, the procedure-level reward scale M,
and the ARPO / Tree-GRPO / AEPO baselines (docs/algorithm.md §1.4, §1.5, §1.7).

Conventions (shared by every function here):

* Rows are rollouts, ``[N]`` per row and ``[N, L]`` per response position; ``num_groups`` (and
  ``num_trees``) are static Python ints, everything else may be traced. Computation is float32.
* Group statistics use the *population* std and ``A = (R - mean_g) / (std_g + 1e-6)``
  (``norm_by_std=False``: ``R - mean_g``). A group of one gets 0; an empty group contributes nothing.
* A row *takes part* when ``valid`` (default all true) holds, its group id is in ``[0, num_groups)`` and
  its reward is finite. Rows that do not take part get advantage 0 and never move another row's
  statistics (padding rows with group id -1, NaN rewards, ...).
* A branch row j is *landed* when it takes part, ``0 <= parent_j < N``, the parent row takes part, is an
  initial row and has the same group id, and ``0 <= branch_pos_j < L``. With several branching levels
  (docs/algorithm.md §1.10) the parent may itself be a landed branch, up to ``levels`` hops from an initial row
  (:func:`branch_lineage`). Other branch rows are ignored: excluded from the branch-group statistics, no prefix
  credit, advantage 0.
* Token advantages are multiplied by the generated-token mask ``m_t`` (0 on prompt padding and tool
  observations) and are therefore 0 where ``gen_mask`` is false.
* No N x N or L x L intermediate: segment sums over group / parent ids plus O(L) scans along the
  response axis; jit-, vmap- and batch-shardable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from appo_jax.core.registry import ADVANTAGES, option_names
from appo_jax.core.scan import reverse_discounted_cumsum
from appo_jax.core.stats import masked_mean, masked_zscore, segment_mean, segment_zscore

Array = jax.Array

#: Added to the group std before dividing (docs/algorithm.md §1.4).
STD_EPS = 1e-6
#: Official default of the reward-scale discount lambda (docs/algorithm.md §1.5).
REWARD_SCALE_DISCOUNT = 0.9
#: AEPO entropy-aware advantage coefficient alpha in ``A (1 + alpha sg(z(H)))``.
AEPO_ENTROPY_ALPHA = 0.2
PROCEDURE_SCALING = ("none", "reward", "advantage")
ENTROPY_SCOPES = ("token", "rollout")


def _check_num(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive Python int (static), got {value!r}")
    return value


def _row_ok(rewards, group_ids, num_groups: int, valid) -> Array:
    """Rows that take part: valid, group id in range, finite reward."""
    g = jnp.asarray(group_ids, jnp.int32)
    ok = (g >= 0) & (g < num_groups) & jnp.isfinite(jnp.asarray(rewards, jnp.float32))
    if valid is not None:
        ok = ok & jnp.asarray(valid).astype(bool)
    return ok


def _tokens(per_row: Array, gen_mask) -> Array:
    """Broadcast a per-row value to ``[N, L]`` times m_t (exactly 0 off the generated tokens)."""
    m = jnp.asarray(gen_mask).astype(bool)
    return jnp.where(m, per_row[:, None], 0.0)


def grpo_advantages(rewards, group_ids, num_groups: int, norm_by_std: bool = True, valid=None,
                    *, eps: float = STD_EPS) -> Array:
    """Per-row GRPO advantage ``A_i = (R_i - mean_g R) / (std_g R + eps)`` over the rows of group g = g(i).

    ``rewards``/``group_ids``/``valid``: ``[N]``. Population std; ``norm_by_std=False`` gives ``R_i -
    mean_g R`` (Dr.GRPO). Rows with a group id outside ``[0, num_groups)`` (e.g. -1 padding), ``valid``
    false or a non-finite reward get 0 and are left out of the statistics; a group of one gets 0.
    Returns float32 ``[N]``.
    """
    _check_num("num_groups", num_groups)
    ok = _row_ok(rewards, group_ids, num_groups, valid)
    return segment_zscore(rewards, group_ids, num_groups, mask=ok, eps=eps, norm_by_std=norm_by_std)


def branch_lineage(group_ids, is_branch, parent, branch_pos, length: int, levels: int = 1, valid=None,
                   rewards=None, num_groups: int | None = None) -> tuple[Array, Array, Array, Array]:
    """Where each branch row hangs in its tree, by following parent pointers at most ``levels`` (static) hops.

    A row d of level l has the chain ``d = d_l -> d_(l-1) -> ... -> d_0 = i``, ``d_(k-1)`` the parent of ``d_k``;
    each link is *landed* (module doc: d_k takes part, its parent is a row of the batch that takes part and has
    the same group, ``0 <= branch_pos < L``) and d_0 is an initial row. Since d_k copies the
    response of d_(k-1) up to ``t_(d_k)``, d shares the response prefix ``[0, s_d]`` of its root i with
    ``s_d = min_k t_(d_k)``.

    Returns ``(landed [N] bool, root [N] int32, shared_end [N] int32, level [N] int32)``: landed is true for
    branch rows whose whole chain is landed and reaches an initial row within ``levels`` hops (level 1: the
    parent is an initial row, the paper's single level); root / shared_end / level are meaningful where landed.
    """
    g = jnp.asarray(group_ids, jnp.int32)
    n = g.shape[0]
    ok = g >= 0 if num_groups is None else (g >= 0) & (g < num_groups)
    if valid is not None:
        ok = ok & jnp.asarray(valid).astype(bool)
    if rewards is not None:
        ok = ok & jnp.isfinite(jnp.asarray(rewards, jnp.float32))
    br = jnp.asarray(is_branch).astype(bool)
    par = jnp.asarray(parent, jnp.int32)
    pos = jnp.asarray(branch_pos, jnp.int32)
    safe_par = jnp.clip(par, 0, n - 1)
    link = (br & ok & (par >= 0) & (par < n) & (pos >= 0) & (pos < length) & ok[safe_par]
            & (g[safe_par] == g))
    cur, shared = jnp.arange(n, dtype=jnp.int32), jnp.full((n,), length - 1, jnp.int32)
    level, broken = jnp.zeros((n,), jnp.int32), ~ok
    for _ in range(levels):  # static: pointer jumping along the chain
        step = br[cur] & ~broken
        broken = broken | (step & ~link[cur])
        step = step & link[cur]
        shared = jnp.where(step, jnp.minimum(shared, pos[cur]), shared)
        level = level + step.astype(jnp.int32)
        cur = jnp.where(step, safe_par[cur], cur)
    landed = br & ~broken & ~br[cur] & (level >= 1)
    return landed, cur, shared, level


def landed_branches(group_ids, is_branch, parent, branch_pos, length: int, valid=None,
                    rewards=None, num_groups: int | None = None) -> tuple[Array, Array, Array]:
    """Which branch rows are *landed* at level 1 (module docstring: the parent is an initial row) and where
    they attach: ``(landed [N] bool, parent_row [N] int32, position [N] int32)`` (:func:`branch_lineage` with one
    level; ``parent_row`` and ``position`` only meaningful where ``landed``). ``rewards`` (finite check) and
    ``num_groups`` (range check of group ids) are optional; without ``num_groups`` any group id >= 0 is
    accepted."""
    landed, root, shared, _ = branch_lineage(group_ids, is_branch, parent, branch_pos, length, 1, valid, rewards,
                                             num_groups)
    return landed, root, shared


def dual_group_advantages(rewards, group_ids, is_branch, parent, branch_pos, length: int,
                          num_groups: int, norm_by_std: bool = True, valid=None,
                          *, eps: float = STD_EPS, levels: int = 1, dual_group: bool = True
                          ) -> tuple[Array, Array, Array, Array, Array]:
    """Per-row dual-group advantages (docs/algorithm.md §1.4, §1.10).

    ``A_init(i) = (R_i - mean_{init of g} R) / (std_{init of g} R + eps)`` for initial rows and, for each level
    ``l = 1..levels``, ``A_l(d) = (R_d - mean_{landed level-l branches of g} R) / (std_{...} R + eps)`` for landed
    branch rows (:func:`branch_lineage`): the initial rows and each level's branches of a prompt group are
    normalised separately. ``dual_group=False`` (the "w/o dual-group" ablation) normalises all of them as one group.
    Returns ``(A [N], landed [N] bool, root [N], shared_end [N], level [N])``; A is 0 for rows that do not take
    part and for ignored branches.
    """
    _check_num("num_groups", num_groups)
    _check_num("levels", levels)
    g = jnp.asarray(group_ids, jnp.int32)
    br = jnp.asarray(is_branch).astype(bool)
    ok = _row_ok(rewards, g, num_groups, valid)
    landed, root, shared, level = branch_lineage(g, br, parent, branch_pos, length, levels, valid, rewards,
                                                 num_groups)
    members = (ok & ~br) | landed
    seg = g + num_groups * jnp.where(landed, level, 0) if dual_group else g
    adv = segment_zscore(rewards, seg, (levels + 1) * num_groups, mask=members, eps=eps, norm_by_std=norm_by_std)
    return adv, landed, root, shared, level


def _attach(values, landed, rows, positions, n: int, length: int) -> Array:
    """Scatter-add ``values_j`` at ``(rows_j, positions_j)`` of a zero ``[n, length]`` array (landed j only)."""
    flat = jnp.where(landed, rows * length + positions, n * length)  # out of range -> dropped
    v = jnp.where(landed, jnp.asarray(values, jnp.float32), 0.0)
    return jax.ops.segment_sum(v, flat, num_segments=n * length).reshape(n, length)


def appo_advantages(rewards, group_ids, is_branch, parent, branch_pos, gen_mask, num_groups: int,
                    norm_by_std: bool = True, *, valid=None, prefix_credit: bool = True,
                    eps: float = STD_EPS, levels: int = 1, dual_group: bool = True) -> Array:
    """APPO token advantages (docs/algorithm.md §1.4, §1.10): dual groups plus prefix credit mapped to the roots.

    For an initial row i (taking part) and position t::

        A_t = A_init(i) * m_t + sum_{l=1..levels} mean{ A_l(d) : d landed at level l, root(d) = i, t <= s_d } * m_t

    (:func:`dual_group_advantages`; ``s_d`` the end of the prefix d shares with i, :func:`branch_lineage`; with
    one level, ``s_d = t_d`` and the sum is the single term of §1.4), where each level's term is present only
    where at least one such d exists (``prefix_credit=False`` drops them: the "no prefix credit" ablation).
    Branch rows, rows not taking part and positions with ``m_t = 0`` get 0. Inputs: ``rewards`` [N],
    ``group_ids`` [N] int, ``is_branch`` [N] bool, ``parent`` / ``branch_pos`` [N] int (-1 for initial rows),
    ``gen_mask`` [N, L]; ``valid`` [N] optional row mask; ``levels`` (static) the branching levels;
    ``dual_group`` False: one normalisation group per prompt (the ablation). Returns float32 [N, L].

    O(levels N L): each landed branch scatter-adds ``A(d)`` and a count 1 at ``(level - 1, root_d, s_d)``
    (``jax.ops.segment_sum`` over the flat ``[levels * N * L]`` index), then a reverse cumulative sum along L
    gives, per level, the sum and the number of branches with ``s_d >= t``.
    """
    m = jnp.asarray(gen_mask).astype(bool)
    n, length = m.shape
    adv, landed, root, shared, level = dual_group_advantages(
        rewards, group_ids, is_branch, parent, branch_pos, length, num_groups, norm_by_std, valid, eps=eps,
        levels=levels, dual_group=dual_group)
    br = jnp.asarray(is_branch).astype(bool)
    init_ok = _row_ok(rewards, group_ids, num_groups, valid) & ~br
    per_token = jnp.broadcast_to(adv[:, None], (n, length))
    if prefix_credit:
        rows = (level - 1) * n + root  # one [n, length] plane per level
        sums = _attach(adv, landed, rows, shared, levels * n, length).reshape(levels, n, length)
        counts = _attach(jnp.ones_like(adv), landed, rows, shared, levels * n, length).reshape(levels, n, length)
        sums, counts = (jax.lax.cumsum(x, axis=2, reverse=True) for x in (sums, counts))
        per_token = per_token + jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0), axis=0)
    return jnp.where(m & init_ok[:, None], per_token, 0.0)


def reward_scale(branch_scores, is_branch, parent, branch_pos, gen_mask, *,
                 discount: float = REWARD_SCALE_DISCOUNT, valid=None, group_ids=None,
                 num_groups: int | None = None) -> Array:
    """Procedure-level reward scale M (docs/algorithm.md §1.5, the official implementation detail), ``[N, L]``.

    For an initial row i with landed branches j (scores ``BS_j``, positions ``t_j``)::

        M^j_t = 1 + (BS_j / max_batch BS) * discount^(t_j - t)   for t <= t_j,   1 for t > t_j
        M_t   = mean_j M^j_t  =  1 + (1/K_i) sum_j (BS_j / max_batch BS) discount^(t_j - t) [t <= t_j]

    ``max_batch BS`` is the maximum score over the landed branches of the whole batch. A landed branch whose
    score is <= 0 (a fallback selection) or non-finite counts in K_i with factor 0 (its M^j = 1), as in the
    official implementation (a negative factor would push M below 1); when the maximum is <= 0 (or no branch
    landed) every factor is 0, so M = 1. M = 1 for rows
    without landed branches, for branch rows and wherever ``gen_mask`` is false. "Landed" follows
    :func:`landed_branches` (the reward plays no part here); without ``group_ids`` the same-group check
    is skipped, with ``num_groups`` group ids must also be < num_groups. O(L): impulses at ``t_j``, then
    one reverse discounted scan along L (``reverse_discounted_cumsum``); never an L x L matrix.
    """
    m = jnp.asarray(gen_mask).astype(bool)
    n, length = m.shape
    g = jnp.zeros((n,), jnp.int32) if group_ids is None else group_ids
    landed, rows, pos = landed_branches(g, is_branch, parent, branch_pos, length, valid,
                                        num_groups=num_groups)
    bs = jnp.asarray(branch_scores, jnp.float32)
    finite = landed & jnp.isfinite(bs)
    max_bs = jnp.max(jnp.where(finite, bs, -jnp.inf))
    factor = jnp.where(finite & (bs > 0) & (max_bs > 0), bs / jnp.where(max_bs > 0, max_bs, 1.0), 0.0)
    impulses = _attach(factor, landed, rows, pos, n, length)
    total = reverse_discounted_cumsum(impulses, discount, axis=-1)
    k = jax.ops.segment_sum(landed.astype(jnp.float32), jnp.where(landed, rows, n), num_segments=n)
    scale = 1.0 + total / jnp.maximum(k, 1.0)[:, None]
    return jnp.where(m & (k > 0)[:, None], scale, 1.0)


def outcome_token_rewards(rewards, gen_mask) -> Array:
    """Token-level rewards ``[N, L]``: the outcome reward ``R_i`` on the last generated token of row i, 0
    elsewhere (all 0 for a row without generated tokens)."""
    m = jnp.asarray(gen_mask).astype(bool)
    length = m.shape[-1]
    last = length - 1 - jnp.argmax(m[:, ::-1], axis=-1)
    onehot = (jnp.arange(length)[None, :] == last[:, None]) & m.any(axis=-1)[:, None]
    return jnp.where(onehot, jnp.asarray(rewards, jnp.float32)[:, None], 0.0)


def scaled_outcome_rewards(rewards, gen_mask, scale) -> Array:
    """Outcome rewards after the reward scale M (the official "scale token-level rewards, then compute the
    advantage"): ``R'_i = sum_t M_t r_t = M_{last} R_i`` with ``r = outcome_token_rewards``; a row without
    generated tokens keeps ``R_i``. Returns float32 ``[N]`` to feed any advantage estimator."""
    m = jnp.asarray(gen_mask).astype(bool)
    r = jnp.asarray(rewards, jnp.float32)
    scaled = jnp.sum(outcome_token_rewards(r, m) * jnp.asarray(scale, jnp.float32), axis=-1)
    return jnp.where(m.any(axis=-1), scaled, r)


def scale_token_advantages(advantages, scale) -> Array:
    """``procedure_scaling="advantage"``: ``A_t * M_t`` (elementwise, float32)."""
    return jnp.asarray(advantages, jnp.float32) * jnp.asarray(scale, jnp.float32)


def entropy_zscore(entropy, gen_mask, *, scope: str = "token", group_ids=None, num_groups=None,
                   valid=None) -> Array:
    """The z-scored entropy of the AEPO entropy-aware advantage, ``[N, L]`` (0 off the valid tokens).

    ``scope="token"`` (default): the per-token entropy ``H_t`` z-scored over all valid generated tokens of
    the batch, ``(H_t - mean H) / std H`` (population std; std < 1e-8 treated as 1). ``scope="rollout"``:
    each rollout's mean entropy over its generated tokens, z-scored within its prompt group like GRPO
    (needs ``group_ids`` and ``num_groups``), broadcast to the rollout's tokens.

    Our reading of AEPO (Dong et al. 2025, arXiv 2510.14545, "entropy-aware advantage estimation"): the
    accuracy advantage is reweighted per token by a normalised entropy term, ``A (1 + alpha * A_H)``, so
    that high-uncertainty tokens get larger updates; the default takes A_H as the token entropy
    normalised over the batch. We could not check the released code, hence the ``rollout`` alternative.
    Invalid tokens (masked, invalid rows, non-finite H) are left out of the statistics.
    """
    h = jnp.asarray(entropy, jnp.float32)
    m = jnp.asarray(gen_mask).astype(bool) & jnp.isfinite(h)
    if valid is not None:
        m = m & jnp.asarray(valid).astype(bool)[:, None]
    if scope == "token":
        return masked_zscore(h.reshape(-1), m.reshape(-1)).reshape(h.shape)
    if scope == "rollout":
        if group_ids is None or num_groups is None:
            raise ValueError("entropy scope 'rollout' needs group_ids and num_groups")
        row_h = masked_mean(h, m, axis=-1)
        z = segment_zscore(row_h, group_ids, num_groups, mask=m.any(axis=-1))
        return _tokens(z, m)
    raise ValueError(f"unknown entropy scope {scope!r}; known: {', '.join(ENTROPY_SCOPES)}")


# ---------------------------------------------------------------------------------------------------------
# Registry entries. Call convention: ``fn(*, options, **fields)`` with the batch's data fields (ADVANTAGE_FIELDS)
# as keywords (an entry takes the ones it uses; the others arrive in ``**_``, never an option) and ``options``,
# an instance of the entry's registered options dataclass (frozen: a jit static argument). Returns float32
# [N, L]. Use `compute_advantages(name, **fields_and_options)` (checks every name) or
# `advantages_from_trajectory`.
# ---------------------------------------------------------------------------------------------------------

#: The data fields an advantage estimator may receive (options are not fields: each estimator has its own class).
ADVANTAGE_FIELDS = frozenset({
    "rewards", "group_ids", "is_branch", "parent", "branch_pos", "gen_mask", "num_groups", "valid",
    "branch_scores", "entropy", "tree_ids", "num_trees", "obs_mask", "tokens",
})


@dataclass(frozen=True)
class GroupOptions:
    """Options of the group z-score estimators (``grpo``, ``arpo``, ``tree_grpo``): ``norm_by_std`` (False:
    ``R - mean_g R``, Dr.GRPO)."""

    norm_by_std: bool = True


@dataclass(frozen=True)
class AppoAdvantageOptions:
    """Options of ``appo`` (docs/algorithm.md §1.4, §1.5): ``norm_by_std``; ``procedure_scaling`` (``reward``:
    M on the token-level outcome reward before the advantage, the official default; ``advantage``: A_t * M_t;
    ``none``); ``reward_scale_discount`` (lambda of M); ``prefix_credit`` (False: the ablation without it);
    ``levels`` (the branching levels L, static); ``dual_group`` (False: initial and branch rows normalised as one
    group, the "w/o dual-group" ablation). M uses the level-1 branches (their parents are the trained rows)."""

    norm_by_std: bool = True
    procedure_scaling: str = "reward"
    reward_scale_discount: float = REWARD_SCALE_DISCOUNT
    prefix_credit: bool = True
    levels: int = 1
    dual_group: bool = True

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {self.levels!r}")
        if self.procedure_scaling not in PROCEDURE_SCALING:
            raise ValueError(f"unknown procedure_scaling {self.procedure_scaling!r}; "
                             f"known: {', '.join(PROCEDURE_SCALING)}")


@dataclass(frozen=True)
class AepoAdvantageOptions:
    """Options of ``aepo``: ``norm_by_std``, ``aepo_entropy_alpha`` (alpha of ``A (1 + alpha sg(z(H)))``) and
    ``entropy_scope`` (``token`` or ``rollout``, :func:`entropy_zscore`)."""

    norm_by_std: bool = True
    aepo_entropy_alpha: float = AEPO_ENTROPY_ALPHA
    entropy_scope: str = "token"

    def __post_init__(self):
        if self.entropy_scope not in ENTROPY_SCOPES:
            raise ValueError(f"unknown entropy scope {self.entropy_scope!r}; known: {', '.join(ENTROPY_SCOPES)}")


@ADVANTAGES.register("appo", options=AppoAdvantageOptions)
def _appo(*, rewards, group_ids, is_branch, parent, branch_pos, gen_mask, num_groups, options, valid=None,
          branch_scores=None, **_):
    """APPO: dual groups + prefix credit, with procedure scaling (:class:`AppoAdvantageOptions`)."""
    o = options
    if o.procedure_scaling != "none":
        if branch_scores is None:
            raise ValueError(f"procedure_scaling={o.procedure_scaling!r} needs branch_scores")
        scale = reward_scale(branch_scores, is_branch, parent, branch_pos, gen_mask,
                             discount=o.reward_scale_discount, valid=valid, group_ids=group_ids,
                             num_groups=num_groups)
    if o.procedure_scaling == "reward":
        rewards = scaled_outcome_rewards(rewards, gen_mask, scale)
    adv = appo_advantages(rewards, group_ids, is_branch, parent, branch_pos, gen_mask, num_groups,
                          o.norm_by_std, valid=valid, prefix_credit=o.prefix_credit, levels=o.levels,
                          dual_group=o.dual_group)
    return scale_token_advantages(adv, scale) if o.procedure_scaling == "advantage" else adv


@ADVANTAGES.register("appo_no_prefix_credit", options=AppoAdvantageOptions)
def _appo_no_prefix_credit(*, options, **fields):
    """APPO ablation: dual-group advantages without the prefix-credit term."""
    return _appo(options=dataclasses.replace(options, prefix_credit=False), **fields)


@ADVANTAGES.register("appo_no_dual_group", options=AppoAdvantageOptions)
def _appo_no_dual_group(*, options, **fields):
    """APPO ablation ("w/o dual-group", Table 4): initial and branch rows of a prompt normalised as one group."""
    return _appo(options=dataclasses.replace(options, dual_group=False), **fields)


@ADVANTAGES.register("grpo", options=GroupOptions)
@ADVANTAGES.register("arpo", options=GroupOptions)
def _grpo(*, rewards, group_ids, gen_mask, num_groups, options, valid=None, **_):
    """GRPO / ARPO: the group z-score over *all* rows of a prompt group (initial and branch rows alike;
    ARPO's partial rollouts are ordinary members), broadcast to the tokens times m_t."""
    return _tokens(grpo_advantages(rewards, group_ids, num_groups, options.norm_by_std, valid), gen_mask)


@ADVANTAGES.register("tree_grpo", options=GroupOptions)
def _tree_grpo(*, rewards, group_ids, gen_mask, num_groups, options, tree_ids=None, num_trees=None, valid=None,
               **_):
    """Tree-GRPO: ``A_i = GRPO over the prompt group + GRPO over the tree group`` (``tree_ids`` [N],
    static ``num_trees``; a row with a tree id out of range gets only the first term), times m_t."""
    if tree_ids is None or num_trees is None:
        raise ValueError("advantage 'tree_grpo' needs tree_ids and num_trees")
    _check_num("num_trees", num_trees)
    prompt = grpo_advantages(rewards, group_ids, num_groups, options.norm_by_std, valid)
    tree_valid = _row_ok(rewards, group_ids, num_groups, valid)
    tree = grpo_advantages(rewards, tree_ids, num_trees, options.norm_by_std, tree_valid)
    return _tokens(prompt + tree, gen_mask)


@ADVANTAGES.register("aepo", options=AepoAdvantageOptions)
def _aepo(*, rewards, group_ids, gen_mask, num_groups, options, entropy=None, valid=None, **_):
    """AEPO entropy-aware advantage ``A_t = A_i (1 + alpha * sg(z(H))_t) * m_t`` with A_i the ARPO (GRPO over
    all n rows) advantage and z(H) from :func:`entropy_zscore` (``options.entropy_scope``, default "token")."""
    if entropy is None:
        raise ValueError("advantage 'aepo' needs entropy ([N, L] sampler entropies)")
    base = _grpo(rewards=rewards, group_ids=group_ids, gen_mask=gen_mask, num_groups=num_groups,
                 options=GroupOptions(options.norm_by_std), valid=valid)
    z = jax.lax.stop_gradient(entropy_zscore(entropy, gen_mask, scope=options.entropy_scope, group_ids=group_ids,
                                             num_groups=num_groups, valid=valid))
    return base * (1.0 + options.aepo_entropy_alpha * z)


def reinforce_pp_advantages(rewards, group_ids, gen_mask, num_groups: int, valid=None, baseline: bool = False
                            ) -> Array:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262) with the outcome reward and the KL in the loss (``kl_coef``), not in
    the reward: the return of every generated token is the row's reward (gamma = 1), whitened over the whole
    batch's valid tokens::

        G_t = R'_i m_t,   R'_i = R_i  (or R_i - mean_{group(i)} R with ``baseline``: REINFORCE++-baseline)
        A_t = (G_t - mu) / sqrt(var + 1e-8),   mu, var = token-weighted mean and population variance of G
                                                          over the valid tokens of the batch

    Rows that do not take part (invalid, group out of range, non-finite reward) get 0 and are left out of mu
    and var. O(N L)."""
    ok = _row_ok(rewards, group_ids, num_groups, valid)
    r = jnp.where(ok, jnp.asarray(rewards, jnp.float32), 0.0)
    if baseline:
        g = jnp.clip(jnp.asarray(group_ids, jnp.int32), 0, num_groups - 1)
        r = r - segment_mean(r, group_ids, num_groups, mask=ok)[g]
    m = jnp.asarray(gen_mask).astype(bool) & ok[:, None]
    returns = jnp.broadcast_to(r[:, None], m.shape)
    mu = masked_mean(returns.reshape(-1), m.reshape(-1))
    var = masked_mean(((returns - mu) ** 2).reshape(-1), m.reshape(-1))
    return jnp.where(m, (returns - mu) / jnp.sqrt(var + 1e-8), 0.0)


@ADVANTAGES.register("reinforce_pp")
def _reinforce_pp(*, rewards, group_ids, gen_mask, num_groups, valid=None, **_):
    """REINFORCE++: :func:`reinforce_pp_advantages` (batch-whitened outcome returns)."""
    return reinforce_pp_advantages(rewards, group_ids, gen_mask, num_groups, valid)


@ADVANTAGES.register("reinforce_pp_baseline")
def _reinforce_pp_baseline(*, rewards, group_ids, gen_mask, num_groups, valid=None, **_):
    """REINFORCE++-baseline: the prompt group's mean reward subtracted, then batch-whitened."""
    return reinforce_pp_advantages(rewards, group_ids, gen_mask, num_groups, valid, baseline=True)


def compute_advantages(name: str, options=None, **fields) -> Array:
    """Token advantages ``[N, L]`` from the estimator registered as ``name`` (see ``ADVANTAGES.names()``).

    ``fields``: data fields of :data:`ADVANTAGE_FIELDS` plus, for convenience, option keys of the estimator's
    options class (``ADVANTAGES.options(name)``), applied over ``options`` (default: that class's defaults). Any
    other name is a ``TypeError`` naming it, the fields and the estimator's options.
    """
    options_class = ADVANTAGES.options(name)
    option_keys = {k: v for k, v in fields.items() if k not in ADVANTAGE_FIELDS}
    unknown = sorted(set(option_keys) - set(option_names(options_class)))
    if unknown:
        raise TypeError(f"unknown advantage field(s) or option(s) {unknown} for estimator {name!r}; fields: "
                        f"{', '.join(sorted(ADVANTAGE_FIELDS))}; options ({options_class.__name__}): "
                        f"{', '.join(option_names(options_class)) or 'none'}")
    if options is None:
        options = options_class(**option_keys)
    elif not isinstance(options, options_class):
        raise TypeError(f"estimator {name!r} takes {options_class.__name__} options, got {type(options).__name__}")
    elif option_keys:
        options = dataclasses.replace(options, **option_keys)
    data = {k: v for k, v in fields.items() if k in ADVANTAGE_FIELDS}
    return ADVANTAGES.get(name)(options=options, **data)


def advantages_from_trajectory(name: str, traj, num_groups: int, options=None, **extra) -> Array:
    """:func:`compute_advantages` with the fields read from a ``Trajectory`` batch (reward, group_id, kind,
    parent, branch_pos, gen_mask, row_valid, branch_score, entropy, obs_mask, tokens); ``extra`` adds the rest
    (``tree_ids`` / ``num_trees``, or option keys such as ``procedure_scaling``)."""
    return compute_advantages(
        name, options, rewards=traj.reward, group_ids=traj.group_id, is_branch=traj.is_branch, parent=traj.parent,
        branch_pos=traj.branch_pos, gen_mask=traj.gen_mask, valid=traj.row_valid,
        branch_scores=traj.branch_score, entropy=traj.entropy, obs_mask=traj.obs_mask, tokens=traj.tokens,
        num_groups=num_groups, **extra)
