"""`appo-jax rollout`: run the agentic tool loop on a dataset and dump every rollout as one JSON line.

    appo-jax rollout --model smollm2-135m-instruct --dataset gsm8k --split test --limit 4 --n 4 --n-init 2 \\
        --branch appo --out rollouts.jsonl

``--branch`` names a rollout strategy (`appo_jax.rollout.strategies.STRATEGIES`): ``independent`` (n
independent rollouts per prompt), ``appo`` (n_init initial rollouts, APPO branch points chosen with
`appo_jax.core.branch_points.choose_branch_points`, then n - n_init branches), ``arpo`` / ``aepo``
(entropy-triggered branching after tool results), ``tree`` (Tree-GRPO step-level expansion). For ``appo`` the
current log-probs are recomputed with a full forward of the *same* parameters and the baseline is the sampler's
(``omega_baseline="sampler"`` with no update in between), so ``D = lc - lb`` is only numerical noise, Omega is
(near) constant and the score degrades to entropy-only ranking, as documented (docs/algorithm.md §1.1).
"""
from __future__ import annotations

import argparse
import json
import sys

from appo_jax.core.trajectory import FINISH_NAMES, KIND_BRANCH
from appo_jax.rollout.config import RolloutConfig
from appo_jax.rollout.engine import RolloutBatch


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
    # deferred: model, data and engine imports take seconds; other commands need not pay them
    import time

    import jax
    import jax.numpy as jnp

    from appo_jax.core.candidates import candidate_token_table
    from appo_jax.data import encode_records, load_dataset
    from appo_jax.models.loading import load_policy
    from appo_jax.models.logprobs import make_logprob_fn
    from appo_jax.progress import RolloutProgress
    from appo_jax.rollout.engine import RolloutEngine, default_tools
    from appo_jax.rollout.strategies import STRATEGIES

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    cfg = RolloutConfig(max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
                        tool_call_limit=args.tool_call_limit, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, num_slots=args.slots,
                        decode_chunk=args.decode_chunk, tool_workers=args.tool_workers,
                        tool_timeout_s=args.tool_timeout)
    records = load_dataset(args.dataset, args.split, limit=args.limit, seed=args.seed, data_dir=args.data_dir)
    config, params, tokenizer = load_policy(args.model, args.tokenizer or "", dtype=args.dtype)
    prompts, too_long = encode_records(records, tokenizer, max_prompt_len=cfg.max_prompt_len)
    if too_long:
        r = too_long[0]
        raise ValueError(f"record {r.id!r} of {r.dataset!r}: prompt has {len(r.prompt_ids)} tokens > "
                         f"--max-prompt-len {cfg.max_prompt_len} ({len(too_long)} prompt(s) too long)")
    logprob_fn = make_logprob_fn(config, chunk=512, temperature=cfg.temperature or 1.0)

    def current_and_sampler(traj):
        lc = logprob_fn(params, jnp.asarray(traj.prompt_tokens), jnp.asarray(traj.prompt_mask),
                        jnp.asarray(traj.tokens), jnp.asarray(traj.response_mask))
        return lc, jnp.asarray(traj.behavior_logp)

    strategy = STRATEGIES.get(args.branch)(n=args.n, n_init=args.n_init,
                                            table=candidate_token_table(tokenizer, args.branching_parity),
                                            logprobs=current_and_sampler, aepo_penalty=cfg.aepo_penalty,
                                            parity=args.branching_parity)
    cfg = cfg.fitted(prompts, len(prompts) * strategy.rollouts_per_prompt)  # the KV cache holds what this call needs
    t0 = time.perf_counter()
    with default_tools(cfg) as tools, RolloutProgress(f"rollout ({args.branch})") as progress:
        engine = RolloutEngine(config, params, tokenizer, tools, cfg)
        print(f"rollout: {len(prompts)} prompts of {args.dataset} x {args.n} rollouts ({args.branch}); "
              f"{engine.describe()}", file=sys.stderr, flush=True)
        try:
            batch = strategy.sample(engine, lambda k: prompts[:k], len(prompts), jax.random.key(args.seed),
                                    progress).batch
        finally:
            engine.close()
    wall = time.perf_counter() - t0
    prompts_text = [tokenizer.decode(list(p.prompt_ids)) for p in prompts]
    count = 0
    with open(args.out, "w") as f:
        for rec in rollout_records(batch, prompts_text, [r.question for r in prompts]):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
    t = batch.traj
    summary = {"out": args.out, "rollouts": count, "prompts": len(prompts), "branch": args.branch,
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
    p.add_argument("--split", default=None, help="dataset split (default: the dataset's own)")
    p.add_argument("--data-dir", default=None, help="directory holding benchmarks/, rl/, search/")
    p.add_argument("--limit", type=int, default=None, help="first K prompts")
    p.add_argument("--n", type=int, default=4, help="rollouts per prompt (total budget)")
    p.add_argument("--n-init", type=int, default=2, help="initial rollouts per prompt (branching modes)")
    p.add_argument("--branch", default="independent",
                   help="rollout strategy of appo_jax.rollout.strategies: independent (default), appo, arpo, aepo, "
                        "tree")
    p.add_argument("--branching-parity", default="appo_jax", choices=("appo_jax", "official"),
                   help="arithmetic of the Branching Score for --branch appo (docs/official_differences.md)")
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
