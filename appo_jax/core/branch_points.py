"""APPO branch-point selection of a batch of initial rollouts, as one jitted op (docs/algorithm.md §1.1-§1.2).

    Omega  = future_values(lc - lb, m, gamma, clip_eps)                 (§1.1)
    cand   = candidate_mask(tokens, m & row_valid, table, L)
    BS     = Z(H') * Z(Omega')  over cand, per row                     (§1.2; H', Omega' per the score mode)
    chosen = select_branch_points(BS, strict, cand, group, G, B)       (top-B strict, fallback, cyclic)

The score mode makes the Branching Score's ablations a value, not a code path: ``appo`` uses both signals,
``entropy`` sets Omega' = 1 (BS = Z(H)), ``omega`` sets H' = 1 (BS = Z(Omega)); `branching_scores` handles a
constant signal by ranking with the other one. ``oracle`` (the upper bound of the mini reproduction,
docs/mini_reproduction.md) needs the decision-token labels D [N, L]: a branch at t keeps token t and resamples
from t + 1, so the candidates are the generated t with D[t + 1], H'_t = H_{t+1} (the entropy of the decision
being resampled) and Omega' = 1 — branch before the labelled decisions, the most uncertain first. This is the
only place the selection is assembled: the trainer and the ``rollout`` CLI both call it.

The parity (``algorithm.branching_parity``, docs/official_differences.md) picks the arithmetic of the score:
``appo_jax`` (default) takes the Z-scores over the candidates with a constant-row rule and never offers the last
position; ``official`` reproduces the official implementation: Z-scores over every generated token with
``std + 1e-6``, the candidates filtered afterwards (`CANDIDATE_RULES`: whitespace-only dropped), the last position
``L - 1`` selectable and its slot dropped after the selection (``dropped``: the official code skips it; its trainer
then fails on the short group, here the group simply has one branch fewer).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from appo_jax.core.branching import (branching_scores, future_values, official_branching_scores,
                                     select_branch_points)
from appo_jax.core.candidates import candidate_mask
from appo_jax.core.trajectory import Trajectory

Array = jax.Array

#: Which signals a score mode keeps: (entropy, Omega).
SCORE_MODES = {"appo": (True, True), "entropy": (True, False), "omega": (False, True), "oracle": (True, False)}


@dataclasses.dataclass(frozen=True)
class BranchingParity:
    """How one parity scores and offers positions: ``scores(H', Omega', generated, candidates, use_entropy,
    use_omega) -> (BS, strict)``; ``last_position``: whether ``L - 1`` is offered (and then dropped after the
    selection, as the official code does) or never a candidate."""

    scores: Callable
    last_position: bool


#: ``algorithm.branching_parity`` -> its `BranchingParity` (module doc).
PARITIES = {
    "appo_jax": BranchingParity(lambda h, o, gen, cand, *_: branching_scores(h, o, cand), last_position=False),
    "official": BranchingParity(official_branching_scores, last_position=True),
}


@flax.struct.dataclass
class BranchPoints:
    """The selection and what it was made from. Per token ``[N, L]``: ``omega``, ``scores`` (BS), ``strict``,
    ``candidates``. Per group ``[G, B]``: ``rows`` (parent row), ``positions`` (t_j), ``selected_scores`` (BS at
    the point), ``valid`` (false for the slots of a group without any candidate, and for dropped slots),
    ``dropped`` (official parity: slots chosen at the last position, which cannot branch)."""

    omega: Array
    scores: Array
    strict: Array
    candidates: Array
    rows: Array
    positions: Array
    selected_scores: Array
    valid: Array
    dropped: Array


@partial(jax.jit, static_argnames=("num_groups", "budget", "score", "gamma", "clip_eps", "parity", "per_row"))
def choose_branch_points(traj: Trajectory, lc, lb, table, *, num_groups: int, budget: int, score: str = "appo",
                         gamma: float = 1.0, clip_eps: float = 0.2, decisions=None,
                         parity: str = "appo_jax", per_row: bool = False) -> BranchPoints:
    """Branch points of the initial rollouts ``traj`` (module doc): ``lc`` / ``lb`` ``[N, L]`` are the current
    and behaviour log-probs, ``table`` the ``bool[V]`` candidate-token table (built with the parity's rule,
    `appo_jax.core.candidates.candidate_token_table`); ``budget`` branches per prompt group (``num_groups``
    groups; rows with ``row_valid`` False take no part). ``score`` in `SCORE_MODES`, ``parity`` in `PARITIES`;
    ``decisions`` (bool [N, L], the decision-token labels) is required by ``oracle`` and ignored otherwise.

    ``per_row`` (``algorithm.branch_selection = per_rollout``, the paper): ``budget`` branches per *row* instead
    of per group -- each row is its own selection group (its top-``budget`` scores, the same strict / fallback /
    cyclic rule), and row r's slots become slots ``(r mod R) * budget ..`` of its group ``r // R``
    (``R = N / num_groups`` rows per group: the rows must be group-major in equal blocks, as the rollout
    strategies build them), so the per-group outputs are ``[G, R * budget]``."""
    if score not in SCORE_MODES:
        raise ValueError(f"unknown branching score {score!r}; known: {', '.join(SCORE_MODES)}")
    if parity not in PARITIES:
        raise ValueError(f"unknown branching parity {parity!r}; known: {', '.join(PARITIES)}")
    rule = PARITIES[parity]
    use_entropy, use_omega = SCORE_MODES[score]
    gen = traj.gen_mask & traj.row_valid[:, None]
    length = traj.tokens.shape[1]
    omega = future_values(lc - lb, traj.gen_mask, gamma, clip_eps)
    ent = traj.entropy if use_entropy else jnp.ones_like(traj.entropy)
    if score == "oracle":
        if decisions is None:
            raise ValueError("the oracle branching score needs the decision-token labels (decisions [N, L])")
        shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731 - x_{t+1} at t
        cand = gen & shift(jnp.asarray(decisions, bool) & gen)
        ent = shift(traj.entropy)
    else:
        cand = candidate_mask(traj.tokens, gen, table, length + 1 if rule.last_position else length)
    om = omega if use_omega else jnp.ones_like(omega)
    scores, strict = rule.scores(ent, om, gen, cand, use_entropy, use_omega)
    if per_row:
        n = traj.tokens.shape[0]
        if n % num_groups:
            raise ValueError(f"per-row branch selection needs {num_groups} equal blocks of rows, got {n} rows")
        own = jnp.where(traj.row_valid, jnp.arange(n, dtype=jnp.int32), -1)
        chosen = select_branch_points(scores, strict, cand, own, n, budget)
        rows, positions, selected, valid = (x.reshape(num_groups, -1) for x in chosen)
    else:
        group = jnp.where(traj.row_valid, traj.group_id, -1)
        rows, positions, selected, valid = select_branch_points(scores, strict, cand, group, num_groups, budget)
    dropped = valid & (positions >= length - 1)
    return BranchPoints(omega, scores, strict, cand, rows, positions, selected, valid & ~dropped, dropped)
