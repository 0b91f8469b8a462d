"""`appo-jax rollout`: run the agentic tool loop on a dataset and dump every rollout as one JSON line.

    appo-jax rollout --model smollm2-135m-instruct --dataset gsm8k --split test --limit 4 --n 4 --n-init 2 \\
        --branch appo --out rollouts.jsonl

``--branch none``: ``n`` independent rollouts per prompt. ``appo``: ``n_init`` initial rollouts, APPO branch
points chosen with :mod:`appo_jax.core.branching` (entropy x future value Omega, top ``n - n_init`` per prompt),
then ``n - n_init`` branch rollouts. Omega needs the trainer's log-probs: here they are recomputed with a full
forward pass of the *same* parameters (``omega_baseline="sampler"`` with no update in between), so
``D = lc - lb`` is only numerical noise (exactly 0 up to float error), Omega is constant, and the score degrades
to entropy-only ranking — the documented degenerate behaviour (docs/algorithm.md §1.1). ``arpo`` / ``aepo``:
entropy-triggered branching after tool results; ``tree``: Tree-GRPO step-level expansion (docs/algorithm.md §1.7).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax

from appo_jax.core.trajectory import FINISH_NAMES, KIND_BRANCH
from appo_jax.progress import RolloutProgress
from appo_jax.rollout.engine import (PromptItem, RolloutBatch, RolloutConfig, RolloutEngine, concat_batches,
                                     default_tools)

BRANCH_MODES = ("none", "appo", "arpo", "aepo", "tree")


def prompt_items(records, tokenizer, max_prompt_len: int) -> list[PromptItem]:
    """PromptItems of data records: the record's chat messages rendered with the tokenizer's chat template
    (generation prompt appended) and tokenized without extra special tokens; the reward is the ability's
    default (``arpo_math`` for math, ``arpo_f1`` for QA)."""
    from appo_jax.data.templates import apply_chat_template
    from appo_jax.rewards.registry import reward_for_ability

    items = []
    for rec in records:
        ids = tokenizer.encode(apply_chat_template(tokenizer, rec.prompt), add_special_tokens=False)
        if len(ids) > max_prompt_len:
            raise ValueError(f"record {rec.id!r} of {rec.dataset!r}: prompt has {len(ids)} tokens > "
                             f"--max-prompt-len {max_prompt_len}")
        items.append(PromptItem(list(ids), list(rec.ground_truths), rec.data_source,
                                reward_for_ability(rec.ability)))
    return items


def load_policy(model: str, tokenizer_path: str | None, dtype: str):
    """(config, params, tokenizer) from ``load_model``; ``tokenizer_path`` (HF dir or .gguf) is required when
    the model source carries no tokenizer (presets)."""
    from appo_jax.models.loading import load_model

    config, params, tokenizer = load_model(model, dtype=dtype)
    if tokenizer_path:
        from transformers import AutoTokenizer
        if tokenizer_path.endswith(".gguf"):
            import os
            tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(tokenizer_path)),
                                                      gguf_file=os.path.basename(tokenizer_path))
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer; pass --tokenizer (an HF directory or a .gguf file)")
    return config, params, tokenizer


def appo_branch_points(engine: RolloutEngine, params, config, batch: RolloutBatch, num_groups: int, budget: int,
                       temperature: float):
    """APPO branch points of an initial batch (docs/algorithm.md §1.1-1.2) with log-probs recomputed by a full forward
    of ``params``: returns ``select_branch_points``' ``(rows, positions, scores, valid)``, each ``[G, B]``."""
    from appo_jax.core.candidates import candidate_token_table
    from appo_jax.core.trajectory import to_device

    table = candidate_token_table(engine.tokenizer)
    return _appo_points(params, to_device(batch.traj), table, config=config, num_groups=num_groups,
                        budget=budget, temperature=temperature if temperature > 0 else 1.0)


@functools.partial(jax.jit, static_argnames=("config", "num_groups", "budget", "temperature"))
def _appo_points(params, traj, table, *, config, num_groups: int, budget: int, temperature: float):
    """One jitted op: lc (chunked recompute) -> Omega(lc - lb) -> candidates -> BS -> per-group top-B."""
    from appo_jax.core.branching import branching_scores, future_values, select_branch_points
    from appo_jax.core.candidates import candidate_mask
    from appo_jax.training.logprobs import trajectory_logprobs

    lc, _ = trajectory_logprobs(params, traj, config=config, temperature=temperature)
    omega = future_values(lc - traj.behavior_logp, traj.gen_mask, gamma=1.0, clip_eps=0.2)
    cand = candidate_mask(traj.tokens, traj.gen_mask & traj.row_valid[:, None], table, traj.tokens.shape[1])
    scores, strict = branching_scores(traj.entropy, omega, cand)
    return select_branch_points(scores, strict, cand, traj.group_id, num_groups, budget)


def rollout_records(batch: RolloutBatch, prompts_text: list[str], questions: list[str]):
    """One JSON-able dict per valid row of ``batch`` (see the module doc of the CLI)."""
    t = batch.traj
    for i in range(t.num_rows):
        if not t.row_valid[i]:
            continue
        n = int((t.gen_mask[i] | t.obs_mask[i]).sum())
        g = int(t.group_id[i])
        yield {
            "row": i,
            "group": g,
            "question": questions[g],
            "prompt": prompts_text[g],
            "text": batch.texts[i],
            "token_ids": t.tokens[i, :n].tolist(),
            "generated_mask": t.gen_mask[i, :n].astype(int).tolist(),
            "observation_mask": t.obs_mask[i, :n].astype(int).tolist(),
            "logprobs": [round(float(x), 6) for x in t.behavior_logp[i, :n]],
            "entropies": [round(float(x), 6) for x in t.entropy[i, :n]],
            "tool_calls": [{"name": c.name, "input": c.input, "output": c.output} for c in batch.tool_calls[i]],
            "reward": float(t.reward[i]),
            "finish_reason": FINISH_NAMES[int(t.finish_reason[i])],
            "kind": "branch" if t.kind[i] == KIND_BRANCH else "init",
            "parent": int(t.parent[i]),
            "branch_position": int(t.branch_pos[i]),
            "branch_score": float(t.branch_score[i]),
            "tree_id": int(batch.tree_id[i]),
        }


def _run(args: argparse.Namespace) -> int:
    from appo_jax.data.builders import load_split

    if args.n < 1 or not 1 <= args.n_init <= args.n:
        raise ValueError(f"need n >= 1 and 1 <= n-init <= n, got --n {args.n} --n-init {args.n_init}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    records = load_split(args.dataset, args.split, args.data_dir, args.limit)
    config, params, tokenizer = load_policy(args.model, args.tokenizer, args.dtype)
    cfg = RolloutConfig(max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
                        tool_call_limit=args.tool_call_limit, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, num_slots=args.slots,
                        decode_chunk=args.decode_chunk, tool_workers=args.tool_workers,
                        tool_timeout_s=args.tool_timeout)
    items = prompt_items(records, tokenizer, cfg.max_prompt_len)
    cfg = cfg.fitted(items, len(items) * args.n)  # the KV cache holds what this call needs
    key = jax.random.key(args.seed)
    k_init, k_branch = jax.random.split(key)
    t0 = time.perf_counter()
    with default_tools(cfg) as tools, RolloutProgress(f"rollout ({args.branch})") as progress:
        engine = RolloutEngine(config, params, tokenizer, tools, cfg)
        print(f"rollout: {len(items)} prompts of {args.dataset} x {args.n} rollouts ({args.branch} branching"
              f"{'' if args.branch == 'none' else f', {args.n_init} initial'}); {engine.describe()}",
              file=sys.stderr, flush=True)
        try:
            if args.branch == "none":
                batch = engine.initial_batch(items, args.n, k_init, progress)
            elif args.branch == "appo":
                batch = engine.initial_batch(items, args.n_init, k_init, progress)
                if args.n > args.n_init:
                    points = appo_branch_points(engine, params, config, batch, len(items), args.n - args.n_init,
                                                cfg.temperature)
                    batch = concat_batches(batch, engine.branches_batch(batch.traj, items, *points, k_branch,
                                                                        progress))
            elif args.branch in ("arpo", "aepo"):
                batch = engine.arpo_batch(items, args.n, args.n_init, k_init, variant=args.branch, progress=progress)
            else:
                batch = engine.tree_batch(items, args.n, args.n_init, k_init, progress)
        finally:
            engine.close()
    wall = time.perf_counter() - t0
    prompts_text = [tokenizer.decode(it.prompt_ids) for it in items]
    questions = [r.question for r in records]
    count = 0
    with open(args.out, "w") as f:
        for rec in rollout_records(batch, prompts_text, questions):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
    t = batch.traj
    summary = {"out": args.out, "rollouts": count, "prompts": len(items), "branch": args.branch,
               "mean_reward": float(t.reward[t.row_valid].mean()) if count else 0.0,
               "generated_tokens": int(t.gen_mask.sum()), "tool_calls": int(t.tool_calls.sum()),
               "wall_s": round(wall, 2)}
    print(json.dumps(summary), file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``appo-jax rollout`` (module doc) to the CLI."""
    p = subparsers.add_parser("rollout", help="run agentic rollouts (tool loop, branching) on a dataset -> JSONL",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset name, smollm2-135m-instruct, HF directory or .gguf file")
    p.add_argument("--tokenizer", default=None, help="tokenizer (HF dir or .gguf) when the model has none")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. gsm8k, hotpotqa, train_10k")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--data-dir", default=None, help="directory holding benchmarks/, rl/, search/")
    p.add_argument("--limit", type=int, default=None, help="first K prompts")
    p.add_argument("--n", type=int, default=4, help="rollouts per prompt (total budget)")
    p.add_argument("--n-init", type=int, default=2, help="initial rollouts per prompt (branching modes)")
    p.add_argument("--branch", default="none", choices=BRANCH_MODES, help="branching scheme")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--max-response-len", type=int, default=1024)
    p.add_argument("--tool-call-limit", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="evaluation-style repetition penalty (1 = off; the recorded log-probs are then those of "
                        "the penalised distribution)")
    p.add_argument("--slots", type=int, default=32,
                   help="most concurrent sampler slots (the KV cache holds min(this, prompts x n) rows)")
    p.add_argument("--decode-chunk", type=int, default=16, help="decode steps per host check")
    p.add_argument("--tool-workers", type=int, default=8)
    p.add_argument("--tool-timeout", type=float, default=10.0, help="python tool wall-clock limit (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output JSONL path")
    p.set_defaults(func=_run)
