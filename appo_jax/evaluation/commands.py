"""CLI: ``appo-jax eval`` (wired into ``appo_jax.cli`` through :func:`register`).

    appo-jax eval --model smollm2-135m-instruct --benchmarks gsm8k,hotpotqa --limit 4 --runs 2 --out DIR
    appo-jax eval --model runs/my_run@30 --benchmarks gaia --preset official --out DIR \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model qwen2.5-72b-instruct
"""
from __future__ import annotations

import functools
import sys
import time

from appo_jax.rollout.config import RolloutConfig


def _judge(args):
    from appo_jax.rewards.judge import make_judge  # deferred: math-verify; other commands need not pay it

    if bool(args.judge_url) != bool(args.judge_model):
        raise ValueError("--judge-url and --judge-model go together (the endpoint and the model name it serves)")
    if args.judge_url:
        return make_judge("llm", url=args.judge_url, model=args.judge_model, retries=args.judge_retries,
                          backoff_s=args.judge_backoff, timeout_s=args.judge_timeout)
    return make_judge("rule")


def _eval(args) -> int:
    # deferred: model, data and engine imports take seconds; other commands need not pay them
    from appo_jax.data import dataset_names
    from appo_jax.data.loading import split_name
    from appo_jax.rollout.presets import get_preset
    from appo_jax.evaluation.runner import EvalSpec, evaluate_to_dir, summary_markdown
    from appo_jax.rollout.engine import default_tools
    from appo_jax.evaluation.answer_store import check_settings
    from appo_jax.training.policy_source import policy_id, resolve_policy

    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not names:
        raise ValueError("--benchmarks is empty; give a comma-separated list such as gsm8k,hotpotqa")
    unknown = [n for n in names if split_name(n)[0].lower() not in dataset_names()]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}; known datasets: {', '.join(dataset_names())}")
    get_preset(args.preset)
    judge = _judge(args)
    rollout = RolloutConfig(max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
                            tool_call_limit=args.tool_call_limit, num_slots=args.num_slots)
    spec = EvalSpec(names, runs=args.runs, limit=args.limit, preset=args.preset, rollout=rollout, seed=args.seed,
                    system_prompt=args.system_prompt or "", data_dir=args.data_dir or "", dtype=args.dtype)
    out = args.out or f"runs/eval_{time.strftime('%Y%m%d_%H%M%S')}"
    log = functools.partial(print, file=sys.stderr, flush=True)  # stdout holds only the summary
    check_settings(out, spec.settings(policy_id(args.model, args.tokenizer or ""), judge))  # before loading
    log(f"eval: loading {args.model}")
    policy = resolve_policy(args.model, args.tokenizer or "", dtype=args.dtype)
    with default_tools(spec.engine_config()) as tools:
        summary = evaluate_to_dir(policy, spec, out, judge, tools, log=log, progress=not args.no_progress)
    print(summary_markdown(summary))
    failed = sum(s["judge_failed"] for s in summary["benchmarks"].values())
    log(f"eval: {summary['sampled']} answer(s) sampled by this call; summary in {out}/summary.md and summary.json"
        + (f"; {failed} answer(s) the judge could not score (judge_failed)" if failed else ""))
    return 0


def register(subparsers) -> None:
    """Add the ``eval`` subcommand."""
    e = subparsers.add_parser(
        "eval", help="evaluate a model on benchmarks; every answer saved, resumable (the paper's metrics)",
        description="Evaluate a model on benchmarks with the tool loop: every answer is saved as one JSONL row in "
                    "--out (an interrupted evaluation resumes from it), then pass@1 over --runs, unbiased pass@k, "
                    "F1 / EM and the breakdowns are printed as a markdown table (also in OUT/summary.md). "
                    "Progress goes to stderr.")
    e.add_argument("--model", required=True,
                   help="preset name (random weights), smollm2-135m-instruct, an HF directory, a .gguf file, or a "
                        "train workdir (WORKDIR for its latest checkpoint, WORKDIR@STEP for another)")
    e.add_argument("--benchmarks", required=True,
                   help="comma-separated dataset names, e.g. gsm8k,hotpotqa,aime24 (NAME:SPLIT picks a split, e.g. "
                        "arith_program:heldout)")
    e.add_argument("--out", help="directory for answers.jsonl, settings.json and the summary; an existing one is "
                                 "resumed (default: runs/eval_<date>_<time>)")
    e.add_argument("--preset", default="paper", choices=("paper", "official", "greedy"),
                   help="sampling: paper (temperature 0.6, top_p 0.95, repetition penalty 1.1), official (the "
                        "same with top_k 20 and 15 tool calls), greedy")
    e.add_argument("--limit", type=int, default=None, help="first K questions of each benchmark (default: all)")
    e.add_argument("--runs", type=int, default=5, help="runs per question (pass@1 averages them; pass@k for k <= runs)")
    e.add_argument("--judge-url", help="OpenAI-compatible base URL of an LLM judge, e.g. http://127.0.0.1:8000/v1 "
                                       "(default: none, the rule judge)")
    e.add_argument("--judge-model", help="the model name the judge endpoint serves (with --judge-url)")
    e.add_argument("--judge-retries", type=int, default=3, help="retries of a failed judge request (backoff doubles)")
    e.add_argument("--judge-backoff", type=float, default=1.0, help="seconds before the first retry")
    e.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")
    e.add_argument("--tokenizer",
                   help="tokenizer (smollm2-135m-instruct, a .gguf file or an HF directory) instead of the model's "
                        "own; required for a random preset (default: the model's own)")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    e.add_argument("--max-prompt-len", type=int, default=2048, help="most prompt tokens (longer questions are skipped)")
    e.add_argument("--max-response-len", type=int, default=2048,
                   help="response budget in tokens (generated + tool results)")
    e.add_argument("--tool-call-limit", type=int, default=3,
                   help="most tool calls per rollout (the official preset sets 15)")
    e.add_argument("--num-slots", type=int, default=32,
                   help="most concurrent sampler slots (the KV cache holds min(this, answers to sample) rows)")
    e.add_argument("--system-prompt", help="replace the benchmark prompts' system prompt (default: keep it)")
    e.add_argument("--data-dir",
                   help="directory holding benchmarks/, rl/, search/ (default: $APPO_DATA_DIR, else the shipped data)")
    e.add_argument("--seed", type=int, default=0, help="PRNG seed (sampling)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)
