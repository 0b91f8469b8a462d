"""Masked and segment (group) statistics: the shared numerics of the APPO core.

Conventions used by every function here:

* ``mask`` is boolean or {0, 1}; entries where it is false never influence a result, even when the value
  there is NaN or inf (values are selected with ``where`` before any arithmetic, never multiplied by 0).
* std is the *population* std, ``sqrt(mean((x - mean)^2))``.
* A reduction over zero valid entries returns 0 (mean, std) instead of NaN.
* Means and stds are taken of ``x - ref`` with ``ref`` the largest valid value (of the row / segment) and
  shifted back: identical values then give exactly ``std = 0`` and ``z = 0`` (a plain float32 mean of 16 x 1.1 is
  an ulp off, which would give a std of ~1e-7 and turn "all rewards agree" into non-zero advantages).
* Everything is computed in float32 whatever the input dtype; shapes are static; all functions are
  jit-, vmap- and grad-safe (no data-dependent Python control flow).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

#: std values below this are treated as 1 by :func:`masked_zscore` (docs/algorithm.md §1.2).
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


def _masked_ref(x, m, axis) -> Array:
    """The largest valid value along ``axis`` (keepdims; 0 where nothing valid or non-finite), as a shift."""
    ref = jnp.max(jnp.where(m, _f32(x), -jnp.inf), axis=axis, keepdims=True)
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(ref), ref, 0.0))


def _masked_moments(x, m, axis) -> tuple[Array, Array]:
    """(mean, population std) along ``axis`` with keepdims, computed on ``x - ref`` (see module doc)."""
    ref = _masked_ref(x, m, axis)
    count = jnp.maximum(masked_count(m, axis), 1.0)
    shifted = jnp.where(m, _f32(x) - ref, 0.0)
    mu_s = jnp.expand_dims(jnp.sum(shifted, axis=axis) / count, axis)
    dev = jnp.where(m, shifted - mu_s, 0.0)
    sd = jnp.expand_dims(jnp.sqrt(jnp.sum(dev * dev, axis=axis) / count), axis)
    return ref + mu_s, sd


def masked_mean(x, mask, axis=-1) -> Array:
    """``mean_m(x) = sum_i m_i x_i / max(sum_i m_i, 1)`` along ``axis`` (0 where nothing is valid)."""
    mu, _ = _masked_moments(x, _bool(mask), axis)
    return jnp.squeeze(mu, axis)


def masked_std(x, mask, axis=-1) -> Array:
    """Population std ``sqrt(mean_m((x - mean_m(x))^2))`` along ``axis`` (0 where nothing is valid)."""
    _, sd = _masked_moments(x, _bool(mask), axis)
    return jnp.squeeze(sd, axis)


def official_zscore(x, mask, axis=-1, eps: float = 1e-6) -> Array:
    """The official implementation's Z-score: ``Z(x)_i = (x_i - mu) / (sigma + eps)`` over the valid entries,
    ``mu = sum_m(x) / n`` and ``sigma = sqrt(sum_m((x - mu)^2) / n)`` in plain float32 (no shift, no floor), 0
    outside ``mask``. A constant row gives 0 or the rounding noise of ``mu`` divided by ``sigma + eps`` (e.g.
    +-0.056 for seven 0.7s), as the official code does; the sign of that noise depends on the summation order,
    so it is not reproducible bit for bit across frameworks (docs/official_differences.md)."""
    m = _bool(mask)
    v = jnp.where(m, _f32(x), 0.0)
    n = jnp.maximum(masked_count(m, axis), 1.0)
    mu = jnp.expand_dims(jnp.sum(v, axis=axis) / n, axis)
    dev = jnp.where(m, v - mu, 0.0)
    sigma = jnp.expand_dims(jnp.sqrt(jnp.sum(dev * dev, axis=axis) / n), axis)
    return jnp.where(m, (v - mu) / (sigma + eps), 0.0)


def masked_zscore(x, mask, axis=-1, std_floor: float = ZSCORE_STD_FLOOR) -> Array:
    """``Z(x)_i = (x_i - mean_m(x)) / s`` with ``s = std_m(x)`` if ``std_m(x) >= std_floor`` else ``s = 1``.

    Statistics are taken over the valid entries along ``axis`` (one row = one rollout for the Branching
    Score); the result is 0 where ``mask`` is false.
    """
    m = _bool(mask)
    mu, sd = _masked_moments(x, m, axis)
    sd = jnp.where(sd < std_floor, 1.0, sd)
    return jnp.where(m, (_f32(x) - mu) / sd, 0.0)


def segment_count(segment_ids, num_segments: int, mask=None) -> Array:
    """``n_g = sum_i [seg_i = g] m_i`` for g in [0, num_segments) (float32)."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    w = jnp.ones(seg.shape, jnp.float32) if mask is None else _bool(mask).astype(jnp.float32)
    return jax.ops.segment_sum(w, seg, num_segments=num_segments)


def _segment_moments(values, seg, num_segments: int, m):
    """Shifted per-segment moments (see module doc).

    Returns ``(ref, mu_s, sd, shifted)``: ``ref`` [num_segments] the largest valid value of each segment
    (0 if none / non-finite), ``mu_s`` and ``sd`` [num_segments] the mean and population std of the shifted
    values, and ``shifted`` [N] = ``v_i - ref_{g(i)}`` (0 where invalid). The mean is ``ref + mu_s``.
    """
    safe = jnp.clip(seg, 0, num_segments - 1)
    ref = jax.ops.segment_max(jnp.where(m, _f32(values), -jnp.inf), seg, num_segments=num_segments)
    ref = jax.lax.stop_gradient(jnp.where(jnp.isfinite(ref), ref, 0.0))
    count = jnp.maximum(segment_count(seg, num_segments, m), 1.0)
    shifted = jnp.where(m, _f32(values) - ref[safe], 0.0)
    mu_s = jax.ops.segment_sum(shifted, seg, num_segments=num_segments) / count
    dev = jnp.where(m, shifted - mu_s[safe], 0.0)
    sd = jnp.sqrt(jax.ops.segment_sum(dev * dev, seg, num_segments=num_segments) / count)
    return ref, mu_s, sd, shifted


def _seg_mask(seg, mask) -> Array:
    return jnp.ones(seg.shape, bool) if mask is None else _bool(mask)


def segment_mean(values, segment_ids, num_segments: int, mask=None) -> Array:
    """Per-segment mean ``mu_g = sum_{i: seg_i = g} m_i v_i / max(n_g, 1)``; returns ``[num_segments]``.

    Out-of-range segment ids (e.g. -1 for padding rows) are dropped by ``segment_sum``.
    """
    seg = jnp.asarray(segment_ids, jnp.int32)
    ref, mu_s, _, _ = _segment_moments(values, seg, num_segments, _seg_mask(seg, mask))
    return ref + mu_s


def segment_std(values, segment_ids, num_segments: int, mask=None) -> Array:
    """Per-segment population std ``sqrt(sum_{i in g} m_i (v_i - mu_g)^2 / max(n_g, 1))``; ``[num_segments]``."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    return _segment_moments(values, seg, num_segments, _seg_mask(seg, mask))[2]


def segment_zscore(values, segment_ids, num_segments: int, mask=None, *, eps: float = 1e-6,
                   norm_by_std: bool = True) -> Array:
    """Group-normalised values ``(v_i - mu_{g(i)}) / (std_{g(i)} + eps)`` (or ``v_i - mu_{g(i)}`` when
    ``norm_by_std`` is False, Dr.GRPO style), statistics over the valid members of each segment.

    Returns an array shaped like ``values``; 0 for rows where ``mask`` is false or whose segment id is out of
    range. A segment of one valid member gets 0.
    """
    seg = jnp.asarray(segment_ids, jnp.int32)
    m = _seg_mask(seg, mask) & (seg >= 0) & (seg < num_segments)
    safe = jnp.clip(seg, 0, num_segments - 1)
    _, mu_s, sd, shifted = _segment_moments(values, seg, num_segments, m)
    centred = shifted - mu_s[safe]
    if norm_by_std:
        centred = centred / (sd[safe] + eps)
    return jnp.where(m, centred, 0.0)
