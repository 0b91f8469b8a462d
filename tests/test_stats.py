"""appo_jax.core.stats against explicit-loop references written from the documented formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appo_jax.core.stats import (
    masked_count,
    masked_mean,
    masked_std,
    masked_sum,
    masked_zscore,
    segment_count,
    segment_mean,
    segment_std,
    segment_zscore,
)


def ref_masked(values, mask):
    """(sum, count, mean, std, zscore) of one 1-D slice over its valid entries, in float64."""
    idx = [i for i in range(len(values)) if mask[i]]
    total = sum(float(values[i]) for i in idx)
    count = len(idx)
    mean = total / count if count else 0.0
    std = math.sqrt(sum((float(values[i]) - mean) ** 2 for i in idx) / count) if count else 0.0
    sd = 1.0 if std < 1e-8 else std
    z = [(float(values[i]) - mean) / sd if mask[i] else 0.0 for i in range(len(values))]
    return total, count, mean, std, z


def ref_segments(values, ids, num_segments, mask, eps=1e-6, norm_by_std=True):
    """(count, mean, std) per segment and the normalised values, in float64."""
    counts, means, stds = [], [], []
    for g in range(num_segments):
        members = [i for i in range(len(values)) if ids[i] == g and mask[i]]
        c = len(members)
        mu = sum(float(values[i]) for i in members) / c if c else 0.0
        sd = math.sqrt(sum((float(values[i]) - mu) ** 2 for i in members) / c) if c else 0.0
        counts.append(c)
        means.append(mu)
        stds.append(sd)
    z = []
    for i in range(len(values)):
        g = ids[i]
        if not (0 <= g < num_segments and mask[i]):
            z.append(0.0)
            continue
        c = float(values[i]) - means[g]
        z.append(c / (stds[g] + eps) if norm_by_std else c)
    return counts, means, stds, z


def _poisoned(rng, shape, mask):
    """Random values with NaN / +-inf written into the masked-out entries."""
    x = rng.standard_normal(shape).astype(np.float32) * 2 + 0.5
    bad = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=shape)
    return np.where(mask, x, bad)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_masked_stats_match_loops(axis):
    rng = np.random.default_rng(0)
    mask = rng.random((4, 6, 5)) < 0.6
    mask[1, 2, :] = False  # an all-masked slice along the last axis
    mask[:, 3, :] = False  # ... and along axis 1
    x = _poisoned(rng, mask.shape, mask)
    got = [np.asarray(f(x, mask, axis=axis)) for f in (masked_sum, masked_mean, masked_std, masked_zscore)]
    got_count = np.asarray(masked_count(mask, axis=axis))
    xm, mm = np.moveaxis(x, axis, -1), np.moveaxis(mask, axis, -1)
    zm = np.moveaxis(got[3], axis, -1)
    for idx in np.ndindex(xm.shape[:-1]):
        total, count, mean, std, z = ref_masked(xm[idx], mm[idx])
        np.testing.assert_allclose(got[0][idx], total, rtol=1e-5, atol=1e-5)
        assert got_count[idx] == count
        np.testing.assert_allclose(got[1][idx], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[2][idx], std, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(zm[idx], z, rtol=1e-4, atol=1e-5)
    assert all(np.isfinite(g).all() for g in got)


def test_zscore_std_floor_treats_tiny_std_as_one():
    x = np.array([[1e-9, 2e-9, 3e-9, 7.0]], np.float32)
    mask = np.array([[True, True, True, False]])
    got = np.asarray(masked_zscore(x, mask))
    np.testing.assert_allclose(got[0, :3], np.float32([1e-9, 2e-9, 3e-9]) - np.float32(2e-9), atol=1e-15)
    assert got[0, 3] == 0


@given(st.data())
def test_masked_zscore_property(data):
    n = data.draw(st.sampled_from([1, 3]))
    length = data.draw(st.sampled_from([1, 2, 6]))
    vals = np.array(data.draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]), min_size=n * length,
                                       max_size=n * length)), np.float32).reshape(n, length)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n * length, max_size=n * length))).reshape(n, length)
    got = np.asarray(jax.jit(masked_zscore)(vals, mask))
    for i in range(n):
        np.testing.assert_allclose(got[i], ref_masked(vals[i], mask[i])[4], rtol=1e-5, atol=1e-6)


def test_masked_zscore_of_constant_row_is_zero():
    x = np.full((2, 100), 1.2, np.float32)
    np.testing.assert_array_equal(np.asarray(masked_zscore(x, np.ones_like(x, bool))), 0.0)


def test_segment_stats_match_loops():
    rng = np.random.default_rng(1)
    num_segments = 5
    # segment 3 is empty, segment 4 has one member (row 0), -1 and 5 are out of range; order is arbitrary
    ids = np.array([4, 0, 1, -1, 2, 0, 5, 1, 1, 2, 0, 2, -1, 0, 1, 2, 2, 0, 1, 5, 0, 1, 2], np.int32)
    n = ids.size
    mask = rng.random(n) < 0.8
    mask[0] = True
    vals = _poisoned(rng, (n,), mask)
    got_count = np.asarray(segment_count(ids, num_segments, mask))
    got_mean = np.asarray(segment_mean(vals, ids, num_segments, mask))
    got_std = np.asarray(segment_std(vals, ids, num_segments, mask))
    counts, means, stds, z = ref_segments(vals, ids, num_segments, mask)
    np.testing.assert_array_equal(got_count, counts)
    np.testing.assert_allclose(got_mean, means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_std, stds, rtol=1e-5, atol=1e-6)
    assert got_count[3] == 0 and got_mean[3] == 0 and got_std[3] == 0
    for norm in (True, False):
        got_z = np.asarray(segment_zscore(vals, ids, num_segments, mask, norm_by_std=norm))
        np.testing.assert_allclose(got_z, ref_segments(vals, ids, num_segments, mask, norm_by_std=norm)[3],
                                   rtol=1e-4, atol=1e-5)
        assert np.isfinite(got_z).all()
        assert got_z[0] == 0  # a segment of one member gets 0
        assert np.all(got_z[(ids < 0) | (ids >= num_segments) | ~mask] == 0)
    # no mask: every in-range row counts
    finite = rng.standard_normal(n).astype(np.float32)
    counts, means, stds, z = ref_segments(finite, ids, num_segments, [True] * n, eps=0.5)
    np.testing.assert_allclose(np.asarray(segment_zscore(finite, ids, num_segments, eps=0.5)), z, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(segment_count(ids, num_segments)), counts)


@given(st.data())
def test_segment_zscore_property(data):
    n = data.draw(st.sampled_from([1, 4, 9]))
    num_segments = data.draw(st.sampled_from([1, 3]))
    ids = np.array(data.draw(st.lists(st.integers(-1, num_segments), min_size=n, max_size=n)), np.int32)
    vals = np.array(data.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]), min_size=n, max_size=n)),
                    np.float32)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    norm = data.draw(st.booleans())
    got = jax.jit(segment_zscore, static_argnums=2, static_argnames="norm_by_std")(
        vals, ids, num_segments, mask, norm_by_std=norm)
    np.testing.assert_allclose(np.asarray(got), ref_segments(vals, ids, num_segments, mask, norm_by_std=norm)[3],
                               rtol=1e-5, atol=1e-5)


def test_segment_zscore_of_constant_group_is_zero():
    vals = np.full(16, 1.1, np.float32)
    np.testing.assert_array_equal(np.asarray(segment_zscore(vals, np.zeros(16, np.int32), 1)), 0.0)


def test_stats_vmap_jit_and_bf16():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 7)).astype(np.float32)
    mask = rng.random((3, 4, 7)) < 0.7
    direct = np.asarray(jax.jit(masked_zscore)(x, mask))
    mapped = np.asarray(jax.vmap(masked_zscore)(x, mask))
    np.testing.assert_allclose(direct, mapped, rtol=1e-6, atol=1e-7)
    assert masked_mean(jnp.asarray(x, jnp.bfloat16), mask).dtype == jnp.float32
    ids = rng.integers(0, 3, (3, 7)).astype(np.int32)
    seg = jax.vmap(lambda v, i: segment_mean(v, i, 3))(x[:, 0], ids)
    for b in range(3):
        np.testing.assert_allclose(np.asarray(seg[b]), ref_segments(x[b, 0], ids[b], 3, [True] * 7)[1], rtol=1e-5,
                                   atol=1e-6)
