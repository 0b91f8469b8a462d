"""The per-slot KV cache used by `decoder.forward` (prefill, decode, appending tool results, row resets)."""
from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from appo_jax.models.config import ModelConfig

# Logical axis names of the cache leaves (see appo_jax.parallel.rules).
CACHE_LOGICAL_AXES = {
    "k": ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim"),
    "v": ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim"),
    "valid": ("cache_batch", "cache_length"),
    "end": ("cache_batch",),
}


@flax.struct.dataclass
class KVCache:
    """k, v: [num_layers, B, S, num_kv_heads, head_dim] (compute dtype; keys stored after RoPE);
    valid: bool [B, S] (slot holds a real token); end: int32 [B] (next write slot of each row).

    Invariant kept by `decoder.forward`: slots >= end[b] are not valid. A row is reset by setting
    valid[b] = False and end[b] = 0 (`reset_rows`)."""

    k: jnp.ndarray
    v: jnp.ndarray
    valid: jnp.ndarray
    end: jnp.ndarray

    @property
    def max_len(self) -> int:
        """S, the number of slots per row."""
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        """B, the number of rows."""
        return self.valid.shape[0]

    def reset_rows(self, rows: jnp.ndarray) -> "KVCache":
        """Empty the rows where the bool [B] mask `rows` is True (valid = False, end = 0); k/v are left as they
        are (invalid slots are never attended to)."""
        return self.replace(
            valid=jnp.where(rows[:, None], False, self.valid), end=jnp.where(rows, 0, self.end).astype(jnp.int32)
        )

    def logical_axes(self) -> "KVCache":
        """A KVCache whose leaves are the logical axis-name tuples of the fields (for sharding)."""
        return KVCache(**CACHE_LOGICAL_AXES)


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache: zero k/v of shape [num_layers, batch, max_len, num_kv_heads, head_dim] in the compute
    dtype, valid all False, end all 0."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, config.compute_dtype),
        v=jnp.zeros(shape, config.compute_dtype),
        valid=jnp.zeros((batch, max_len), jnp.bool_),
        end=jnp.zeros((batch,), jnp.int32),
    )
