"""Run the mini-reproduction grid: every (task, method, seed) of experiments/mini/config.py, one after another.

    python experiments/mini/run_grid.py --methods grpo,arpo,appo,appo_entropy_only --seeds 1,2,3,4,5 \\
        --tasks kb_multihop --out runs/mini/grid
    python experiments/mini/report.py runs/mini/grid

Runs live in ``OUT/TASK/METHOD/seedS`` (metrics.jsonl, config.json, result.json). Resumable: a run with a
``result.json`` is finished and skipped (never overwritten); an unfinished one starts again from its last
checkpoint or from scratch. All runs share one process (compiled functions are reused across runs of the same
shapes) and one SFT cache per task and seed (``OUT/sft``). ``--set KEY=VALUE`` overrides every run's config (e.g.
``train.steps=2`` for a smoke run); ``OUT/grid.json`` records the overrides, and a later call with other
overrides is refused (an output dir holds one grid).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load_config_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mini_config", HERE / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names(text: str, known, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise SystemExit(f"run_grid: unknown {what} {unknown or text!r}; known: {', '.join(known)}")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"run_grid: --seeds {text!r} must be comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"run_grid: --seeds {text!r} must be distinct non-negative integers")
    return seeds


def _check_grid(out: Path, overrides: list[str]) -> None:
    """OUT/grid.json: the overrides of the grid in this dir; another grid's dir is refused."""
    marker = out / "grid.json"
    record = {"grid": "experiments/mini", "overrides": sorted(overrides)}
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old != record:
            raise SystemExit(f"run_grid: {out} holds another grid (overrides {old.get('overrides')}, now "
                             f"{record['overrides']}); choose another --out")
    elif out.exists() and any(p.name != "grid.json" for p in out.iterdir()):
        raise SystemExit(f"run_grid: {out} exists and is not a grid output dir (no grid.json); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=1) + "\n")


def run_one(module, task: str, method: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """Train one run (or skip a finished one); returns its result.json content."""
    from appo_jax.training.config import apply_overrides, to_dict
    from appo_jax.training.trainer import Trainer

    workdir = out / task / method / f"seed{seed}"
    cfg = apply_overrides(module.get_config(f"{method},{task},{seed}"),
                          [f"sft.cache_dir={out / 'sft'}", *overrides])
    done = workdir / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("config") != json.loads(json.dumps(to_dict(cfg), default=float)):  # as stored (tuples -> lists)
            raise SystemExit(f"run_grid: {workdir} is a finished run of another config (seed collision); it is "
                             "never overwritten: choose another --out or other seeds")
        return result
    ckpts = workdir / "checkpoints"
    resume = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    if workdir.exists() and not resume:
        shutil.rmtree(workdir)  # an unfinished run without a checkpoint starts again
    t0 = time.perf_counter()
    trainer = Trainer(cfg, workdir=str(workdir), resume=resume)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    result = {"task": task, "method": method, "seed": seed, "seconds": time.perf_counter() - t0,
              "summary": summary, "config": to_dict(cfg)}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    os.replace(tmp, done)
    return result


def main(argv=None) -> None:
    module = _load_config_module()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="grpo,appo", help=f"comma-separated, of: {', '.join(module.METHODS)}")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--tasks", default="kb_multihop", help=f"comma-separated, of: {', '.join(module.TASKS)}")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every run's config")
    args = ap.parse_args(argv)
    methods = _names(args.methods, module.METHODS, "method(s)")
    tasks = _names(args.tasks, module.TASKS, "task(s)")
    seeds = _seeds(args.seeds)
    _check_grid(args.out, args.set)
    # seed-major order: every method gets its first seeds before any method gets more
    runs = [(t, m, s) for t in tasks for s in seeds for m in methods]
    print(f"run_grid: {len(runs)} runs ({len(tasks)} task(s) x {len(methods)} method(s) x {len(seeds)} seed(s)) "
          f"-> {args.out}", flush=True)
    t0, ran = time.perf_counter(), 0
    for k, (task, method, seed) in enumerate(runs, 1):
        fresh = not (args.out / task / method / f"seed{seed}" / "result.json").is_file()
        result = run_one(module, task, method, seed, args.out, args.set)
        ran += fresh
        elapsed = time.perf_counter() - t0
        eta = elapsed / ran * sum(1 for r in runs[k:]) if ran else 0.0
        acc = result["summary"].get("final_eval", {})
        print(f"[{k}/{len(runs)}] {task} {method} seed {seed}: {'ran' if fresh else 'done before'} in "
              f"{result['seconds']:.0f}s, held-out {acc}; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
