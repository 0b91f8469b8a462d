"""CLI: ``appo-jax train`` (wired into ``appo_jax.cli`` through :func:`register`; ``appo-jax eval`` lives in
:mod:`appo_jax.evaluation.commands`).

    appo-jax train --config experiments/paper/table1_reasoning.py:qwen2.5-7b,appo [--set optimizer.lr=2e-6 ...] [--resume]
    appo-jax train --list-algorithms
"""
from __future__ import annotations

import json
import sys



def list_algorithms() -> str:
    """The registered algorithms (`appo_jax.training.algorithms.ALGORITHMS`), one line each: name, rollout
    strategy, advantage estimator, loss mode and description, under a header line."""
    from appo_jax.training.algorithms import ALGORITHMS  # deferred: imports jax and the core (start-up of the CLI)

    header = ("algorithm", "rollout", "advantage", "loss", "description")
    rows = [header] + [(s.name, s.rollout_strategy, s.advantage, s.loss_mode, s.description or "-")
                       for s in ALGORITHMS.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows)


def _train(args) -> int:
    if args.list_algorithms:
        print(list_algorithms())
        return 0
    if not args.config:
        raise ValueError("--config is required: an experiment file such as experiments/demo_cpu.py (or "
                         "--list-algorithms to list the algorithms)")
    # deferred: the trainer's imports (orbax, tensorboard, ...) take seconds; other commands need not pay them
    import jax

    from appo_jax.parallel.multihost import DistributedError, initialize_distributed, process_summary
    from appo_jax.training.checkpoint import CheckpointError
    from appo_jax.training.config import apply_overrides, load_config
    from appo_jax.training.trainer import Trainer, TrainingError

    # Multi-host (TPU pods, several CPU processes): before any other JAX use; a no-op for one process without a
    # coordinator address.
    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                               auto_detect=args.distributed, heartbeat_timeout_s=args.heartbeat_timeout,
                               initialization_timeout_s=args.init_timeout)
    except (DistributedError, ValueError) as err:
        print(f"appo-jax train: error: {err}", file=sys.stderr)
        return 1
    if jax.process_count() > 1:
        print(f"appo-jax train: {process_summary()}; a process silent for {args.heartbeat_timeout} s stops every "
              "process ('another task died'); continue with --resume from the last complete checkpoint",
              file=sys.stderr, flush=True)
    cfg = apply_overrides(load_config(args.config), args.set or [])
    if args.workdir:
        cfg.workdir = args.workdir
    try:
        trainer = Trainer(cfg, workdir=cfg.workdir, resume=args.resume)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
    except (TrainingError, CheckpointError) as err:
        print(f"appo-jax train: error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(json.dumps(summary, sort_keys=True))
    return 0


def format_summary(summary: dict) -> str:
    """Human-readable end-of-run report: what changed over training and where the outputs are."""
    lines = [f"== {summary['experiment']} ({summary['algorithm']}): {summary['iterations']} iterations =="]
    if "sft_loss" in summary:
        s = summary["sft_loss"]
        lines.append(f"cold-start SFT loss: {s['first']:.3f} -> {s['last']:.3f}")
    names = {"reward/mean": "reward (mean of initial rollouts)", "reward/accuracy": "answer accuracy",
             "response/length": "response length (tokens)", "tools/calls_per_rollout": "tool calls per rollout",
             "branch/count": "branch rollouts per iteration", "train/kl": "KL to reference (loss term)",
             "kl/to_start": "KL to the starting policy", "reward/groups_with_variance": "groups with reward variance",
             "reward/format_ok": "well-formed responses", "entropy/mean": "entropy of generated tokens",
             "train/loss": "policy loss"}
    for key, label in names.items():
        t = summary["trends"].get(key)
        if t:
            lines.append(f"{label:34s} first {t['first']:.4g}  last {t['last']:.4g}  mean {t['mean']:.4g}")
    rewards = summary.get("reward_per_iteration") or []
    if 0 < len(rewards) <= 30:
        lines.append("reward per iteration: " + " ".join("-" if r is None else f"{r:.3g}" for r in rewards))
    for key, c in summary.get("heldout", {}).items():
        if "change_ci95" not in c:
            continue
        (b_lo, b_hi), (a_lo, a_hi), (lo, hi) = c["before_ci95"], c["after_ci95"], c["change_ci95"]
        lines.append(f"held-out {key[len('eval/'):]}: {100 * c['before']:.1f}% [{100 * b_lo:.1f}, {100 * b_hi:.1f}] "
                     f"(iteration {c['first_step']}) -> {100 * c['after']:.1f}% [{100 * a_lo:.1f}, {100 * a_hi:.1f}] "
                     f"(iteration {c['last_step']}): {100 * c['change']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], "
                     f"{c['verdict']} (95% intervals over {c['n']} answers)")
    for warning in summary.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    if "startup" in summary:
        lines.append(f"first iteration after {summary['startup']['first_iteration_s']:.1f} s "
                     f"(train step {summary['startup']['train_step']})")
    if "learning_curve" in summary:
        lines.append(f"learning curve: {summary['learning_curve']}")
    lines.append(f"metrics:     {summary['metrics']}")
    lines.append(f"tensorboard: tensorboard --logdir {summary['tensorboard']}")
    lines.append(f"checkpoints: {summary['checkpoints']} (steps {summary['checkpoint_steps']})")
    for path in summary.get("rollout_dumps", [])[-1:]:
        lines.append(f"rollout dump (open in a browser): {path}")
    return "\n".join(lines)


def register(subparsers) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser(
        "train", help="train a policy with APPO / GRPO / DAPO / ARPO / AEPO / Tree-GRPO / ...",
        description="Run an experiment config (a Python file whose get_config() returns an ExperimentConfig): "
                    "training, evaluation, metrics and checkpoints in its workdir; --list-algorithms lists the "
                    "algorithms that algorithm.name can select.")
    p.add_argument("--config",
                   help="experiment file, e.g. experiments/demo_cpu.py; FILE:ARG passes ARG to get_config (e.g. "
                        "experiments/paper/table1_reasoning.py:qwen2.5-7b,appo); required unless --list-algorithms")
    p.add_argument("--list-algorithms", action="store_true",
                   help="print every registered algorithm (rollout strategy, advantage, loss mode, description) "
                        "and exit")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host job (TPU pod): jax.distributed.initialize with cluster auto-detection")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 for a multi-process job without cluster "
                                         "auto-detection, e.g. 127.0.0.1:12355 for several CPU processes "
                                         "(default: none, one process)")
    p.add_argument("--num-processes", type=int, help="processes in the job (with --coordinator; default: none)")
    p.add_argument("--process-id", type=int,
                   help="this process's index in [0, --num-processes) (with --coordinator; default: none)")
    p.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                   help="a process silent for S seconds is declared dead and every other process exits with an "
                        "error")
    p.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for the coordinator and every process at start-up")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optimizer.lr=1e-5 (repeatable; default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the workdir")
    p.add_argument("--workdir", help="output directory (default: the config's workdir)")
    p.set_defaults(func=_train)
