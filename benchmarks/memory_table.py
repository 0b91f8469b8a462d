"""The README's memory table: which remat policy and micro-batch fit the paper's setups on TPU pods.

From `appo_jax.models.memory_plan.plan_memory` (nothing is allocated; runs on a laptop in seconds).

    python benchmarks/memory_table.py            # prints the markdown table

Setup (the official scripts' Table 1 row, experiments/paper/table1_reasoning.py:qwen2.5-7b,appo,official; the
paper's own set uses 4096-token responses, docs/paper_configs.md): sequences of 2048 prompt + 6144 response = 8192
tokens, a PPO
mini-batch of 16 prompts x 16 rollouts = 256 rows per optimizer update, bf16 compute with fp32 master weights,
AdamW, log-prob chunk 1024, the reference policy kept for the KL term (one more copy of the params), and the
sampler's KV cache of 256 slots x 8192 tokens (bf16) held alongside. A setup fits when that total is at most
``--headroom`` (default 90%) of the chip's HBM. For each model and pod the search takes the mesh with the
smallest tensor axis (1, 2, 4; fsdp = the remaining chips), then the cheapest remat policy (none, then
dots_with_no_batch_dims_saveable, dots, full: less recomputation first), then the most rows per device per
micro-batch (8, 4, 2, 1) that fit.
"""
from __future__ import annotations

import argparse

from appo_jax.models.memory_plan import GIB, plan_memory
from appo_jax.models.presets import get_config

MODELS = ("qwen2.5-7b", "llama3.1-8b", "qwen3-8b", "qwen3-14b")
#: pod -> (chips, HBM GiB per chip). v4 / v5p names count TensorCores (2 per chip), v6e names count chips.
PODS = {"v5p-64": (32, 95), "v4-128": (64, 32), "v6e-64": (64, 32)}
POLICIES = ("none", "dots_with_no_batch_dims_saveable", "dots", "full")
MINI_BATCH, PROMPT, SEQ, CHUNK, KV_SLOTS = 256, 2048, 8192, 1024, 256


def planned(model: str, chips: int, tensor: int, policy: str, rows: int) -> dict:
    """Per-device bytes of the setup (module doc) with ``rows`` sequences per device per micro-batch."""
    fsdp = chips // tensor
    cfg = get_config(model, dtype="bfloat16", param_dtype="float32", remat_policy=policy)
    plan = plan_memory(cfg, fsdp=fsdp, tensor=tensor, batch=MINI_BATCH, seq_len=SEQ, prompt_len=PROMPT,
                       micro_batches=MINI_BATCH // (fsdp * rows), logprob_chunk=CHUNK,
                       kv_batch=KV_SLOTS, kv_len=SEQ)["bytes_per_device"]
    return {**plan, "reference": plan["params"], "total": plan["total"] + plan["params"]}


def best(model: str, chips: int, hbm_gib: float, headroom: float):
    """(tensor, policy, rows, plan) of the first setup that fits (module doc), or None."""
    for tensor in (1, 2, 4):
        fsdp = chips // tensor
        for policy in POLICIES:
            for rows in (8, 4, 2, 1):
                if MINI_BATCH % (fsdp * rows):
                    continue
                plan = planned(model, chips, tensor, policy, rows)
                if plan["total"] <= headroom * hbm_gib * GIB:
                    return tensor, policy, rows, plan
    return None


def table(headroom: float = 0.9) -> str:
    lines = ["| model | pod (chips x HBM) | mesh (data, fsdp, tensor) | remat | rows / device / micro-batch "
             "(train.micro_batch_rows) | GiB / device: total = params + grads + optimizer + gathered + "
             "activations + reference + KV |",
             "|---|---|---|---|---|---|"]
    for model in MODELS:
        for pod, (chips, hbm) in PODS.items():
            found = best(model, chips, hbm, headroom)
            if found is None:
                lines.append(f"| {model} | {pod} ({chips} x {hbm} GiB) | - | does not fit | - | - |")
                continue
            tensor, policy, rows, p = found
            g = {k: p[k] / GIB for k in p}
            lines.append(
                f"| {model} | {pod} ({chips} x {hbm} GiB) | 1, {chips // tensor}, {tensor} | {policy} | "
                f"{rows} ({rows * chips // tensor}) | {g['total']:.1f} = {g['params']:.1f} + {g['gradients']:.1f} + "
                f"{g['optimizer']:.1f} + {g['gathered_weights']:.1f} + {g['activations']:.1f} + "
                f"{g['reference']:.1f} + {g['kv_cache']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headroom", type=float, default=0.9, help="fraction of HBM a setup may plan to use")
    args = parser.parse_args()
    print(table(args.headroom))


if __name__ == "__main__":
    main()
