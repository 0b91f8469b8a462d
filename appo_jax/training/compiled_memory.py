"""XLA's own per-device memory of the real train step, to check `memory_plan.plan_memory` against.

`compiled_memory` builds the jitted train step of `appo_jax.training.train_step` (the same function, optimizer
and state / batch shardings the trainer uses) on a mesh of real local devices, lowers and compiles it for
abstract inputs (``jax.ShapeDtypeStruct`` with shardings: nothing is allocated) and reads
``compiled.memory_analysis()``. For an SPMD program that analysis is of the per-partition module, i.e. per
device (`compiled_memory` checks it: the argument bytes equal the sum of the per-device shards of the inputs).
"""
from __future__ import annotations

import math

import jax
import numpy as np

from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import init_params
from appo_jax.models.memory_plan import plan_memory
from appo_jax.models.sharding import param_shardings
from appo_jax.parallel.mesh import make_mesh
from appo_jax.parallel.rules import activation_sharding, batch_sharding
from appo_jax.training.batch import TrainBatch
from appo_jax.training.config import OptimizerSection
from appo_jax.training.state import create_train_state, make_optimizer
from appo_jax.training.train_step import StepConfig, _compiled_step, state_shardings


def _shard_bytes(struct, sharding) -> int:
    return math.prod(sharding.shard_shape(tuple(struct.shape))) * np.dtype(struct.dtype).itemsize


def train_step_inputs(config: ModelConfig, mesh, batch: int, prompt_len: int, response_len: int):
    """Abstract ``(state, train batch)`` of the train step on ``mesh`` (ShapeDtypeStructs with the trainer's
    shardings) and the state's shardings."""

    tx = make_optimizer(OptimizerSection(), 100)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    shape = jax.eval_shape(lambda p: create_train_state(p, tx, 0), params)
    shardings = state_shardings(shape, param_shardings(config, mesh), mesh)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape, shardings)

    def rows(shp, dtype):
        return jax.ShapeDtypeStruct(shp, dtype, sharding=batch_sharding(mesh, len(shp)))

    n, p, length = batch, prompt_len, response_len
    tb = TrainBatch(prompt_tokens=rows((n, p), np.int32), prompt_mask=rows((n, p), np.bool_),
                    tokens=rows((n, length), np.int32), response_mask=rows((n, length), np.bool_),
                    loss_mask=rows((n, length), np.bool_), old_logp=rows((n, length), np.float32),
                    advantages=rows((n, length), np.float32))
    return state, tb, shardings


def compiled_memory(config: ModelConfig, *, data: int = 1, fsdp: int = 1, tensor: int = 1, batch: int = 8,
                    seq_len: int = 128, micro_batches: int = 1, prompt_len: int | None = None,
                    logprob_chunk: int = 512, devices=None) -> dict:
    """Per-device bytes XLA reports for the compiled train step (one mini-batch of ``batch`` rows of
    ``seq_len = prompt_len + response_len`` tokens, ``micro_batches`` accumulation steps, AdamW with
    clipping, no KL term) on a ``data x fsdp x tensor`` mesh of local ``devices`` (default the first ones).

    Returns ``{"params", "optimizer", "batch", "state_other", "argument", "output", "alias", "temp",
    "generated_code", "peak", "argument_is_per_device"}``: params / optimizer / batch / state_other (step and
    PRNG key) are the per-device shard bytes of those inputs under the compiled executable's input shardings;
    ``argument_is_per_device`` says that their sum equals ``argument_size_in_bytes`` (so the analysis is per
    device); ``temp`` is ``temp_size_in_bytes`` (activations, gradients, gathered weights and every other
    intermediate of the step); ``peak = argument + output - alias + temp``.
    """

    n = data * fsdp * tensor
    devices = list(devices if devices is not None else jax.devices()[:n])
    if len(devices) < n:
        raise ValueError(f"a {data}x{fsdp}x{tensor} mesh needs {n} devices, {len(devices)} available")
    mesh = make_mesh(data, fsdp, tensor, devices=devices[:n])
    prompt_len = prompt_len if prompt_len is not None else seq_len // 4
    response_len = seq_len - prompt_len
    state, tb, shardings = train_step_inputs(config, mesh, batch, prompt_len, response_len)
    cfg = StepConfig.make(config, {}, micro_batches=micro_batches, logprob_chunk=logprob_chunk)
    leaves, treedef = jax.tree.flatten(shardings)
    fn = _compiled_step(cfg, None, (treedef, tuple(leaves)))  # the jitted step TrainStepRunner runs
    with activation_sharding(mesh):
        compiled = fn.lower(state, tb).compile()
    mem = compiled.memory_analysis()
    in_state, in_batch = compiled.input_shardings[0]

    def part(tree, sh):
        return sum(_shard_bytes(s, h) for s, h in zip(jax.tree.leaves(tree), jax.tree.leaves(sh)))

    in_state_sh = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(in_state))
    params = part(state.params, in_state_sh.params)
    optimizer = part(state.opt_state, in_state_sh.opt_state)
    other = part((state.step, state.rng), (in_state_sh.step, in_state_sh.rng))
    batch_bytes = part(tb, in_batch)
    out = {"params": params, "optimizer": optimizer, "batch": batch_bytes, "state_other": other,
           "argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
           "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
           "generated_code": int(mem.generated_code_size_in_bytes)}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["argument_is_per_device"] = out["argument"] == params + optimizer + other + batch_bytes
    return out


def compare_with_xla(config: ModelConfig, *, data: int = 1, fsdp: int = 1, tensor: int = 1, batch: int = 8,
                     seq_len: int = 128, micro_batches: int = 1, prompt_len: int | None = None,
                     logprob_chunk: int = 512, devices=None) -> dict:
    """`plan_memory` next to `compiled_memory` for the same step. ``relative_error`` = plan / XLA - 1 of
    ``params``, ``optimizer`` (XLA's includes AdamW's and the clip's step counts), ``activations`` (the plan's
    activations against XLA's ``temp``) and ``temp`` (the plan's gradients + gathered weights + activations,
    everything it expects beyond the state and the batch, against XLA's ``temp``)."""

    prompt_len = prompt_len if prompt_len is not None else seq_len // 4
    xla = compiled_memory(config, data=data, fsdp=fsdp, tensor=tensor, batch=batch, seq_len=seq_len,
                          micro_batches=micro_batches, prompt_len=prompt_len, logprob_chunk=logprob_chunk,
                          devices=devices)
    plan = plan_memory(config, data=data, fsdp=fsdp, tensor=tensor, batch=batch, seq_len=seq_len,
                       micro_batches=micro_batches, prompt_len=prompt_len,
                       logprob_chunk=logprob_chunk)["bytes_per_device"]
    plan_temp = plan["gradients"] + plan["gathered_weights"] + plan["activations"]
    pairs = {"params": (plan["params"], xla["params"]), "optimizer": (plan["optimizer"], xla["optimizer"]),
             "activations": (plan["activations"], xla["temp"]), "temp": (plan_temp, xla["temp"])}
    return {"plan": {**plan, "temp": plan_temp}, "xla": xla,
            "relative_error": {k: round(p / x - 1, 4) for k, (p, x) in pairs.items()}}
