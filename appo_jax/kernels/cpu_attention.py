"""Decode-step attention on a CPU over the KV cache in its own layout (``cpu_decode_attention.cc``, XLA FFI).

XLA's CPU einsum for one query token against a cache window [B, S, KV, hd] first transposes the window to
[B, KV, S, hd], a copy of every layer's keys and values at every step (a fifth of a SmolLM2 step at batch 8). The
kernel reads the cache in place, each (row, kv head) once and only at visible slots:

    decode_attention(q, k_cache, v_cache, layer, mask)[b, h] = sum_s p[b, h, s] v_cache[layer, b, s, h // G]
    p[b, h, :] = softmax_s(q[b, h] . k_cache[layer, b, s, h // G] * hd^-0.5 where mask[b, s], else -inf)

q float32 [B, H, hd], k_cache / v_cache float32 [L, B, S, KV, hd], G = H / KV, ``layer`` an int (or an int32
scalar array), mask bool [B, S]; a row with no visible slot gets the uniform average over its S slots (as
`appo_jax.models.decoder.dot_product_attention`'s finite mask value gives). The same sums as that function in
another order: results agree to float32 rounding. The kernel is built by `appo_jax.kernels.build`; the caller
checks `kernel_available`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, mask: jax.Array) -> jax.Array:
    """float32 attention output [B, H, hd] of one query token per row (module doc)."""
    b, h, hd = q.shape
    if (k_cache.ndim != 5 or v_cache.shape != k_cache.shape or k_cache.shape[1] != b or k_cache.shape[4] != hd
            or h % k_cache.shape[3] or mask.shape != (b, k_cache.shape[2])):
        raise ValueError(f"decode_attention: q [B, H, hd], caches [L, B, S, KV, hd] (H % KV == 0) and mask [B, S]; "
                         f"got {q.shape}, {k_cache.shape}, {v_cache.shape}, {mask.shape}")
    if not q.dtype == k_cache.dtype == v_cache.dtype == jnp.float32:
        raise ValueError(f"decode_attention: float32 q and caches, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    call = jax.ffi.ffi_call("appo_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, jnp.asarray(layer, jnp.int32), mask.astype(jnp.bool_))
