"""Per-device memory plan for a model + mesh + batch, without allocating anything (docs/architecture.md §Scale).

Parameter, optimizer and KV-cache bytes are exact: shapes come from ``jax.eval_shape`` of the real
initialiser / cache, and each array's per-device shard shape from the same logical-axis rules the trainer uses
(`appo_jax.parallel.rules.logical_to_spec`) on an ``AbstractMesh`` -- so a v5p-256 pod can be planned on a
laptop. Activation bytes are an analytic estimate of the train step's peak (documented in `activation_bytes`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import init_params, param_logical_axes
from appo_jax.models.kv_cache import init_cache
from appo_jax.parallel.mesh import abstract_mesh
from appo_jax.parallel.rules import DEFAULT_RULES, sharded_bytes

GIB = 1024**3


def activation_bytes(config: ModelConfig, tokens_per_device: int, seq_len: int, tensor: int,
                     logits_chunk: int = 1024) -> int:
    """Estimated peak activation bytes of one micro-batch's forward + backward on one device.

    With ``b = compute itemsize``, ``T = tokens_per_device``, ``D = hidden``, ``F = intermediate / tensor``,
    ``H = heads / tensor``, ``S = seq_len``:

    * remat (any policy but "none"): the layer inputs ``num_layers * T * D * b`` are saved, plus one layer's
      recomputed internals ``T * (4 D + 3 F) * b + T * H * S * 4`` (float32 attention scores, O(T S));
    * "none": every layer keeps its internals: ``num_layers * (T * (4 D + 3 F) * b + T * H * S * 4)``;
    * plus the chunked log-prob head: ``T_chunk * vocab / tensor * 4 * 2`` (logits and their gradient) with
      ``T_chunk = min(T, logits_chunk * T / S)``.
    """
    b = jnp.dtype(config.dtype).itemsize
    d, f = config.hidden_size, -(-config.intermediate_size // tensor)
    heads = -(-config.num_heads // tensor)
    per_layer = tokens_per_device * (4 * d + 3 * f) * b + tokens_per_device * heads * seq_len * 4
    if config.remat_policy == "none":
        body = config.num_layers * per_layer
    else:
        body = config.num_layers * tokens_per_device * d * b + per_layer
    rows = max(tokens_per_device // max(seq_len, 1), 1)
    head = min(tokens_per_device, rows * logits_chunk) * -(-config.vocab_size // tensor) * 4 * 2
    return int(body + head)


def plan_memory(config: ModelConfig, *, data: int = 1, fsdp: int = 1, tensor: int = 1, batch: int = 16,
                seq_len: int = 8192, micro_batches: int = 1, kv_batch: int = 0, kv_len: int = 0,
                optimizer_moments: int = 2, optimizer_dtype: str = "float32",
                rules: Mapping = DEFAULT_RULES) -> dict:
    """Per-device bytes of params, optimizer state, activations and KV cache (and their total).

    ``batch`` sequences of ``seq_len`` tokens per train step, split over ``data * fsdp`` devices and into
    ``micro_batches`` accumulation steps; gradients are counted like params (one accumulator).
    ``optimizer_moments`` float arrays of the param shapes (2 for AdamW). The KV cache of ``kv_batch`` slots
    x ``kv_len`` tokens is the sampler's (0 = none).
    """
    mesh = abstract_mesh(data, fsdp, tensor)
    batch_shards = data * fsdp
    if batch % (batch_shards * micro_batches):
        raise ValueError(f"batch {batch} does not divide into data*fsdp={batch_shards} devices x "
                         f"{micro_batches} micro-batches")
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    axes = param_logical_axes(config)
    params = sharded_bytes(shapes, axes, mesh, rules)
    grads = params
    optimizer = optimizer_moments * sharded_bytes(shapes, axes, mesh, rules, dtype=optimizer_dtype)
    tokens = batch // (batch_shards * micro_batches) * seq_len
    activations = activation_bytes(config, tokens, seq_len, tensor)
    kv = 0
    if kv_batch and kv_len:
        if kv_batch % batch_shards:
            raise ValueError(f"kv_batch {kv_batch} does not divide into data*fsdp={batch_shards} devices")
        cache = jax.eval_shape(lambda: init_cache(config, kv_batch, kv_len))
        kv = sharded_bytes(cache, cache.logical_axes(), mesh, rules)
    parts = {"params": params, "gradients": grads, "optimizer": optimizer, "activations": activations,
             "kv_cache": kv}
    return {
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "num_params": int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))),
        "bytes_per_device": {**parts, "total": sum(parts.values())},
        "gib_per_device": {k: round(v / GIB, 3) for k, v in {**parts, "total": sum(parts.values())}.items()},
    }
