"""Is the run learning? The signals a researcher checks first, computed on the host from an iteration's arrays and
from metrics.jsonl.

* `kl_to_reference`: ``KL(pi || pi_start)`` by the k3 estimator over sampled tokens,
  ``mean_t (exp(d_t) - 1 - d_t)`` with ``d_t = log pi_start(a_t) - log pi(a_t)`` (>= 0, unbiased on samples of pi);
* `signal_warnings` (at start): a config whose groups can never have reward variance (one rollout per prompt; a
  reward that scores the right answer, a wrong one and an empty response alike);
* `heldout_changes` (at the end): every held-out accuracy's first and last value with binomial 95% intervals and
  whether the change is beyond noise (`appo_jax.training.significance`);
* `run_warnings` (at the end): a collapse (format share falling to 0, held-out accuracy falling beyond noise) or
  a run in which no group ever had reward variance;
* `plot_learning_curve`: held-out accuracy and training reward per iteration as a PNG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from appo_jax.rewards.math_worker import PLAIN_INTEGER
from appo_jax.training.significance import accuracy_change

_FORMAT = "reward/format_ok"
_VARIANCE = "reward/groups_with_variance"


def kl_to_reference(logp, ref_logp, mask) -> float:
    """``mean over mask of exp(d) - 1 - d``, ``d = ref_logp - logp`` (module doc); 0 for an empty mask."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0
    d = np.clip(np.asarray(ref_logp, np.float64) - np.asarray(logp, np.float64), -20.0, 20.0)[mask]
    return float(np.mean(np.exp(d) - 1.0 - d))


def signal_warnings(cfg, rollouts_per_prompt: int, records, reward) -> list[str]:
    """Reasons the run cannot learn, found before it starts (module doc). ``reward(record, response)`` returns a
    `RewardOutput` or a float; it is asked about the first record's right answer, a wrong one and an empty
    response."""
    out = []
    if rollouts_per_prompt < 2:
        out.append(f"each prompt group has {rollouts_per_prompt} rollout (algorithm.n = {cfg.algorithm.n}): "
                   "group-relative advantages are all 0 and the policy cannot learn; use algorithm.n >= 2")
    if records:
        rec = records[0]
        truth = rec.ground_truths[0] if rec.ground_truths else "0"
        # a wrong answer: the next integer for an integer answer (decided without math-verify's import), else "x0"
        wrong = str(int(truth) + 1) if PLAIN_INTEGER.fullmatch(truth.strip()) else f"{truth}x0"
        probes = ["", f"<answer>\\boxed{{{truth}}}</answer>", f"<answer>\\boxed{{{wrong}}}</answer>"]
        scores = []
        for text in probes:
            out_ = reward(rec, text)
            scores.append(float(getattr(out_, "score", out_)))
        if len(set(scores)) == 1:
            out.append(f"data.reward={cfg.data.reward!r} gives the same score ({scores[0]:g}) to the right answer, a "
                       f"wrong answer and an empty response of record {rec.id!r}: if it is constant, no group has "
                       "reward variance and nothing is learned")
    return out


def heldout_changes(records: list[dict], counts: dict[str, int], runs: int) -> dict:
    """For every ``eval/BENCH/MODE`` key of ``records``: `accuracy_change` between its first and last value (n =
    questions x runs; questions for ``greedy``, whose runs agree), with ``first_step`` / ``last_step``; the interval
    needs the question count of ``counts`` (a benchmark not evaluated by this process gets none)."""
    out = {}
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.count("/") >= 2})
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if len(points) < 2:
            continue
        bench, mode = key[len("eval/"):].rsplit("/", 1)
        questions = counts.get(bench, 0)
        n = questions * (1 if mode == "greedy" else max(runs, 1))
        (first_step, before), (last_step, after) = points[0], points[-1]
        change = accuracy_change(before, after, n) if n else {"before": before, "after": after, "n": 0,
                                                               "verdict": "unknown (no question count)"}
        out[key] = {**change, "first_step": first_step, "last_step": last_step}
    return out


def _mean_of(records, key, part) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
        return None
    k = max(1, min(3, len(values) // 3))
    return float(np.mean(values[:k] if part == "first" else values[-k:]))


def run_warnings(records: list[dict], heldout: dict) -> list[str]:
    """What the summary must say about a run that collapsed or never had a signal (module doc)."""
    out = []
    first, last = _mean_of(records, _FORMAT, "first"), _mean_of(records, _FORMAT, "last")
    if first is not None and last is not None and first >= 0.2 and last < 0.05:
        out.append(f"collapse: the share of well-formed responses fell from {first:.2f} to {last:.2f} "
                   f"(reward/format_ok); the policy stopped answering in the protocol's format")
    for key, c in heldout.items():
        if c.get("verdict") == "fell":
            lo, hi = c["change_ci95"]
            out.append(f"{key} fell beyond noise: {100 * c['before']:.1f}% -> {100 * c['after']:.1f}% "
                       f"(change {100 * c['change']:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}])")
    variance = [r[_VARIANCE] for r in records if r.get(_VARIANCE) is not None]
    if variance and max(variance) == 0:
        out.append("no prompt group had reward variance in any iteration: every advantage was 0 and nothing was "
                   "learned (raise algorithm.n, or make the task / temperature give mixed outcomes)")
    return out


def plot_learning_curve(records: list[dict], path: Path, title: str = "") -> Path:
    """Held-out accuracy (every ``eval/BENCH/MODE``) and training reward / accuracy per iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.count("/") >= 2})
    for key in keys:
        pts = [(r["step"], 100 * r[key]) for r in records if r.get(key) is not None]
        ax_eval.plot(*zip(*pts), marker="o", label=key[len("eval/"):])
    ax_eval.set(xlabel="RL iteration", ylabel="held-out accuracy (%)", title="held-out")
    if keys:
        ax_eval.legend(fontsize=8)
    for key, label in (("reward/accuracy", "answer accuracy"), ("reward/mean", "reward")):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax_train.plot(*zip(*pts), label=label)
    ax_train.set(xlabel="RL iteration", title="training rollouts")
    ax_train.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
