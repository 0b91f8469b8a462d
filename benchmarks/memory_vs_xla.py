"""`appo-jax plan` against XLA's compiled memory analysis of the real train step, for small configs on CPU.

    python benchmarks/memory_vs_xla.py          # ~20 compilations, a few minutes on 2 cores; a markdown table

Each row compiles the jitted train step (`appo_jax.training.compiled_memory.compare_with_xla`: abstract inputs,
nothing allocated) on a mesh of fake CPU devices and prints the plan's relative error (plan / XLA - 1) of
params, optimizer, activations (against XLA's ``temp_size_in_bytes``) and temp (the plan's gradients + gathered
weights + activations against the same). Float32 compute except the bf16 rows (XLA:CPU computes bfloat16 in
float32, so those show what the CPU cannot check). Batch rows of ``seq`` tokens, a quarter of them prompt.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

#: (preset, remat, (data, fsdp, tensor), batch, seq, micro-batches, ModelConfig overrides)
CASES = [
    *[("tiny-llama", remat, mesh, 16, 256, 1, {}) for remat in ("full", "none")
      for mesh in ((1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2))],
    ("tiny-llama", "full", (1, 4, 2), 16, 256, 2, {}),
    ("tiny-llama", "none", (1, 4, 2), 16, 256, 2, {}),
    ("tiny-qwen2", "full", (2, 2, 2), 32, 128, 1, {}),
    ("tiny-qwen2", "none", (2, 2, 2), 32, 128, 1, {}),
    ("tiny-qwen3", "full", (1, 1, 1), 8, 512, 1, {}),
    ("tiny-qwen3", "none", (1, 1, 1), 8, 512, 1, {}),
    ("mini-tasks", "full", (1, 8, 1), 32, 256, 2, {}),
    ("mini-tasks", "none", (1, 8, 1), 32, 256, 2, {}),
    ("tiny-llama", "full", (1, 1, 1), 8, 256, 1, {"vocab_size": 8192}),
    ("tiny-llama", "dots", (2, 2, 2), 16, 256, 1, {}),
    ("tiny-llama", "dots_with_no_batch_dims_saveable", (2, 2, 2), 16, 256, 1, {}),
    ("tiny-llama", "full", (1, 1, 1), 16, 256, 1, {"dtype": "bfloat16"}),
    ("tiny-llama", "none", (1, 1, 1), 16, 256, 1, {"dtype": "bfloat16"}),
]


def main() -> None:
    from appo_jax.training.compiled_memory import compare_with_xla
    from appo_jax.models.presets import get_config

    print("| model | remat | mesh | batch x seq / micro-batches | XLA temp MiB | params | optimizer | activations | "
          "temp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, remat, mesh, batch, seq, micro, extra in CASES:
        cfg = get_config(preset).replace(remat_policy=remat, **extra)
        out = compare_with_xla(cfg, data=mesh[0], fsdp=mesh[1], tensor=mesh[2], batch=batch, seq_len=seq,
                               micro_batches=micro)
        err = out["relative_error"]
        name = preset + "".join(f" {k}={v}" for k, v in extra.items())
        print(f"| {name} | {remat} | {','.join(map(str, mesh))} | {batch} x {seq} / {micro} | "
              f"{out['xla']['temp'] / 2**20:.1f} | " + " | ".join(f"{100 * err[k]:+.1f}%" for k in
                                                                   ("params", "optimizer", "activations", "temp"))
              + " |", flush=True)


if __name__ == "__main__":
    main()
