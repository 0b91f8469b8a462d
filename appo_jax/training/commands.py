"""CLI: ``appo-jax train`` and ``appo-jax eval`` (wired into ``appo_jax.cli`` through :func:`register`).

    appo-jax train --config experiments/paper/table1_reasoning.py:qwen2.5-7b,appo [--set optimizer.lr=2e-6 ...] [--resume]
    appo-jax train --list-algorithms
    appo-jax eval --model smollm2-135m-instruct --benchmarks gsm8k,hotpotqa [--limit 20] [--runs 5]
"""
from __future__ import annotations

import functools
import json
import sys

from appo_jax.rollout.config import RolloutConfig


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


def _eval(args) -> int:
    # deferred: model, data and engine imports take seconds; other commands need not pay them
    from appo_jax.data import dataset_names
    from appo_jax.models.loading import load_policy
    from appo_jax.rollout.engine import default_tools
    from appo_jax.training.evaluation import evaluate_pass1, markdown_table

    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not names:
        raise ValueError("--benchmarks is empty; give a comma-separated list such as gsm8k,hotpotqa")
    unknown = [n for n in names if n.lower() not in dataset_names()]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}; known datasets: {', '.join(dataset_names())}")
    rollout = RolloutConfig(max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
                            tool_call_limit=args.tool_call_limit, num_slots=args.num_slots)
    log = functools.partial(print, file=sys.stderr, flush=True)  # stdout holds only the table
    log(f"eval: loading {args.model}")
    model_config, params, tokenizer = load_policy(args.model, args.tokenizer or "", dtype=args.dtype)
    with default_tools(rollout) as tools:
        results = evaluate_pass1(model_config, params, tokenizer, tools, names, limit=args.limit, runs=args.runs,
                                 rollout=rollout, data_dir=args.data_dir or "", seed=args.seed,
                                 system_prompt=args.system_prompt or "", log=log)
    results.pop("_engine").close()
    counts = results.pop("_counts")
    print(markdown_table(results, counts, args.runs))
    return 0


def register(subparsers) -> None:
    """Add the ``train`` and ``eval`` subcommands."""
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

    e = subparsers.add_parser(
        "eval", help="pass@1 of a model on benchmarks (markdown table)",
        description="Evaluate pass@1 of a model on benchmarks with the tool loop (temperature 0.6, top_p 0.95, "
                    "repetition penalty 1.1) and print a markdown table; progress goes to stderr.")
    e.add_argument("--model", required=True,
                   help="preset name (random weights), smollm2-135m-instruct, an HF directory or a .gguf file")
    e.add_argument("--benchmarks", required=True, help="comma-separated dataset names, e.g. gsm8k,hotpotqa,aime24")
    e.add_argument("--limit", type=int, default=None, help="first K questions of each benchmark (default: all)")
    e.add_argument("--runs", type=int, default=5, help="runs per question (pass@1 averages them)")
    e.add_argument("--tokenizer",
                   help="tokenizer (smollm2-135m-instruct, a .gguf file or an HF directory) instead of the model's own; "
                        "required for a random preset (default: the model's own)")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    e.add_argument("--max-prompt-len", type=int, default=2048, help="most prompt tokens (longer questions are skipped)")
    e.add_argument("--max-response-len", type=int, default=2048,
                   help="response budget in tokens (generated + tool results)")
    e.add_argument("--tool-call-limit", type=int, default=3, help="most tool calls per rollout")
    e.add_argument("--num-slots", type=int, default=32,
                   help="most concurrent sampler slots (the KV cache holds min(this, questions x runs) rows)")
    e.add_argument("--system-prompt", help="replace the benchmark prompts' system prompt (default: keep it)")
    e.add_argument("--data-dir",
                   help="directory holding benchmarks/, rl/, search/ (default: $APPO_DATA_DIR, else the shipped data)")
    e.add_argument("--seed", type=int, default=0, help="PRNG seed (sampling)")
    e.set_defaults(func=_eval)
