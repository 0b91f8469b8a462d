"""Decode step time of the sampler with stacked vs unstacked layer weights (SmolLM2-135M-Instruct, float32).

XLA's CPU backend materialises every slice of a stacked weight ``layers/...[i]`` (a copy per layer and call)
before its dot; ``Sampler(..., unstack_weights=True)`` keeps an unstacked copy instead
(`appo_jax.models.decoder.unstack_layers`). This script measures both layouts side by side in one process: for
each batch size, a `Sampler` with the weights as loaded (stacked) and one with ``unstack_weights``, each decoding ``--new-tokens``
tokens per row after a 32-token prompt, ``--runs`` timed runs after a compiling one (median ms per step). The
first 8 tokens of row 0 are recorded for both: the layouts must sample the same tokens.

Prints one JSON object. Run: ``python benchmarks/sampler_layouts.py [--batches 1,2,8]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from appo_jax.models.loading import find_smollm2_gguf, load_model
    from appo_jax.rollout.sampler import Sampler, cache_len_for
    from appo_jax.rollout.sampling import SamplingParams
    from appo_jax.training.multihost_check import processor_name

    config, params, _ = load_model(find_smollm2_gguf(), dtype="float32")
    out = {"benchmark": "sampler_layouts", "device": jax.devices()[0].device_kind, "processor": processor_name(),
           "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "new_tokens": args.new_tokens,
           "runs": args.runs, "ms_per_step": {}, "speedup": {}, "same_tokens": {}}
    for b in [int(x) for x in args.batches.split(",")]:
        prompts, first = [list(range(3, 35))] * b, {}
        for layout in ("stacked", "unstacked"):
            s = Sampler(config, params, num_slots=b, max_len=cache_len_for([32] * b, args.new_tokens),
                        sampling=SamplingParams(1.0), eos_token_ids=(), decode_chunk=32,
                        unstack_weights=layout == "unstacked")
            times = []
            for _ in range(args.runs + 1):
                s.start(list(range(b)), prompts, [jax.random.key(i) for i in range(b)])
                jax.block_until_ready(s.cache)
                t0 = time.perf_counter()
                chunk = s.decode(np.ones(b, bool), args.new_tokens)
                times.append((time.perf_counter() - t0) / args.new_tokens * 1e3)
            out["ms_per_step"].setdefault(layout, {})[str(b)] = round(statistics.median(times[1:]), 2)
            first[layout] = chunk.tokens[0][:8].tolist()
        out["speedup"][str(b)] = round(out["ms_per_step"]["stacked"][str(b)] / out["ms_per_step"]["unstacked"][str(b)], 3)
        out["same_tokens"][str(b)] = first["stacked"] == first["unstacked"]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
