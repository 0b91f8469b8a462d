"""CLI: ``appo-jax plan`` -- per-device memory of a model + mesh + batch (nothing is allocated); with
``--compare-xla`` next to XLA's compiled memory analysis of the real train step on the local devices."""
from __future__ import annotations

import argparse
import json
import sys

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
    p = subparsers.add_parser(
        "plan", help="per-device bytes of params / optimizer / activations / KV cache",
        description="Plan the per-device memory of training a model on a mesh (params, optimizer, gradients, "
                    "activations, the sampler's KV cache) without allocating anything; one JSON line. "
                    "--compare-xla also compiles the real train step and compares with XLA's memory analysis.")
    p.add_argument("--model", required=True, help="preset name, HF directory or .gguf file")
    p.add_argument("--mesh", type=_mesh, default=(1, 1, 1), help="DATA,FSDP,TENSOR sizes (default: 1,1,1)")
    p.add_argument("--batch", type=int, default=16, help="sequences per train step (global)")
    p.add_argument("--seq-len", type=int, default=8192, help="prompt + response tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per train step (gradient accumulation)")
    p.add_argument("--kv-batch", type=int, default=0, help="sampler slots (global; 0 = no KV cache)")
    p.add_argument("--kv-len", type=int, default=0, help="sampler cache length per slot")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32", help="parameter (master weight) dtype")
    p.add_argument("--remat", default="full", help="remat policy (none, full, dots, ...)")
    p.add_argument("--prompt-len", type=int, default=0,
                   help="prompt tokens of --seq-len (the log-prob head scores the rest; default: 0, with "
                        "--compare-xla seq-len / 4)")
    p.add_argument("--logprob-chunk", type=int, default=512, help="train.logprob_chunk (log-prob head chunk)")
    p.add_argument("--compare-xla", action="store_true",
                   help="also compile the real train step on the local devices (abstract inputs, nothing "
                        "allocated) and print XLA's per-device memory analysis and the plan's relative errors; "
                        "use a small config (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8 for "
                        "a mesh of 8)")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    config = load_config(args.model, dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat)
    data, fsdp, tensor = args.mesh
    if args.compare_xla:
        return _compare(args, config)
    plan = plan_memory(config, data=data, fsdp=fsdp, tensor=tensor, batch=args.batch, seq_len=args.seq_len,
                       micro_batches=args.micro_batches, kv_batch=args.kv_batch, kv_len=args.kv_len,
                       prompt_len=args.prompt_len, logprob_chunk=args.logprob_chunk)
    print(json.dumps({"model": args.model, **plan}))
    return 0


def _compare(args, config) -> int:
    import jax

    # deferred: compiling the train step pulls in the trainer's modules; a plain plan needs none of them
    from appo_jax.training.compiled_memory import compare_with_xla

    data, fsdp, tensor = args.mesh
    if data * fsdp * tensor > jax.device_count():
        print(f"error: --mesh {data},{fsdp},{tensor} needs {data * fsdp * tensor} devices, {jax.device_count()} "
              f"available (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={data * fsdp * tensor})",
              file=sys.stderr)
        return 2
    result = compare_with_xla(config, data=data, fsdp=fsdp, tensor=tensor, batch=args.batch, seq_len=args.seq_len,
                              micro_batches=args.micro_batches, prompt_len=args.prompt_len or None,
                              logprob_chunk=args.logprob_chunk)
    out = {"model": args.model, "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
           "device": jax.devices()[0].device_kind, **result}
    if config.dtype != "float32" and jax.default_backend() == "cpu":
        out["note"] = "XLA:CPU computes bfloat16 in float32; compare activations with --dtype float32"
    print(json.dumps(out))
    return 0
