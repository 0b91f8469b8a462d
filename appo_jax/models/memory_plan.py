"""Per-device memory plan for a model + mesh + batch, without allocating anything (docs/architecture.md §Scale).

Parameter, optimizer and KV-cache bytes are exact: shapes come from ``jax.eval_shape`` of the real
initialiser / cache, and each array's per-device shard shape from the same logical-axis rules the trainer uses
(`appo_jax.parallel.rules.logical_to_spec`) on an ``AbstractMesh`` -- so a v5p-256 pod can be planned on a
laptop. Gradients, gathered weights and activations are an estimate of what XLA keeps at the train step's
peak (documented in `activation_bytes` and `plan_memory`), checked against XLA's own compiled memory analysis
of the real train step by `appo_jax.training.compiled_memory` (tests/test_memory_plan.py).
"""
from __future__ import annotations

import functools
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

#: remat policy -> (kept per layer for the backward pass, working set of one layer's backward pass), each as
#: coefficients (a, f, d, q, kv) of ``a * A + T * b * (f * F + d * D + q * Q + kv * K)`` (`activation_bytes`).
REMAT_KEEPS = {
    "full": ((0, 0, 1, 0, 0), (3.5, 6, 6, 1.5, 3)),
    "none": ((2, 6, 8, 2, 2), (3.5, 2, 2, 0, 0)),
    "dots": ((1, 2, 2, 2, 2), (4, 2, 6, 2, 0)),
    "dots_with_no_batch_dims_saveable": ((0, 2, 2, 1, 2), (4, 0, 5, 3, 0)),
}
_REMAT_ALIASES = {"nothing_saveable": "full", "dots_saveable": "dots", "everything_saveable": "none"}


def _per_device(n: int, tensor: int) -> int:
    """``n / tensor`` when the tensor axis divides ``n`` (the rules shard it), else ``n`` (replicated)."""
    return n // tensor if n % tensor == 0 else n


def activation_bytes(config: ModelConfig, rows: int, seq_len: int, tensor: int = 1, logprob_chunk: int = 512,
                     response_len: int | None = None) -> int:
    """Estimated peak activation bytes on one device of one micro-batch's forward + backward: ``rows``
    sequences of ``seq_len`` tokens (the model reads ``S = seq_len - 1``), of which ``response_len`` (default
    all) are scored by the chunked log-prob head (``logprob_chunk`` positions per chunk).

    With ``b`` the compute itemsize, ``T = rows * S`` tokens, ``D = hidden``, and per device (divided by the
    tensor axis where it divides them) ``F = intermediate``, ``H = heads``, ``Q = heads * head_dim``,
    ``K = kv_heads * head_dim``, ``V = vocab``; ``A = T * H * S * 4`` (one float32 attention-score tensor)::

        activations = num_layers * kept + max(layer_backward, head) + rows * S * S

    ``kept`` (per layer, saved by the forward for the backward) and ``layer_backward`` (the working set of one
    layer's backward, incl. its recomputed internals) are ``a A + T b (f F + d D + q Q + kv K)`` with
    (a, f, d, q, kv) from `REMAT_KEEPS`:

    ================================ ================================ ==================================
    remat policy                     kept per layer                   layer backward
    ================================ ================================ ==================================
    full, nothing_saveable           T b D (the layer input)          3.5 A + T b (6F + 6D + 1.5Q + 3K)
    none, everything_saveable        2 A + T b (6F + 8D + 2Q + 2K)    3.5 A + T b (2F + 2D)
    dots, dots_saveable              A + T b (2F + 2D + 2Q + 2K)      4 A + T b (2F + 6D + 2Q)
    dots_with_no_batch_dims_saveable T b (2F + 2D + Q + 2K)           4 A + T b (5D + 3Q)
    ================================ ================================ ==================================

    The score-sized part of the layer backward is what XLA keeps live there -- the softmax probabilities, their
    gradient and the score gradient (float32), and the mask broadcast over heads (bool, ``A / 4``) -- plus the
    heap fragmentation around these large buffers (``A / 4`` more; ``3 / 4 A`` with the dots policies). The
    ``T b`` parts count the projection / MLP tensors (and their gradients) XLA holds, e.g. ``none`` keeps 6 of
    width F per layer (gate, up and their products) and 8 of width D; with ``full`` the recomputing backward
    holds up to 8F + 8D + 2Q + 4K, not always while all the score-sized ones are live (3/4 of it fits the
    measurements). ``head``: the log-prob head's float32
    logits and their gradient for one chunk, ``2 * rows * min(logprob_chunk, response_len) * V * 4`` (the peak
    is in the head's backward instead of a layer's when that is larger); ``rows * S * S``: the boolean
    attention mask. The coefficients are read from XLA's buffer assignment of the real train step (the CPU
    compiler, float32 compute) and checked against ``temp_size_in_bytes`` of its memory analysis by
    `appo_jax.training.compiled_memory` (within 10% for the small configs of tests/test_memory_plan.py). Limits:
    XLA:CPU computes bfloat16 in float32 (so it cannot check ``b = 2``), and a compiler that fuses the softmax
    backward (or a flash-attention kernel) keeps fewer score-sized tensors: the estimate is then an upper bound.
    """
    policy = _REMAT_ALIASES.get(config.remat_policy, config.remat_policy)
    kept_c, work_c = REMAT_KEEPS[policy]
    b = jnp.dtype(config.dtype).itemsize
    s = max(seq_len - 1, 1)
    t = rows * s
    heads = _per_device(config.num_heads, tensor)
    widths = (_per_device(config.intermediate_size, tensor), config.hidden_size,
              _per_device(config.num_heads * config.head_dim, tensor),
              _per_device(config.num_kv_heads, tensor) * config.head_dim)
    scores = t * heads * s * 4

    def term(c):
        return c[0] * scores + t * b * sum(k * w for k, w in zip(c[1:], widths))

    response = seq_len if response_len is None else response_len
    head = 2 * rows * min(logprob_chunk, response) * _per_device(config.vocab_size, tensor) * 4
    return int(config.num_layers * term(kept_c) + max(term(work_c), head) + rows * s * s)


@functools.lru_cache(maxsize=64)
def _param_shapes(config: ModelConfig):
    """(ShapeDtypeStruct tree, logical axes tree) of the params (cached: planning many setups is quick)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))), param_logical_axes(config)


@functools.lru_cache(maxsize=1024)
def _weight_bytes(config: ModelConfig, data: int, fsdp: int, tensor: int, rules: tuple,
                  optimizer_dtype: str) -> tuple[int, int, int, int, int]:
    """The number of params, then per-device bytes of the params (their dtype), of the params in float32, of one
    optimizer moment and of the gathered weights (two copies of one layer's weights sharded over ``tensor`` when ``fsdp > 1``, else 0) on a
    ``data x fsdp x tensor`` mesh with the logical-axis ``rules`` (items). Cached: a plan of many slices and
    batch shapes asks for the same few meshes again and again."""
    shapes, axes = _param_shapes(config)
    rules_map, mesh = dict(rules), abstract_mesh(data, fsdp, tensor)
    gathered = 0
    if fsdp > 1:
        layer = {"layers": shapes["layers"]}
        gathered = 2 * sharded_bytes(layer, {"layers": axes["layers"]}, abstract_mesh(1, 1, tensor), rules_map)
        gathered //= config.num_layers
    return (sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)), sharded_bytes(shapes, axes, mesh, rules_map),
            sharded_bytes(shapes, axes, mesh, rules_map, "float32"),
            sharded_bytes(shapes, axes, mesh, rules_map, optimizer_dtype), gathered)


def plan_memory(config: ModelConfig, *, data: int = 1, fsdp: int = 1, tensor: int = 1, batch: int = 16,
                seq_len: int = 8192, micro_batches: int = 1, kv_batch: int = 0, kv_len: int = 0,
                optimizer_moments: int = 2, optimizer_dtype: str = "float32", prompt_len: int = 0,
                logprob_chunk: int = 512, rules: Mapping = DEFAULT_RULES) -> dict:
    """Per-device bytes of params, optimizer state, gradients, gathered weights, activations and KV cache (and
    their total).

    ``batch`` sequences of ``seq_len = prompt_len + response`` tokens per optimizer update (one mini-batch),
    split over ``data * fsdp`` devices and into ``micro_batches`` accumulation steps (activations:
    `activation_bytes` of one micro-batch, with ``logprob_chunk`` the train step's log-prob chunk).
    ``optimizer_moments`` float arrays of the param shapes (2 for AdamW). Gradients: the float32 accumulator
    plus one micro-batch's gradient, ``2 * params`` in float32. Gathered weights (``fsdp > 1``): FSDP gathers
    each layer's weights for its forward and backward; two copies of one layer's weights, sharded over
    ``tensor`` only. The KV cache of ``kv_batch`` slots x ``kv_len`` tokens is the sampler's (0 = none).
    """
    mesh = abstract_mesh(data, fsdp, tensor)
    batch_shards = data * fsdp
    if batch % (batch_shards * micro_batches):
        raise ValueError(f"batch {batch} does not divide into data*fsdp={batch_shards} devices x "
                         f"{micro_batches} micro-batches")
    if not 0 <= prompt_len < seq_len:
        raise ValueError(f"prompt_len {prompt_len} must be in [0, seq_len={seq_len})")
    num_params, params, float32_params, moment, gathered = _weight_bytes(config, data, fsdp, tensor,
                                                                          tuple(rules.items()), optimizer_dtype)
    grads = 2 * float32_params
    optimizer = optimizer_moments * moment
    rows = batch // (batch_shards * micro_batches)
    activations = activation_bytes(config, rows, seq_len, tensor, logprob_chunk, seq_len - prompt_len)
    kv = 0
    if kv_batch and kv_len:
        if kv_batch % batch_shards:
            raise ValueError(f"kv_batch {kv_batch} does not divide into data*fsdp={batch_shards} devices")
        cache = jax.eval_shape(lambda: init_cache(config, kv_batch, kv_len))
        kv = sharded_bytes(cache, cache.logical_axes(), mesh, rules)
    parts = {"params": params, "gradients": grads, "optimizer": optimizer, "gathered_weights": gathered,
             "activations": activations, "kv_cache": kv}
    return {
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "num_params": int(num_params),
        "bytes_per_device": {**parts, "total": sum(parts.values())},
        "gib_per_device": {k: round(v / GIB, 3) for k, v in {**parts, "total": sum(parts.values())}.items()},
    }
