"""The Branching Score of APPO (docs/algorithm.md §1.1-1.2): token entropy, future value Omega, per-rollout score and
the per-group selection of branch points.

Every function is pure, static-shaped, jit-, vmap- and batch-shardable, and computes in float32 whatever the
input dtype. Arrays are ``[..., L]`` over response positions (one row = one rollout); the selection works on a
``[N, L]`` batch whose rows belong to prompt groups given by ``group_ids``.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from appo_jax.core.scan import reverse_discounted_cumsum
from appo_jax.core.stats import ZSCORE_STD_FLOOR, masked_std, masked_zscore, official_zscore

Array = jax.Array

#: ``F`` is clipped to ``[-F_CLIP, F_CLIP]`` before the exponential of Omega (docs/algorithm.md §1.1).
F_CLIP = 20.0


def token_entropy(logits, temperature=1.0) -> Array:
    """Exact entropy of the sampling distribution ``p = softmax(z)``, ``z = logits / T``, over the full vocabulary.

    ``H = -sum_v p_v log p_v = -sum_v p_v (s_v - log sum_u exp(s_u))`` with ``s = z - max(z)``: the shifted form
    of ``H = logsumexp(z) - sum_v p_v z_v``, exact in float32 for bf16 inputs and huge logits (no cancellation of
    large terms). Shape ``[..., V] -> [...]``; ``temperature`` is a positive scalar (Python or traced).

    Bad input: ``-inf`` logits are masked vocabulary entries (p = 0, contribute 0). A position whose logits
    contain NaN or ``+inf``, or are all ``-inf``, has no well-defined distribution and gets ``H = NaN``; the NaN
    stays at that position only (the reduction is over V). :func:`branching_scores` drops such positions from
    the candidates.
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"token_entropy: temperature must be > 0, got {temperature}")
    z = jnp.asarray(logits).astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    s = z - jnp.max(z, axis=-1, keepdims=True)
    log_p = s - jnp.log(jnp.sum(jnp.exp(s), axis=-1, keepdims=True))
    p = jnp.exp(log_p)
    # p_v = 0 (masked or underflowed entry) contributes 0: `where` keeps 0 * -inf (and its gradient) out of the
    # sum, while a NaN p still propagates (NaN * 0 = NaN).
    return jnp.sum(p * jnp.where(p > 0, -log_p, 0.0), axis=-1)


#: ``rollout.entropy``: what the sampler records as H_t (`topk_entropy`; ``exact`` = `token_entropy`).
ENTROPY_MODES = ("exact", "topk", "official_topk")


def topk_entropy(log_p, tokens, k: int, mode: str = "topk") -> Array:
    """Entropy from the ``k`` most likely tokens instead of the full vocabulary (``rollout.entropy``).

    ``log_p`` ``[B, V]`` are the log-probs of the sampling distribution, ``tokens`` ``[B]`` the sampled ids; T_k
    the ``k`` largest entries of a row (``lax.top_k``; ties -> lower id).

    * ``topk``: renormalised over T_k, ``q_v = p_v / sum_{u in T_k} p_u``, ``H = -sum_{v in T_k} q_v log q_v``
      (in [0, log k]);
    * ``official_topk``: what the official code computes from vLLM's ``logprobs=k`` (the k most likely entries
      plus the sampled token a when it is not among them), not renormalised:
      ``H = -sum_{v in T_k u {a}} p_v log p_v`` (a lower bound of the exact entropy).

    ``ValueError`` for ``k`` < 1 or larger than the vocabulary, or an unknown ``mode``. Returns float32 ``[B]``.
    """
    if mode not in ("topk", "official_topk"):
        raise ValueError(f"topk_entropy: mode must be 'topk' or 'official_topk', got {mode!r}")
    lp = jnp.asarray(log_p).astype(jnp.float32)
    if not 1 <= k <= lp.shape[-1]:
        raise ValueError(f"rollout.entropy_k={k}: must be in [1, {lp.shape[-1]}] (the vocabulary size)")
    vals, idx = jax.lax.top_k(lp, k)
    if mode == "topk":
        lq = vals - jax.nn.logsumexp(vals, axis=-1, keepdims=True)
        q = jnp.exp(lq)
        return jnp.sum(jnp.where(q > 0, -q * lq, 0.0), axis=-1)
    term = lambda v: jnp.where(v > -jnp.inf, -jnp.exp(v) * v, 0.0)  # noqa: E731 - -p log p, 0 for p = 0
    a = jnp.asarray(tokens, jnp.int32)
    in_top = jnp.any(idx == a[:, None], axis=-1)
    la = jnp.take_along_axis(lp, a[:, None], axis=-1)[:, 0]
    return jnp.sum(term(vals), axis=-1) + jnp.where(in_top, 0.0, term(la))


def future_log_ratio(log_ratio, mask, gamma=1.0) -> Array:
    """``F_t = sum_{k >= t} gamma^(k - t) D_k`` with ``D_k = log_ratio_k`` where ``mask_k`` else 0 (last axis).

    ``D`` is formed with ``where`` (a NaN/inf log-ratio at a masked-out position never leaks in). Computed by the
    O(L) reverse scan :func:`appo_jax.core.scan.reverse_discounted_cumsum`, never an L x L matrix; exact for
    ``gamma = 1`` and stable for ``gamma < 1`` at L = 32k. A NaN at a *valid* position propagates to F at that
    position and every earlier one of its row.
    """
    return reverse_discounted_cumsum(log_ratio, gamma, mask, axis=-1)


def future_values(log_ratio, mask, gamma=1.0, clip_eps=0.2) -> Array:
    """Future value ``Omega_t = clip(exp(clip(F_t, -20, 20)), 1 - eps, 1 + eps)`` (docs/algorithm.md §1.1).

    ``F`` is :func:`future_log_ratio` (``D_t = (lc_t - lb_t) m_t``, ``F_t = D_t + gamma F_{t+1}``); ``eps =
    clip_eps``; ``eps <= 0`` means no outer clip (Omega in ``[e^-20, e^20]``). ``clip_eps`` may be a Python
    float or a traced scalar. Shape ``[..., L] -> [..., L]``.

    Masked positions (``mask`` false) get the value of the formula, i.e. the discounted future of the valid
    tokens after them (their own D is 0); they are never branch candidates because the candidate mask excludes
    them. A NaN log-ratio at a valid position makes Omega NaN there and at the earlier positions of the row
    (see :func:`future_log_ratio`); :func:`branching_scores` drops non-finite positions from the candidates.
    """
    omega = jnp.exp(jnp.clip(future_log_ratio(log_ratio, mask, gamma), -F_CLIP, F_CLIP))
    eps = jnp.asarray(clip_eps, jnp.float32)
    return jnp.where(eps > 0, jnp.clip(omega, 1.0 - eps, 1.0 + eps), omega)


def _row_zscore(x, valid):
    """Per-row Z-score and "constant row" flag (std < 1e-8) over ``valid`` (last axis).

    Exact for identical values: `appo_jax.core.stats` computes moments on values shifted by the row's largest
    valid value, so a constant row has std exactly 0 (not an ulp-sized 1e-7) and Z exactly 0.
    """
    constant = masked_std(x, valid, axis=-1) < ZSCORE_STD_FLOOR
    return masked_zscore(x, valid, axis=-1), constant[..., None]


def branching_scores(entropy, omega, candidate_mask) -> tuple[Array, Array]:
    """Branching Score ``BS_t = Z(H)_t * Z(Omega)_t`` and strict mask ``Z(H)_t > 0 & Z(Omega)_t > 0`` (§1.2).

    ``Z(v)_t = (v_t - mean(v)) / std(v)`` over the valid candidate tokens of one rollout (the last axis; one
    row = one rollout), population std, ``std < 1e-8 -> 1``. Valid candidates are ``candidate_mask`` restricted
    to positions where both H and Omega are finite (non-finite values are dropped, never propagated).

    Degenerate rows (std < 1e-8 over the row's candidates, detected exactly, see `_row_zscore`):

    * constant Omega (e.g. a single-engine system where D = 0, or Omega saturated at a clip bound):
      ``BS = Z(H)`` and ``strict = Z(H) > 0`` -- the score degrades to entropy-only ranking, never to
      "first tokens win";
    * constant entropy: symmetrically ``BS = Z(Omega)``, ``strict = Z(Omega) > 0``;
    * both constant (including rows with a single candidate): ``BS = 0``, no strict candidate.

    Returns ``(scores, strict_mask)`` shaped like ``entropy``: scores float32, 0 outside the valid candidates;
    strict_mask bool, false outside them. Selection uses the candidate mask, so a 0 score outside the
    candidates is never picked.
    """
    h = jnp.asarray(entropy).astype(jnp.float32)
    o = jnp.asarray(omega).astype(jnp.float32)
    valid = jnp.asarray(candidate_mask).astype(bool) & jnp.isfinite(h) & jnp.isfinite(o)
    z_h, h_const = _row_zscore(h, valid)
    z_o, o_const = _row_zscore(o, valid)
    entropy_only = o_const & ~h_const
    omega_only = h_const & ~o_const
    scores = jnp.where(entropy_only, z_h, jnp.where(omega_only, z_o, z_h * z_o))
    strict = jnp.where(entropy_only, z_h > 0, jnp.where(omega_only, z_o > 0, (z_h > 0) & (z_o > 0)))
    return jnp.where(valid, scores, 0.0), valid & strict


def official_branching_scores(entropy, omega, zscore_mask, candidate_mask, use_entropy: bool = True,
                              use_omega: bool = True) -> tuple[Array, Array]:
    """The official implementation's Branching Score (``branching_parity = "official"``,
    docs/official_differences.md): Z-scores over ``zscore_mask`` (every loss-mask token of the rollout),
    ``Z(v) = (v - mean) / (std + 1e-6)`` (`appo_jax.core.stats.official_zscore`, no constant-row rule), then

        BS_t = Z(H)_t * Z(Omega)_t,  strict_t = Z(H)_t > 0 & Z(Omega)_t > 0 & BS_t > 0     (both signals)
        BS_t = Z(S)_t,               strict_t = Z(S)_t > 0                                (one signal S)

    restricted to ``candidate_mask`` (the official whitespace-only filter, applied after the Z-scores). A
    constant row gives Z = 0 (or rounding noise), so its selection falls back to the earliest tokens or the
    noise's sign, as in the official code. Non-finite H or Omega are dropped from both masks (the official code
    would propagate them). Returns ``(scores, strict_mask)`` as :func:`branching_scores`."""
    h = jnp.asarray(entropy).astype(jnp.float32)
    o = jnp.asarray(omega).astype(jnp.float32)
    finite = jnp.isfinite(h) & jnp.isfinite(o)
    zmask = jnp.asarray(zscore_mask).astype(bool) & finite
    valid = jnp.asarray(candidate_mask).astype(bool) & finite
    z_h = official_zscore(h, zmask)
    z_o = official_zscore(o, zmask)
    if use_entropy and use_omega:
        scores = z_h * z_o
        strict = (z_h > 0) & (z_o > 0) & (scores > 0)
    else:
        scores = z_h if use_entropy else z_o
        strict = scores > 0
    return jnp.where(valid, scores, 0.0), valid & strict


# Tiers of the selection order: strict candidates before fallback (non-strict) candidates.
_TIER_STRICT = 0
_TIER_FALLBACK = 1


def _replicated(x):
    """``x`` itself, or -- when its type carries an explicitly sharded mesh axis (``AxisType.Explicit``) --
    a replicated copy: the global sort needs its (small) operand unsharded along the sorted dimension."""
    sharding = jax.typeof(x).sharding
    if sharding.mesh.explicit_axes:
        return jax.sharding.reshard(x, sharding.update(spec=jax.sharding.PartitionSpec()))
    return x


def _row_top(key, in_tier, k):
    """Per-row top-k of ``key`` restricted to ``in_tier``; ties -> lower position (``lax.top_k`` order)."""
    _, pos = jax.lax.top_k(jnp.where(in_tier, key, -jnp.inf), k)
    return pos, jnp.take_along_axis(in_tier, pos, axis=-1)


@partial(jax.jit, static_argnames=("num_groups", "budget"))
def select_branch_points(scores, strict_mask, candidate_mask, group_ids, num_groups: int, budget: int):
    """Choose ``budget`` branch points per prompt group (docs/algorithm.md §1.2), as one jitted batched op.

    Inputs: ``scores``, ``strict_mask``, ``candidate_mask`` ``[N, L]`` (from :func:`branching_scores` and the
    candidate mask); ``group_ids`` ``[N]`` int, the prompt group of each row (rows with an id outside
    ``[0, num_groups)`` are ignored; groups need not be contiguous or of equal size). ``num_groups`` and
    ``budget`` are static. Candidates are ``candidate_mask & isfinite(scores)``; strict ones also need
    ``strict_mask``.

    For each group g, let S_g be its strict candidates sorted by (score desc, row asc, position asc) and R_g its
    other candidates in the same order; ``chosen_g`` = the first ``k_g = min(|S_g| + |R_g|, budget)`` entries of
    ``S_g ++ R_g`` (top-B strict, then fallback by score), and output slot ``j`` holds ``chosen_g[j mod k_g]``
    (cyclic repeat when the group has fewer than ``budget`` candidates).

    Returns ``(rows, positions, scores, valid)``, each ``[num_groups, budget]``: row index into the batch,
    response position t_j, its score, and ``valid`` (false for every slot of a group without any candidate;
    there rows = positions = -1 and score = 0 -- mask with ``valid`` before gathering). ``budget = 0`` gives
    ``[num_groups, 0]`` arrays.

    Method (exact, layout-free, O(N L) + a sort of ``N * 2 * min(budget, L)`` survivors): per row,
    ``lax.top_k`` keeps the best ``min(budget, L)`` strict and the best ``min(budget, L)`` fallback positions (a
    row never contributes more than ``budget`` of either to its group's choice); one global ``lax.sort`` of the
    survivors by (group, tier, -score, row, position) ranks them inside their group; segment counts give each
    group's start and ``k_g``.
    """
    if budget < 0 or num_groups < 0:
        raise ValueError(f"select_branch_points: budget and num_groups must be >= 0, got {budget}, {num_groups}")
    scores = jnp.asarray(scores).astype(jnp.float32)
    n, length = scores.shape
    if budget == 0 or num_groups == 0 or n == 0 or length == 0:
        shape = (num_groups, budget)
        return (jnp.full(shape, -1, jnp.int32), jnp.full(shape, -1, jnp.int32),
                jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool))

    group = jnp.asarray(group_ids).astype(jnp.int32)
    row_ok = (group >= 0) & (group < num_groups)
    cand = jnp.asarray(candidate_mask).astype(bool) & jnp.isfinite(scores) & row_ok[:, None]
    strict = cand & jnp.asarray(strict_mask).astype(bool)
    key = jnp.where(scores == 0, 0.0, scores)  # -0.0 -> +0.0: equal scores tie, whatever their sign bit

    k = min(budget, length)
    pos_s, ok_s = _row_top(key, strict, k)
    pos_f, ok_f = _row_top(key, cand & ~strict, k)
    pos = jnp.concatenate([pos_s, pos_f], axis=1).astype(jnp.int32)  # [N, 2k]
    ok = jnp.concatenate([ok_s, ok_f], axis=1)
    tier = jnp.concatenate([jnp.full((n, k), _TIER_STRICT, jnp.int32),
                            jnp.full((n, k), _TIER_FALLBACK, jnp.int32)], axis=1)
    row = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], pos.shape)
    sel_score = jnp.take_along_axis(key, pos, axis=1)
    neg_score = jnp.where(sel_score == 0, 0.0, -sel_score)
    sort_group = jnp.where(ok, group[:, None], num_groups)  # non-survivors sort after every group

    flat = lambda a: _replicated(a.reshape(-1))
    s_group, _, s_neg, s_row, s_pos = jax.lax.sort(
        (flat(sort_group), flat(tier), flat(neg_score), flat(row), flat(pos)), num_keys=5)

    count = jax.ops.segment_sum(jnp.ones_like(s_group), s_group, num_segments=num_groups)
    start = jnp.cumsum(count) - count
    chosen = jnp.minimum(count, budget)
    slot = jnp.arange(budget, dtype=jnp.int32)[None, :]
    has = (chosen > 0)[:, None]
    idx = start[:, None] + slot % jnp.maximum(chosen, 1)[:, None]
    idx = jnp.where(has, idx, 0)
    valid = jnp.broadcast_to(has, (num_groups, budget))
    out_rows = jnp.where(valid, s_row[idx], -1)
    out_pos = jnp.where(valid, s_pos[idx], -1)
    out_scores = jnp.where(valid, -s_neg[idx], 0.0)
    out_scores = jnp.where(out_scores == 0, 0.0, out_scores)
    return out_rows, out_pos, out_scores, valid
