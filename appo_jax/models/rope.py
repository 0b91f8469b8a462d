"""Rotary position embeddings with the HF conventions (rotate-half layout, HF rope_scaling variants)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from appo_jax.models.config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim // 2], attention_factor) exactly as transformers computes them.

    default: inv_freq_i = 1 / theta^(2i / d).
    linear:  inv_freq / factor.
    llama3:  wavelengths 2*pi/inv_freq above original_max/low_freq_factor are divided by `factor`, those below
             original_max/high_freq_factor are kept, the band between is interpolated smoothly.
    yarn:    NTK-by-parts blend of inv_freq and inv_freq/factor over a linear ramp between the correction dims of
             beta_fast / beta_slow; cos/sin are multiplied by attention_factor (0.1 ln(factor) + 1 by default).
    """
    d = config.head_dim
    base = config.rope_theta
    scaling = dict(config.rope_scaling or {})
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rope_type = config.rope_type
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (np.float32(old_context_len) / wavelen - np.float32(low_freq_factor)) / np.float32(
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq_llama / np.float32(factor) + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32), 1.0
    if rope_type == "yarn":
        original_max = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
        factor = scaling.get("factor") or config.max_position_embeddings / original_max
        attention_factor = scaling.get("attention_factor")

        def get_mscale(scale, mscale=1.0):
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if attention_factor is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(num_rotations):
            return (d * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
        extrapolation_factor = (1 - ramp).astype(np.float32)
        interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
        blended = interpolation * (1 - extrapolation_factor) + inv_freq * extrapolation_factor
        return blended.astype(np.float32), float(attention_factor)
    raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported")


def rope_cos_sin(positions: jnp.ndarray, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [B, T, head_dim] for int positions [B, T]:
    angle[b, t, i] = positions[b, t] * inv_freq[i mod d/2] (frequencies repeated twice, HF layout),
    both multiplied by the attention factor."""
    inv_freq, attention_factor = rope_frequencies(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x * cos + rotate_half(x) * sin for x [B, T, heads, head_dim], cos/sin [B, T, head_dim] (float32,
    cast to x's dtype first like HF); rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2])."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
