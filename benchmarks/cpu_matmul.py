"""The CPU kernel for decode-step products (`appo_jax.kernels.cpu_matmul`) against XLA's dot, in GB/s of weights.

Shapes are SmolLM2-135M's: ``layers`` = the products of 8 decoder layers (q, k, v, o, gate, up, down, 120 MB,
beyond the last-level cache) chained in one jitted function, ``head`` = the tied LM head (x . E^T, E [49152, 576],
113 MB). The kernel reads the weights as column panels (`pack_panels`); XLA's dot reads them as the model stores
them ([K, N] kernels, E [V, D]). For each row count M of ``--rows``, the two run alternately ``--runs`` times;
the medians give GB/s (weight bytes / seconds) and the ratio kernel / XLA; ``stream_GB_per_s`` is the streaming
bandwidth measured in the same process (`appo_jax.rollout.throughput.measure_memory_bandwidth`). The largest row
count where the kernel still wins is what `appo_jax.kernels.cpu_matmul.KERNEL_MAX_ROWS` says.

``cached`` is the kernel's compute ceiling: one 576 x 576 product (1.3 MB of weights, half per thread: inside
each core's L2) repeated ``--cached-reps`` times in one jitted loop, so no weight comes from memory; its GB/s of
weights (and multiply-adds per second, M K N / seconds) is the most the kernel could reach at M rows if memory
were infinitely fast. A row count whose memory-bound rate (``layers``) comes near it is bound by the
multiply-adds as much as by memory (on a 2-core Zen 4, 8 rows: every weight takes 8 multiply-adds, so one
512-bit FMA a cycle a core consumes 8 bytes of float32 weights a cycle a core).

Progress goes to stderr; the last stdout line is one JSON object. Run: ``python benchmarks/cpu_matmul.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _timed(run) -> float:
    """Seconds of ``run()`` until its result is ready."""
    t0 = time.perf_counter()
    run().block_until_ready()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--cached-reps", type=int, default=2000)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from appo_jax.kernels.build import kernel_status
    from appo_jax.kernels.cpu_matmul import kernel_matmul, pack_panels
    from appo_jax.rollout.throughput import measure_memory_bandwidth
    from appo_jax.training.multihost_check import processor_name

    ok, why = kernel_status()
    if not ok:
        raise SystemExit(f"cpu_matmul: the kernel is not available here: {why}")
    rng = np.random.default_rng(0)
    hidden, inter, q, kv, vocab, layers = 576, 1536, 576, 192, 49152, 8
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    kn_weights = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02) for _ in range(layers) for s in shapes]
    embedding = jnp.asarray(rng.standard_normal((vocab, hidden), dtype=np.float32) * 0.02)

    def chain(mm):
        def f(x, ws):  # every product reads its weights (its input: x, or x's first columns repeated for K = inter)
            wide = jnp.tile(x, (1, -(-inter // hidden)))[:, :inter]
            total = jnp.zeros((x.shape[0],), jnp.float32)
            for w in ws:
                total = total + mm(x if w.shape[-2 if w.ndim == 3 else 0] == hidden else wide, w)[:, 0]
            return total
        return jax.jit(f)

    packed = [pack_panels(w) for w in kn_weights]
    kinds = {  # name: (weights of the kernel, of XLA, bytes, kernel, XLA)
        "layers": (packed, kn_weights, sum(w.size * 4 for w in kn_weights),
                   chain(lambda x, w: kernel_matmul(x, w, w.shape[0] * w.shape[2])), chain(lambda x, w: x @ w)),
        "head": (pack_panels(embedding.T), embedding, embedding.size * 4,
                 jax.jit(lambda x, wp: kernel_matmul(x, wp, vocab)),
                 jax.jit(lambda x, e: jnp.einsum("md,vd->mv", x, e))),
    }
    bandwidth = measure_memory_bandwidth()
    results = {}
    square = rng.standard_normal((hidden, hidden), dtype=np.float32) * 0.02
    cached_wp = pack_panels(jnp.asarray(square))

    @jax.jit
    def cached(x, wp):  # the same product --cached-reps times, each on the last one's output (nothing to hoist)
        return jax.lax.fori_loop(0, args.cached_reps, lambda _, h: kernel_matmul(h, wp, hidden), x)

    for m in [int(r) for r in args.rows.split(",")]:
        x = jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32))
        cached(x, cached_wp).block_until_ready()  # compile
        seconds = statistics.median(_timed(lambda: cached(x, cached_wp)) for _ in range(args.runs))
        results[f"cached_rows{m}"] = {"kernel_GB_per_s": round(args.cached_reps * square.nbytes / seconds / 1e9, 1),
                                      "kernel_GFMA_per_s": round(args.cached_reps * m * square.size / seconds / 1e9, 1)}
        print("cached", m, results[f"cached_rows{m}"], file=sys.stderr, flush=True)
    for kind, (kernel_weights, xla_weights, nbytes, kernel, xla) in kinds.items():
        for m in [int(r) for r in args.rows.split(",")]:
            x = jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32))
            times = {"kernel": [], "xla": []}
            sides = (("kernel", kernel, kernel_weights), ("xla", xla, xla_weights))
            for name, f, weights in sides:
                f(x, weights).block_until_ready()  # compile
            for _ in range(args.runs):
                for name, f, weights in sides:
                    times[name].append(_timed(lambda: f(x, weights)))
            gbps = {name: nbytes / statistics.median(ts) / 1e9 for name, ts in times.items()}
            results[f"{kind}_rows{m}"] = {"kernel_GB_per_s": round(gbps["kernel"], 1),
                                          "xla_GB_per_s": round(gbps["xla"], 1),
                                          "kernel_vs_xla": round(gbps["kernel"] / gbps["xla"], 2)}
            print(kind, m, results[f"{kind}_rows{m}"], file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "cpu_matmul", "results": results, "stream_GB_per_s": round(bandwidth / 1e9, 1),
                      "runs": args.runs, "kernel": why, "processor": processor_name(), "cpus": os.cpu_count(),
                      "jax": jax.__version__}))


if __name__ == "__main__":
    main()
