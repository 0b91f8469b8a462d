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
being resampled) and Omega' = 1 — branch before the labelled decisions, the most uncertain first. This is the only place the selection is assembled: the trainer
and the ``rollout`` CLI both call it.
"""
from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp

from appo_jax.core.branching import branching_scores, future_values, select_branch_points
from appo_jax.core.candidates import candidate_mask
from appo_jax.core.trajectory import Trajectory

Array = jax.Array

#: Which signals a score mode keeps: (entropy, Omega).
SCORE_MODES = {"appo": (True, True), "entropy": (True, False), "omega": (False, True), "oracle": (True, False)}


@flax.struct.dataclass
class BranchPoints:
    """The selection and what it was made from. Per token ``[N, L]``: ``omega``, ``scores`` (BS), ``strict``,
    ``candidates``. Per group ``[G, B]``: ``rows`` (parent row), ``positions`` (t_j), ``selected_scores`` (BS at
    the point), ``valid`` (false for the slots of a group without any candidate)."""

    omega: Array
    scores: Array
    strict: Array
    candidates: Array
    rows: Array
    positions: Array
    selected_scores: Array
    valid: Array


@partial(jax.jit, static_argnames=("num_groups", "budget", "score", "gamma", "clip_eps"))
def choose_branch_points(traj: Trajectory, lc, lb, table, *, num_groups: int, budget: int, score: str = "appo",
                         gamma: float = 1.0, clip_eps: float = 0.2, decisions=None) -> BranchPoints:
    """Branch points of the initial rollouts ``traj`` (module doc): ``lc`` / ``lb`` ``[N, L]`` are the current
    and behaviour log-probs, ``table`` the ``bool[V]`` candidate-token table; ``budget`` branches per prompt
    group (``num_groups`` groups; rows with ``row_valid`` False take no part). ``score`` in `SCORE_MODES`;
    ``decisions`` (bool [N, L], the decision-token labels) is required by ``oracle`` and ignored otherwise."""
    if score not in SCORE_MODES:
        raise ValueError(f"unknown branching score {score!r}; known: {', '.join(SCORE_MODES)}")
    use_entropy, use_omega = SCORE_MODES[score]
    gen = traj.gen_mask & traj.row_valid[:, None]
    omega = future_values(lc - lb, traj.gen_mask, gamma, clip_eps)
    ent = traj.entropy if use_entropy else jnp.ones_like(traj.entropy)
    if score == "oracle":
        if decisions is None:
            raise ValueError("the oracle branching score needs the decision-token labels (decisions [N, L])")
        shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731 - x_{t+1} at t
        cand = gen & shift(jnp.asarray(decisions, bool) & gen)
        ent = shift(traj.entropy)
    else:
        cand = candidate_mask(traj.tokens, gen, table, traj.tokens.shape[1])
    om = omega if use_omega else jnp.ones_like(omega)
    scores, strict = branching_scores(ent, om, cand)
    group = jnp.where(traj.row_valid, traj.group_id, -1)
    rows, positions, selected, valid = select_branch_points(scores, strict, cand, group, num_groups, budget)
    return BranchPoints(omega, scores, strict, cand, rows, positions, selected, valid)
