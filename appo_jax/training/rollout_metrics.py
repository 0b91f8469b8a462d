"""Host-side statistics of one iteration's rollouts, branch points and advantages (flat ``group/name`` floats)."""
from __future__ import annotations

import numpy as np

from appo_jax.core.branch_points import BranchPoints
from appo_jax.core.trajectory import FINISH_NAMES, KIND_INIT, Trajectory


def _mean(x, mask) -> float:
    x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
    return float(x[mask].mean()) if mask.any() else 0.0


def _std(x, mask) -> float:
    x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
    return float(x[mask].std()) if mask.any() else 0.0


def rollout_metrics(traj: Trajectory, rows: np.ndarray, accuracy: np.ndarray, prefix: str = "") -> dict:
    """Reward / accuracy / length / tool / entropy / finish statistics over the valid rows among ``rows``."""
    valid = np.asarray(traj.row_valid, bool) & rows
    gen, obs = np.asarray(traj.gen_mask, bool), np.asarray(traj.obs_mask, bool)
    out = {
        f"{prefix}reward/mean": _mean(traj.reward, valid),
        f"{prefix}reward/std": _std(traj.reward, valid),
        f"{prefix}reward/accuracy": _mean(accuracy, valid),
        f"{prefix}response/length": _mean((gen | obs).sum(1), valid),
        f"{prefix}response/generated_tokens": _mean(gen.sum(1), valid),
        f"{prefix}tools/calls_per_rollout": _mean(traj.tool_calls, valid),
        f"{prefix}entropy/mean": _mean(traj.entropy, gen & valid[:, None]),
        f"{prefix}rollouts/count": float(valid.sum()),
    }
    for code, name in enumerate(FINISH_NAMES):
        if code:
            out[f"{prefix}finish/{name}_frac"] = _mean(np.asarray(traj.finish_reason) == code, valid)
    return out


def groups_with_variance(reward, group_id, valid) -> float:
    """Share of prompt groups (among those with a valid row) whose valid rows' rewards are not all equal: the
    groups a group-relative estimator can learn from (a group of equal rewards has zero advantages)."""
    reward, group_id = np.asarray(reward, np.float64), np.asarray(group_id)
    valid = np.asarray(valid, bool) & (group_id >= 0)
    groups = np.unique(group_id[valid])
    if not groups.size:
        return 0.0
    varied = [np.ptp(reward[valid & (group_id == g)]) > 0 for g in groups]
    return float(np.mean(varied))


def batch_metrics(traj: Trajectory, accuracy: np.ndarray, train_rows: int, format_ok: np.ndarray | None = None
                  ) -> dict:
    """`rollout_metrics` of the ``train_rows`` leading rows (the rows the update trains on); the other rows' (APPO's
    branches) reward and count under ``branch_*``; ``branch/count``: valid branch rows;
    ``reward/groups_with_variance`` over every row of a group (`groups_with_variance`); ``reward/format_ok``: share
    of trained rows whose format check passed (when ``format_ok`` is given)."""
    trained = np.arange(traj.num_rows) < train_rows
    out = rollout_metrics(traj, trained, accuracy)
    out["reward/groups_with_variance"] = groups_with_variance(traj.reward, traj.group_id, traj.row_valid)
    if format_ok is not None:
        out["reward/format_ok"] = _mean(format_ok, np.asarray(traj.row_valid, bool) & trained)
    if not trained.all():
        rest = rollout_metrics(traj, ~trained, accuracy, "branch_")
        out.update({k: v for k, v in rest.items() if k.startswith("branch_reward/") or k == "branch_rollouts/count"})
    out["branch/count"] = float((np.asarray(traj.kind) != KIND_INIT)[np.asarray(traj.row_valid, bool)].sum())
    return out


def mismatch_metrics(trainer_logp, sampler_logp, mask) -> dict:
    """How far the sampler's log-probs ``lb`` are from the trainer's ``lc`` for the same tokens and weights
    (precision, kernels, a stale sampler), over the ``mask`` tokens (d = lc - lb, r = exp(d))::

        mismatch/abs_logp_diff_mean = mean |d|
        mismatch/kl                 = mean (r - 1 - d)       (k3 estimate of KL(sampler || trainer), >= 0)
        mismatch/ratio_gt2_frac     = share of tokens with r > 2
        mismatch/ratio_max          = max r

    ``loss.tis_cap`` corrects for it (`appo_jax.core.losses.tis_weights`). Zeros where nothing is valid."""
    m = np.asarray(mask, bool)
    d = np.clip(np.asarray(trainer_logp, np.float64) - np.asarray(sampler_logp, np.float64), -20.0, 20.0)
    m = m & np.isfinite(d)
    r = np.exp(d)
    return {"mismatch/abs_logp_diff_mean": _mean(np.abs(d), m), "mismatch/kl": _mean(r - 1.0 - d, m),
            "mismatch/ratio_gt2_frac": _mean(r > 2.0, m), "mismatch/ratio_max": float(r[m].max()) if m.any() else 0.0}


def branching_metrics(points: BranchPoints, init: Trajectory) -> dict:
    """Branch-point statistics of APPO's selection (host arrays) over the initial rollouts ``init``."""
    valid = np.asarray(points.valid, bool)
    rows, positions = np.asarray(points.rows), np.asarray(points.positions)
    scores = np.asarray(points.selected_scores)
    omega = np.asarray(points.omega)
    gen0 = np.asarray(init.gen_mask) & np.asarray(init.row_valid)[:, None]
    strict_at = np.asarray(points.strict)[rows.clip(0), positions.clip(0)]
    return {
        "branch/groups_without_candidates": float((~valid.any(axis=1)).sum()) if valid.shape[1] else 0.0,
        "branch/dropped_last_position": float(np.asarray(points.dropped, bool).sum()),
        "branch/score_mean": _mean(scores, valid),
        "branch/score_max": float(scores[valid].max()) if valid.any() else 0.0,
        "branch/score_min": float(scores[valid].min()) if valid.any() else 0.0,
        "branch/strict_frac": _mean(strict_at, valid),
        "branch/position_mean": _mean(positions, valid),
        "branch/candidates_per_rollout": _mean(np.asarray(points.candidates).sum(1), np.asarray(init.row_valid)),
        "omega/mean": _mean(omega, gen0),
        "omega/min": float(omega[gen0].min()) if gen0.any() else 0.0,
        "omega/max": float(omega[gen0].max()) if gen0.any() else 0.0,
    }


def advantage_metrics(advantages, mask) -> dict:
    """Mean, mean |A| and the share of non-zero advantages over ``mask``."""
    a, m = np.asarray(advantages), np.asarray(mask, bool)
    return {"advantage/mean": _mean(a, m), "advantage/abs_mean": _mean(np.abs(a), m),
            "advantage/nonzero_frac": _mean(a != 0, m)}
