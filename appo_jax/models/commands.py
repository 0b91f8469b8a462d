"""CLI: ``appo-jax plan`` -- per-device memory of a model + mesh + batch (nothing is allocated)."""
from __future__ import annotations

import argparse
import json

from appo_jax.models.loading import load_config
from appo_jax.models.memory_plan import plan_memory


def _mesh(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"--mesh wants DATA,FSDP,TENSOR (e.g. 1,8,1), got {text!r}")
    return sizes


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-device bytes of params / optimizer / activations / KV cache")
    p.add_argument("--model", required=True, help="preset name, HF directory or .gguf file")
    p.add_argument("--mesh", type=_mesh, default=(1, 1, 1), help="DATA,FSDP,TENSOR sizes (default 1,1,1)")
    p.add_argument("--batch", type=int, default=16, help="sequences per train step (global)")
    p.add_argument("--seq-len", type=int, default=8192, help="prompt + response tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--kv-batch", type=int, default=0, help="sampler slots (global; 0 = no KV cache)")
    p.add_argument("--kv-len", type=int, default=0, help="sampler cache length per slot")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--remat", default="full", help="remat policy (none, full, dots, ...)")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    config = load_config(args.model, dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat)
    data, fsdp, tensor = args.mesh
    plan = plan_memory(config, data=data, fsdp=fsdp, tensor=tensor, batch=args.batch, seq_len=args.seq_len,
                       micro_batches=args.micro_batches, kv_batch=args.kv_batch, kv_len=args.kv_len)
    print(json.dumps({"model": args.model, **plan}))
    return 0
