"""Masked and segment (group) statistics: the shared numerics of the APPO core.

Conventions used by every function here:

* ``mask`` is boolean or {0, 1}; entries where it is false never influence a result, even when the value
  there is NaN or inf (values are selected with ``where`` before any arithmetic, never multiplied by 0).
* std is the *population* std, ``sqrt(mean((x - mean)^2))``.
* A reduction over zero valid entries returns 0 (mean, std) instead of NaN.
* Everything is computed in float32 whatever the input dtype; shapes are static; all functions are
  jit-, vmap- and grad-safe (no data-dependent Python control flow).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

#: std values below this are treated as 1 by :func:`masked_zscore` (DESIGN.md §1.2).
ZSCORE_STD_FLOOR = 1e-8


def _f32(x) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _bool(mask) -> Array:
    return jnp.asarray(mask).astype(bool)


def masked_sum(x, mask, axis=-1) -> Array:
    """``sum_i x_i * m_i`` along ``axis`` (invalid entries excluded even if non-finite)."""
    return jnp.sum(jnp.where(_bool(mask), _f32(x), 0.0), axis=axis)


def masked_count(mask, axis=-1) -> Array:
    """``sum_i m_i`` along ``axis`` as float32."""
    return jnp.sum(_bool(mask), axis=axis, dtype=jnp.float32)


def masked_mean(x, mask, axis=-1) -> Array:
    """``mean_m(x) = sum_i m_i x_i / max(sum_i m_i, 1)`` along ``axis`` (0 where nothing is valid)."""
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), 1.0)


def masked_std(x, mask, axis=-1) -> Array:
    """Population std ``sqrt(mean_m((x - mean_m(x))^2))`` along ``axis`` (0 where nothing is valid)."""
    m = _bool(mask)
    mu = jnp.expand_dims(masked_mean(x, m, axis), axis)
    dev = jnp.where(m, _f32(x) - mu, 0.0)
    return jnp.sqrt(masked_mean(dev * dev, m, axis))


def masked_zscore(x, mask, axis=-1, std_floor: float = ZSCORE_STD_FLOOR) -> Array:
    """``Z(x)_i = (x_i - mean_m(x)) / s`` with ``s = std_m(x)`` if ``std_m(x) >= std_floor`` else ``s = 1``.

    Statistics are taken over the valid entries along ``axis`` (one row = one rollout for the Branching
    Score); the result is 0 where ``mask`` is false.
    """
    m = _bool(mask)
    mu = jnp.expand_dims(masked_mean(x, m, axis), axis)
    sd = jnp.expand_dims(masked_std(x, m, axis), axis)
    sd = jnp.where(sd < std_floor, 1.0, sd)
    return jnp.where(m, (_f32(x) - mu) / sd, 0.0)


def segment_count(segment_ids, num_segments: int, mask=None) -> Array:
    """``n_g = sum_i [seg_i = g] m_i`` for g in [0, num_segments) (float32)."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    w = jnp.ones(seg.shape, jnp.float32) if mask is None else _bool(mask).astype(jnp.float32)
    return jax.ops.segment_sum(w, seg, num_segments=num_segments)


def segment_mean(values, segment_ids, num_segments: int, mask=None) -> Array:
    """Per-segment mean ``mu_g = sum_{i: seg_i = g} m_i v_i / max(n_g, 1)``; returns ``[num_segments]``.

    Out-of-range segment ids (e.g. -1 for padding rows) are dropped by ``segment_sum``.
    """
    seg = jnp.asarray(segment_ids, jnp.int32)
    m = jnp.ones(seg.shape, bool) if mask is None else _bool(mask)
    v = jnp.where(m, _f32(values), 0.0)
    total = jax.ops.segment_sum(v, seg, num_segments=num_segments)
    return total / jnp.maximum(segment_count(seg, num_segments, m), 1.0)


def segment_std(values, segment_ids, num_segments: int, mask=None) -> Array:
    """Per-segment population std ``sqrt(sum_{i in g} m_i (v_i - mu_g)^2 / max(n_g, 1))``; ``[num_segments]``."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    m = jnp.ones(seg.shape, bool) if mask is None else _bool(mask)
    mu = segment_mean(values, seg, num_segments, m)
    dev = jnp.where(m, _f32(values) - mu[jnp.clip(seg, 0, num_segments - 1)], 0.0)
    var = jax.ops.segment_sum(dev * dev, seg, num_segments=num_segments)
    return jnp.sqrt(var / jnp.maximum(segment_count(seg, num_segments, m), 1.0))


def segment_zscore(values, segment_ids, num_segments: int, mask=None, *, eps: float = 1e-6,
                   norm_by_std: bool = True) -> Array:
    """Group-normalised values ``(v_i - mu_{g(i)}) / (std_{g(i)} + eps)`` (or ``v_i - mu_{g(i)}`` when
    ``norm_by_std`` is False, Dr.GRPO style), statistics over the valid members of each segment.

    Returns an array shaped like ``values``; 0 for rows where ``mask`` is false or whose segment id is out of
    range. A segment of one valid member gets 0.
    """
    seg = jnp.asarray(segment_ids, jnp.int32)
    m = jnp.ones(seg.shape, bool) if mask is None else _bool(mask)
    m = m & (seg >= 0) & (seg < num_segments)
    safe = jnp.clip(seg, 0, num_segments - 1)
    mu = segment_mean(values, seg, num_segments, m)[safe]
    centred = jnp.where(m, _f32(values), 0.0) - mu
    if norm_by_std:
        sd = segment_std(values, seg, num_segments, m)[safe]
        centred = centred / (sd + eps)
    return jnp.where(m, centred, 0.0)
