"""Build the report of a mini-reproduction grid: ``DIR/RESULTS.md``, ``DIR/results.json`` and learning-curve PNGs.

    python experiments/mini/report.py runs/mini/grid [--budget runs/mini/grid_n16]

Per task and method, over seeds: held-out accuracy before RL (the SFT policy), at the end and at its best, each
as ``{mean, ci95: [lo, hi], per_seed}`` (Student-t interval of the mean; one seed: no interval); tool calls per
rollout, generated tokens and seconds per RL iteration. Comparisons: APPO minus each baseline (Welch interval of
the difference of means) and, as a secondary analysis, paired over the seeds both have (`paired_seed_ci`). The
verdict at the top of RESULTS.md says, for APPO vs GRPO and APPO vs ARPO: reproduced (the interval of the
difference lies above 0), refuted (below 0) or inconclusive (it contains 0). ``--budget``:
another grid of GRPO and APPO at another rollout budget per prompt (``--set algorithm.n=16 --set
algorithm.n_init=8``); the report then compares APPO with GRPO at each budget (the paper's equal-budget claim).
``--rerun``: a grid of GRPO and APPO on seeds this one never used; the report says, per task and method, whether
its held-out gain has the same sign and an interval that overlaps this grid's (the result replicates).

Every run the report uses is also written, compactly, to ``DIR/runs.jsonl`` (one line per run: its grid, task,
method, seed, budget, wall time, held-out curves and per-mode statistics; a few KB), the file committed with the
results. The report reads ``DIR/runs.jsonl`` and any ``--records FILE`` back, so it can be rebuilt from committed
records alone (``report.py experiments/mini/results``) and new runs merge with old ones whose run directories are
gone (``report.py runs/mini/grid --records experiments/mini/results/runs.jsonl``). One run (grid, task, method,
seed, budget) is taken from the first of: its run directory, a ``--records`` file (in the order given),
``DIR/runs.jsonl``. Records stay until removed from ``DIR/runs.jsonl`` (a run whose directory is deleted is still
reported from its record).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (df > 30: normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: float) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (interpolated; >= 1)."""
    if df >= len(_T975):
        return 1.96
    lo = max(int(math.floor(df)), 1)
    hi = min(lo + 1, len(_T975))
    w = df - lo
    return (1 - w) * _T975[lo - 1] + w * _T975[hi - 1]


def mean_ci(values) -> dict:
    """``{mean, ci95: [lo, hi] | None, per_seed}``: Student-t 95% interval of the mean (None for one value)."""
    x = np.asarray(values, np.float64)
    out = {"mean": float(x.mean()) if x.size else None, "ci95": None, "per_seed": [float(v) for v in x]}
    if x.size >= 2:
        half = t975(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
        out["ci95"] = [float(x.mean() - half), float(x.mean() + half)]
    return out


def diff_ci(a, b) -> dict | None:
    """Welch 95% interval of mean(a) - mean(b) (None when a side has < 2 values)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2:
        return None
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    d = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": d, "ci95": [d, d]}
    df = (va + vb) ** 2 / ((va ** 2 / (a.size - 1) if a.size > 1 else 0) + (vb ** 2 / (b.size - 1) if b.size > 1 else 0))
    half = t975(df) * se
    return {"diff": d, "ci95": [d - half, d + half]}


def paired_seed_ci(a: dict, b: dict) -> dict | None:
    """``{diff, ci95, seeds}``: `mean_ci` of a[s] - b[s] over the seeds s both have (paired: a grid's methods share
    the SFT policy and, for one seed, the order of the training prompts, so what the seed does to both cancels); None
    with fewer than 2 such seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    stat = mean_ci([a[s] - b[s] for s in seeds])
    return {"diff": stat["mean"], "ci95": stat["ci95"], "seeds": seeds}


def read_runs(root: Path) -> list[dict]:
    """Every finished run under ``root`` (``TASK/METHOD/seedS/result.json``) with its metrics records."""
    runs = []
    for done in sorted(root.glob("*/*/seed*/result.json")):
        result = json.loads(done.read_text())
        records = [json.loads(line) for line in (done.parent / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs.append({**result, "records": records})
    return runs


RECORDS = "runs.jsonl"
_GRIDS = ("main", "budget", "rerun")


def _mode_stats(steps: list, values: list) -> dict:
    """Held-out accuracy of one run in one mode: before RL (the step-0 evaluation), final, best, the mean over the
    evaluations after RL started, and gain = final - before."""
    initial = values[0] if steps and steps[0] == 0 else None
    after = [v for t, v in zip(steps, values) if t > 0]
    return {"initial": initial, "final": values[-1] if values else None, "best": max(values) if values else None,
            "mean_during_rl": float(np.mean(after)) if after else None,
            "gain": None if initial is None or not values else values[-1] - initial}


def run_record(run: dict, task: str | None = None, grid: str = "main", out: str | None = None,
               overrides: list | None = None) -> dict:
    """A run as the report uses it (``runs.jsonl``'s line): held-out curves per evaluation mode (step, accuracy,
    cumulative generated tokens and seconds), their `_mode_stats`, the mean tool calls per rollout, the generated
    tokens and the mean seconds of the RL iterations, the run's budget ``n`` (``algorithm.n``) and wall time, and where
    it came from (``out``, the grid's ``overrides``). A run that already is a record is returned as it is."""
    if "records" not in run:
        return run
    task = task or run["task"]
    curves, modes = {}, {}
    for mode in eval_modes([run], task):
        steps, values, tokens, seconds = _curve(run["records"], f"eval/{task}:heldout/{mode}")
        curves[mode] = {"step": steps, "accuracy": values, "tokens": tokens, "seconds": seconds}
        modes[mode] = _mode_stats(steps, values)
    it = [r for r in run["records"] if r["step"] > 0 and r.get("time/step_s") is not None]
    calls = [r.get("tools/calls_per_rollout", 0.0) for r in it]
    iterations = {"tool_calls_per_rollout": float(np.mean(calls)) if it else 0.0,
                  "generated_tokens": float(sum(r.get("rollout/generated_tokens") or 0.0 for r in it)),
                  "seconds_per_iteration": float(np.mean([r["time/step_s"] for r in it])) if it else 0.0}
    return {"grid": grid, "task": task, "method": run.get("method"), "seed": run["seed"],
            "n": run.get("config", {}).get("algorithm", {}).get("n"), "seconds": run.get("seconds"),
            "out": out, "overrides": overrides, "curves": curves, "modes": modes, "iterations": iterations}


def read_records(path: Path) -> list[dict]:
    """The run records of a ``runs.jsonl`` (see `run_record`); a malformed line is an error naming it."""
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"report: {path}:{i} is not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise SystemExit(f"report: {path}:{i} is not a run record (a JSON {type(rec).__name__}, not an object)")
        missing = {"grid", "task", "method", "seed", "modes"} - set(rec)
        if missing or rec["grid"] not in _GRIDS:
            raise SystemExit(f"report: {path}:{i} is not a run record (missing {sorted(missing)} or grid "
                             f"{rec.get('grid')!r} not one of {_GRIDS})")
        records.append(rec)
    return records


def grid_records(root: Path, grid: str) -> list[dict]:
    """The finished runs of the grid directory ``root`` as records of ``grid``, with the grid's overrides."""
    marker = root / "grid.json"
    overrides = json.loads(marker.read_text()).get("overrides", []) if marker.is_file() else []
    return [run_record(r, grid=grid, out=str(root), overrides=overrides) for r in read_runs(root)]


def merge_records(*sources: list[dict]) -> list[dict]:
    """The records of all ``sources``, one per run (grid, task, method, seed, budget ``n``): the first source holding
    a run wins."""
    seen, out = set(), []
    for source in sources:
        for rec in source:
            key = (rec["grid"], rec["task"], rec["method"], rec["seed"], rec.get("n"))
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return sorted(out, key=lambda r: (_GRIDS.index(r["grid"]), r["task"], r["method"], r["seed"]))


def _curve(records, key):
    """(steps, values, cumulative generated tokens, cumulative seconds) at the records holding ``key``."""
    steps, values, tokens, seconds = [], [], [], []
    tok = sec = 0.0
    for r in records:
        tok += r.get("rollout/generated_tokens") or 0.0
        sec += r.get("time/step_s") or 0.0
        if r.get(key) is not None:
            steps.append(r["step"])
            values.append(r[key])
            tokens.append(tok)
            seconds.append(sec)
    return steps, values, tokens, seconds


def eval_modes(runs: list[dict], task: str) -> list[str]:
    """The evaluation modes (``greedy``, ``train``, ...) of ``eval/TASK:heldout/MODE`` in the runs' metrics (or of
    their records' ``modes``), greedy first."""
    prefix = f"eval/{task}:heldout/"
    modes = {k[len(prefix):] for run in runs if "records" in run for r in run["records"] for k in r
             if k.startswith(prefix)}
    modes |= {m for run in runs if "records" not in run for m in run["modes"]}
    return sorted(modes, key=lambda m: (m != "greedy", m))


def summarize_method(runs: list[dict], task: str, modes: list[str]) -> dict:
    """Per mode: held-out accuracy before RL, final, best, the mean over the evaluations after RL started (the area
    under the learning curve per evaluation: less noisy than one final point) and the gain (final - before), each a
    `mean_ci` over the seeds that have it (`_mode_stats` per run; ``per_seed`` in the order of ``seeds``, leaving out
    a seed whose record lacks the statistic); tool calls per rollout, generated tokens, seconds per iteration. ``runs``: raw runs or their `run_record`. The first mode's before / final / best are also
    ``initial_ / final_ / best_heldout_accuracy`` (the verdict's numbers)."""
    recs = [run_record(r, task) for r in runs]
    stats = ("initial", "final", "best", "mean_during_rl", "gain")
    per_mode = {mode: {k: mean_ci([v for r in recs if (v := r["modes"].get(mode, {}).get(k)) is not None])
                       for k in stats} for mode in modes}
    its = [r["iterations"] for r in recs if r.get("iterations")]
    first = per_mode[modes[0]] if modes else {"initial": mean_ci([]), "final": mean_ci([]), "best": mean_ci([])}
    return {"seeds": [r["seed"] for r in recs], "modes": per_mode, "initial_heldout_accuracy": first["initial"],
            "final_heldout_accuracy": first["final"], "best_heldout_accuracy": first["best"],
            **{k: mean_ci([it[k] for it in its])
               for k in ("tool_calls_per_rollout", "generated_tokens", "seconds_per_iteration")}}


def _fmt(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["ci95"] is not None:
        text += f" [{scale * stat['ci95'][0]:.{digits}f}, {scale * stat['ci95'][1]:.{digits}f}]"
    return text


def verdict(diff: dict | None) -> str:
    if diff is None:
        return "inconclusive (fewer than 2 seeds on a side)"
    lo, hi = diff["ci95"]
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "refuted"
    return "inconclusive"


def learning_check(table: dict, modes: list[str]) -> list[str]:
    """Markdown lines: whether the baseline learns and the no-signal control does not, before any comparison —
    for ``grpo`` and ``grpo_permuted`` when present, the gain (final - before RL) per mode with its interval and
    whether it lies above 0, below 0 or contains it."""
    lines = []
    for method in ("grpo", "grpo_permuted"):
        if method not in table:
            continue
        for mode in modes:
            g = table[method]["modes"][mode]["gain"]
            if g["mean"] is None:
                continue
            ci = g["ci95"]
            word = ("rose" if ci[0] > 0 else "fell" if ci[1] < 0 else "within noise") if ci else "one seed"
            lines.append(f"- {method}, {mode}: gain {_fmt(g)} points over {len(g['per_seed'])} seed(s): **{word}**")
    return (["Does the baseline learn, and the control not?", "", *lines, ""]) if lines else []


def plot_curves(task: str, by_method: dict[str, list[dict]], out: Path) -> list[str]:
    """Two PNGs: mean held-out accuracy against generated tokens and against wall time (seconds of RL), over the
    runs whose curves are recorded (a record recovered without its curves is left out of the plot); none when no run
    has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    by_method = {m: [run_record(r, task) for r in rs] for m, rs in by_method.items()}
    mode = eval_modes([r for rs in by_method.values() for r in rs], task)[0]
    if not any((r.get("curves") or {}).get(mode, {}).get("accuracy") for rs in by_method.values() for r in rs):
        return files  # no curve recorded: no plot
    for axis, label, idx in (("tokens", "generated tokens (all rollouts)", 2), ("time", "RL wall time (s)", 3)):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        colors = plt.get_cmap("tab20")  # 20 distinct colours, then the line style changes: every method its own line
        lines = 0
        for method, runs in sorted(by_method.items()):
            curves = [(c["step"], c["accuracy"], c["tokens"], c["seconds"])
                      for r in runs if (c := (r.get("curves") or {}).get(mode))]
            curves = [c for c in curves if c[1]]
            if not curves:
                continue
            n = min(len(c[1]) for c in curves)
            x = np.mean([c[idx][:n] for c in curves], axis=0)
            y = 100 * np.mean([c[1][:n] for c in curves], axis=0)
            ax.plot(x, y, marker="o", ms=3, color=colors(lines % 20), linestyle=("-", "--", ":")[lines // 20 % 3],
                    label=f"{method} ({len(curves)} seeds)")
            lines += 1
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{task}: held-out accuracy vs {axis} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        name = f"{task}_vs_{axis}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def regenerate_command(root: Path, runs: list[dict]) -> str:
    """The run_grid commands of exactly the runs present: one line per grid directory and distinct (tasks, seeds)
    set of methods (a method whose tasks have different seeds gets a line per task), with the grid's overrides. A
    run's grid is its record's ``out`` and ``overrides`` where it has them, else ``root`` and ``root/grid.json``."""
    marker = root / "grid.json"
    default = json.loads(marker.read_text()).get("overrides", []) if marker.is_file() else []
    lines_of: dict[tuple, list[str]] = {}  # (out, overrides, tasks, seeds) -> methods
    grids = dict.fromkeys((r.get("out") or str(root), tuple(r["overrides"] if r.get("overrides") is not None
                                                             else default)) for r in runs)
    for out, overrides in grids:
        mine = [r for r in runs if (r.get("out") or str(root)) == out
                and tuple(r["overrides"] if r.get("overrides") is not None else default) == overrides]
        for method in dict.fromkeys(r["method"] for r in mine):
            seeds_of = {task: tuple(sorted({r["seed"] for r in mine if r["method"] == method and r["task"] == task}))
                        for task in sorted({r["task"] for r in mine if r["method"] == method})}
            for seeds in dict.fromkeys(seeds_of.values()):
                tasks = tuple(t for t, s in seeds_of.items() if s == seeds)
                lines_of.setdefault((out, overrides, tasks, seeds), []).append(method)
    return "\n".join(f"python experiments/mini/run_grid.py --methods {','.join(methods)} --seeds "
                     f"{','.join(str(s) for s in seeds)} --tasks {','.join(tasks)} --out {out}"
                     + "".join(f" --set {o}" for o in overrides)
                     for (out, overrides, tasks, seeds), methods in lines_of.items())


def pilot_section(pilots: list[dict]) -> list[str]:
    """The pilot analysis (experiments/mini/pilot.py outputs ``DIR/pilot_*.json``) as markdown."""
    out = ["## Pilot analysis: where the decision tokens are, and which rule finds them", ""]
    for p in pilots:
        if p.get("real"):
            out += _real_pilot_lines(p)
            continue
        d = p["decision_tokens"]
        out += [f"### {p['task']} (seed {p['seed']}, SFT policy + {p['rl_steps_before']} APPO steps; {p['prompts']} "
                f"prompts x 4 initial rollouts, initial accuracy {100 * p['initial_accuracy']:.1f}%; "
                f"{p['k']} continuations per chosen point)", "",
                f"`{p['command']}`", "",
                f"(a) Decision tokens: {d['count']} ({100 * d['share_of_generated']:.1f}% of generated tokens); median "
                f"distance to a tool-call boundary {d['median_tokens_to_tool_boundary']} tokens; "
                f"{100 * (d['share_within_1_token_of_boundary'] or 0):.1f}% within one token of one.", "",
                *(["Decision tokens that are branch candidates at all, per candidate rule (`algorithm.candidate_rule`): "
                   + ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["decision_tokens_that_are_candidates"].items()
                               if v is not None), ""] if p.get("decision_tokens_that_are_candidates") else []),
                "Omega's standard deviation over a rollout's tokens, per baseline: "
                + ", ".join(f"{k} {v:.3g}" for k, v in p["omega_std_per_baseline"].items())
                + " (0 means Omega is constant and the Branching Score degrades to entropy).", "",
                "(b) Branch-point rules, 4 points per prompt:", "",
                "| rule | points | decision hit rate | outcome variance | outcome changes | continuation accuracy |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in p["rules"].items():
            f = lambda v, pct=True: "-" if v is None or v != v else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")  # noqa: E731
            out.append(f"| {name} | {r['points']} | {f(r['decision_hit_rate'])} | {f(r['outcome_variance'], False)} | "
                       f"{f(r['outcome_changes'])} | {f(r['continuation_accuracy'])} |")
        out.append("")
    out += ["Hit: a decision token at t, t + 1 or t + 2 of a branch point t (a branch keeps t and resamples from t + 1). "
            "Outcome variance: variance of the 0/1 accuracy of the continuations from one point, averaged over "
            "points; outcome changes: share of points whose continuations disagree.", ""]
    return out


def _budget(runs: list[dict]) -> str:
    """Rollouts per prompt (``algorithm.n``) of the runs, as the report writes it (several: comma-separated)."""
    budgets = {run_record(r).get("n") for r in runs} - {None}
    return ",".join(str(n) for n in sorted(budgets)) or "?"


def _other_grid(other: Path, option: str, grid: str) -> list[dict]:
    """The finished runs of the grid directory given to ``option`` (``--budget`` / ``--rerun``) as records of
    ``grid``; none is an error."""
    runs = grid_records(other, grid)
    if not runs:
        raise SystemExit(f"report: no finished runs under {other} ({option})")
    return runs


def _regenerate_lines(what: str, root: Path, runs: list[dict]) -> list[str]:
    return ["", f"Regenerate {what}:", "", "```", regenerate_command(root, runs), "```", ""]


def budget_section(runs: list[dict], other_runs: list[dict], root: Path) -> tuple[list[str], dict]:
    """APPO vs GRPO at this grid's budget and at the ``other_runs``' (a grid of the same tasks at another
    ``algorithm.n``): per task and budget the final held-out accuracy (first evaluation mode) of each, and APPO - GRPO
    with its Welch interval and verdict."""
    out = ["## Budget sensitivity: APPO vs GRPO at two rollout budgets per prompt", "",
           "| task | rollouts per prompt | mode | GRPO final (seeds) | APPO final (seeds) | APPO - GRPO (points) | "
           "verdict |", "|---|---:|---|---:|---:|---:|---|"]
    table: dict = {}
    for task in sorted({r["task"] for r in runs + other_runs}):
        for grid in (runs, other_runs):
            mine = [r for r in grid if r["task"] == task]
            by = {m: [r for r in mine if r["method"] == m] for m in ("grpo", "appo")}
            if not all(by.values()):
                continue
            modes = eval_modes(mine, task)
            stats = {m: summarize_method(rs, task, modes) for m, rs in by.items()}
            d = diff_ci(stats["appo"]["final_heldout_accuracy"]["per_seed"],
                        stats["grpo"]["final_heldout_accuracy"]["per_seed"])
            budget = _budget(mine)
            table.setdefault(task, {})[budget] = {"grpo": stats["grpo"]["final_heldout_accuracy"],
                                                  "appo": stats["appo"]["final_heldout_accuracy"], "appo - grpo": d}
            diff = "fewer than 2 seeds" if d is None else (
                f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]")
            out.append(f"| {task} | {budget} | {modes[0]} | {_fmt(stats['grpo']['final_heldout_accuracy'])} "
                       f"({len(by['grpo'])}) | {_fmt(stats['appo']['final_heldout_accuracy'])} ({len(by['appo'])}) | "
                       f"{diff} | {verdict(d)} |")
    out += _regenerate_lines("the other budget's runs", root, other_runs)
    return out, table


def _real_pilot_lines(p: dict) -> list[str]:
    """The real-model pilot (``pilot.py --real``): per rule, the share of its points whose continuations disagree."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    out = [f"### On a real model: {p['task']} (seed {p['seed']}, its SFT + {p['rl_steps_before']} APPO steps; "
           f"{p['prompts']} prompts x 4 initial rollouts, initial accuracy {100 * p['initial_accuracy']:.1f}%; "
           f"{p['k']} continuations per chosen point)", "", f"`{p['command']}`", "",
           "No decision labels here: a chosen point is decisive when its continuations disagree in outcome. "
           "Omega's standard deviation over a rollout's tokens, per baseline: "
           + ", ".join(f"{k} {v:.3g}" for k, v in p["omega_std_per_baseline"].items()) + ".", "",
           "| rule | points | decisive share [95% CI, bootstrap over prompts] | minus branching_score_lagged "
           "[95% CI, paired over prompts] | outcome variance | continuation accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in p["rules"].items():
        ci = r.get("outcome_changes_ci95")
        ci = "" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
        paired = r.get("minus_branching_score_lagged")  # pilots before the paired interval have none
        paired = "-" if paired is None else (f"{100 * paired['diff']:+.1f} [{100 * paired['ci95'][0]:+.1f}, "
                                             f"{100 * paired['ci95'][1]:+.1f}]")
        var = "-" if r["outcome_variance"] is None else f"{r['outcome_variance']:.3f}"
        out.append(f"| {name} | {r['points']} | {pct(r['outcome_changes'])}{ci} | {paired} | {var} | "
                   f"{pct(r['continuation_accuracy'])} |")
    return out + [""]


def _overlap(a: list | None, b: list | None) -> bool | None:
    return None if a is None or b is None else bool(a[0] <= b[1] and b[0] <= a[1])


def rerun_section(runs: list[dict], other_runs: list[dict], root: Path) -> tuple[list[str], dict]:
    """This grid against ``other_runs`` (the same config on new seeds): per task and method (GRPO, APPO) the held-out
    gain (first evaluation mode) in each, whether the signs agree and whether the 95% intervals overlap."""
    out = ["## Replication on new seeds", "",
           "| task | method | mode | gain here (seeds) | gain on new seeds (seeds) | same sign | intervals overlap |",
           "|---|---|---|---:|---:|---|---|"]
    table: dict = {}
    for task in sorted({r["task"] for r in other_runs}):
        for method in ("grpo", "appo"):
            here = [r for r in runs if r["task"] == task and r["method"] == method]
            new = [r for r in other_runs if r["task"] == task and r["method"] == method]
            if not here or not new:
                continue
            modes = eval_modes(here + new, task)
            a, b = (summarize_method(rs, task, modes)["modes"][modes[0]]["gain"] for rs in (here, new))
            if a["mean"] is None or b["mean"] is None:
                continue
            same = bool(np.sign(a["mean"]) == np.sign(b["mean"]))
            overlap = _overlap(a["ci95"], b["ci95"])
            table.setdefault(task, {})[method] = {"gain": a, "gain_new_seeds": b, "same_sign": same,
                                                  "intervals_overlap": overlap}
            out.append(f"| {task} | {method} | {modes[0]} | {_fmt(a)} ({len(here)}) | {_fmt(b)} ({len(new)}) | "
                       f"{'yes' if same else '**no**'} | "
                       f"{'-' if overlap is None else 'yes' if overlap else '**no**'} |")
    out += _regenerate_lines("the new seeds' runs", root, other_runs)
    return out, table


def build_report(root: Path, budget: Path | None = None, rerun: Path | None = None,
                 records: tuple[Path, ...] = ()) -> dict:
    """The report of the grid ``root`` (its run directories and ``root/runs.jsonl``), the ``budget`` and ``rerun``
    grid directories and the run records of ``records``; writes RESULTS.md, results.json, the PNGs and runs.jsonl
    (every run used) into ``root``; ``root/STATUS.md``, when present, goes below the title."""
    own = root / RECORDS
    every = merge_records(grid_records(root, "main"),
                          _other_grid(budget, "--budget", "budget") if budget is not None else [],
                          _other_grid(rerun, "--rerun", "rerun") if rerun is not None else [],
                          *(read_records(f) for f in tuple(records) + ((own,) if own.is_file() else ())))
    runs = [r for r in every if r["grid"] == "main"]
    if not runs:
        raise SystemExit(f"report: no finished runs under {root} (expected TASK/METHOD/seedS/result.json or "
                         f"{RECORDS})")
    results: dict = {"grid": str(root), "tasks": {}}
    lines = ["# Mini reproduction: results", ""]
    if (root / "STATUS.md").is_file():  # what the grid holds so far and what follows, written by whoever runs it
        lines += [(root / "STATUS.md").read_text().strip(), ""]
    body = []
    verdicts = []
    for task in sorted({r["task"] for r in runs}):
        by_method: dict[str, list[dict]] = {}
        for r in runs:
            if r["task"] == task:
                by_method.setdefault(r["method"], []).append(r)
        modes = eval_modes([r for rs in by_method.values() for r in rs], task)
        table = {m: summarize_method(rs, task, modes) for m, rs in sorted(by_method.items())}
        comparisons = {}
        detail = {}  # "appo - base" -> {"MODE final" | "MODE mean during RL": diff_ci}
        paired = {}  # "appo - base" -> {"MODE final": paired_seed_ci}
        finals = {m: {mode: {rec["seed"]: rec["modes"][mode]["final"] for rec in rs
                             if rec["modes"].get(mode, {}).get("final") is not None} for mode in modes}
                  for m, rs in by_method.items()}  # method -> mode -> seed -> final accuracy (runs are records)
        if "appo" in table:
            for base in sorted(table):
                if base != "appo":
                    paired[f"appo - {base}"] = {
                        f"{mode} final": paired_seed_ci(finals["appo"][mode], finals[base][mode]) for mode in modes}
                    comparisons[f"appo - {base}"] = diff_ci(table["appo"]["final_heldout_accuracy"]["per_seed"],
                                                            table[base]["final_heldout_accuracy"]["per_seed"])
                    detail[f"appo - {base}"] = {
                        f"{mode} {stat.replace('_', ' ')}": diff_ci(table["appo"]["modes"][mode][stat]["per_seed"],
                                                                    table[base]["modes"][mode][stat]["per_seed"])
                        for mode in modes for stat in ("final", "mean_during_rl")}
        for base in ("grpo", "arpo"):
            if f"appo - {base}" in comparisons:
                d = comparisons[f"appo - {base}"]
                v = verdict(d)
                ci = "" if d is None else f" (difference {100 * d['diff']:+.1f} points, 95% CI [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}])"
                verdicts.append(f"- **{task}, APPO vs {base.upper()}: {v}**{ci}")
        plots = plot_curves(task, by_method, root)
        results["tasks"][task] = {"methods": table, "comparisons": comparisons, "comparisons_by_mode": detail,
                                  "comparisons_paired": paired, "plots": plots}
        body += [f"## {task}", "",
                 f"Held-out accuracy (%, mean [95% CI] over seeds) per evaluation mode ({', '.join(modes)}; "
                 "`train` = pass@1 at the training temperature); gain = final - before RL, per seed. The verdicts use "
                 f"the `{modes[0] if modes else '-'}` final accuracy.", "",
                 "| method | seeds | mode | before RL | final | best | mean during RL | gain (points) |",
                 "|---|---:|---|---:|---:|---:|---:|---:|"]
        for m, s in table.items():
            for mode, st in s["modes"].items():
                body.append(f"| {m} | {len(s['seeds'])} | {mode} | {_fmt(st['initial'])} | {_fmt(st['final'])} | "
                            f"{_fmt(st['best'])} | {_fmt(st['mean_during_rl'])} | {_fmt(st['gain'])} |")
        body += ["", *learning_check(table, modes)]
        body += ["", "| method | tool calls / rollout | generated tokens | s / iteration |", "|---|---:|---:|---:|"]
        for m, s in table.items():
            body.append(f"| {m} | {_fmt(s['tool_calls_per_rollout'], 1.0, 2)} | {_fmt(s['generated_tokens'], 1.0, 0)} | "
                        f"{_fmt(s['seconds_per_iteration'], 1.0, 1)} |")
        if detail:
            columns = list(next(iter(detail.values())))
            body += ["", "APPO minus each method (points, Welch 95% CI over seeds):", "",
                     "| APPO minus | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
            for name, row in detail.items():
                body.append(f"| {name[len('appo - '):]} | " + " | ".join(
                    "fewer than 2 seeds" if d is None else
                    f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
                    for d in row.values()) + " |")
        if paired:
            columns = list(next(iter(paired.values())))
            body += ["", "APPO minus each method, paired over the seeds both have (points; Student-t 95% CI of the "
                     "per-seed differences: the methods share the SFT policy and, for one seed, the order of the training "
                     "prompts, so what the seed does to both cancels; a secondary analysis, the verdicts use the Welch intervals above):", "",
                     "| APPO minus | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
            for name, row in paired.items():
                seeds = max((len(d["seeds"]) for d in row.values() if d is not None), default=0)
                body.append(f"| {name[len('appo - '):]} | {seeds} | " + " | ".join(
                    "fewer than 2 common seeds" if d is None else
                    f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
                    for d in row.values()) + " |")
        lost = sum(1 for rs in by_method.values() for r in rs if not r.get("curves"))
        why = "whose records were recovered without their curves (their `origin` in runs.jsonl says from where)"
        body += ["", *[f"![{p}]({p})" for p in plots], *([""] if lost else []),
                 *([f"The plots leave out {lost} run(s) {why}; the tables include them." if plots else
                    f"No learning-curve plot: every run here is one {why}."] if lost else []), ""]
    lines += ["## Verdict", "", *(verdicts or ["- no APPO-vs-baseline comparison in this grid"]), "",
              "Reproduced = the 95% interval of the difference of final held-out accuracy lies above 0; refuted = "
              "below 0; inconclusive = it contains 0.", ""]
    again = (f"python experiments/mini/report.py {root}" + ("" if budget is None else f" --budget {budget}")
             + ("" if rerun is None else f" --rerun {rerun}") + "".join(f" --records {f}" for f in records))
    timed = [r["seconds"] for r in runs if r.get("seconds") is not None]
    spent = (f"{len(runs)} runs, {sum(timed) / 60:.1f} minutes of training in all (sum of the runs' wall times, SFT "
             "included where a run trained it)." if len(timed) == len(runs) else
             f"{len(runs)} runs, all of them records recovered without their wall times." if not timed else
             f"{len(runs)} runs; the {len(timed)} with a recorded wall time trained {sum(timed) / 60:.1f} minutes in "
             f"all (SFT included where a run trained it), the other {len(runs) - len(timed)} are records recovered "
             "without one.")
    lines += ["## Regenerate", "", "```", regenerate_command(root, runs), again, "```", "", spent, ""]
    lines += body
    for grid, section_of in (("budget", budget_section), ("rerun", rerun_section)):
        other = [r for r in every if r["grid"] == grid]
        if other:
            section, results[grid] = section_of(runs, other, root)
            lines += section
    pilots = [json.loads(p.read_text()) for p in sorted(root.glob("pilot_*.json"))]
    if pilots:
        results["pilot"] = pilots
        lines += pilot_section(pilots)
    results["verdicts"] = verdicts
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    tmp = own.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in every))
    tmp.replace(own)
    (root / "RESULTS.md").write_text("\n".join(lines) + "\n")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--budget", type=Path, default=None,
                    help="a grid of GRPO and APPO at another rollout budget per prompt, compared with this one")
    ap.add_argument("--rerun", type=Path, default=None,
                    help="a grid of GRPO and APPO on new seeds: does this one's held-out gain replicate there")
    ap.add_argument("--records", type=Path, action="append", default=[], metavar="FILE",
                    help="run records (a runs.jsonl another report wrote, e.g. experiments/mini/results/runs.jsonl) "
                         "to merge with the runs found here; repeatable")
    args = ap.parse_args(argv)
    for d in (args.dir, args.budget, args.rerun):
        if d is not None and not d.is_dir():
            raise SystemExit(f"report: {d} is not a directory")
    for f in args.records:
        if not f.is_file():
            raise SystemExit(f"report: --records {f} is not a file")
    results = build_report(args.dir, args.budget, args.rerun, tuple(args.records))
    print(f"report: wrote {args.dir / 'RESULTS.md'} and results.json ({len(results['tasks'])} task(s))")


if __name__ == "__main__":
    sys.exit(main())
