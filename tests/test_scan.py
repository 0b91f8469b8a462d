"""appo_jax.core.scan.reverse_discounted_cumsum against explicit loops of F_t = sum_{k>=t} gamma^(k-t) m_k x_k."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appo_jax.core.scan import reverse_discounted_cumsum

scan = jax.jit(reverse_discounted_cumsum, static_argnames="axis")


def ref_rdc(x, gamma, mask=None):
    """Loop over the last axis from the formula (not the recurrence), float64."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.asarray(mask, bool)
    out = np.zeros(x.shape)
    length = x.shape[-1]
    for idx in np.ndindex(x.shape[:-1]):
        for t in range(length):
            out[idx + (t,)] = sum(gamma ** (k - t) * x[idx + (k,)] for k in range(t, length) if m[idx + (k,)])
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.0])
def test_matches_loop_with_poisoned_mask(gamma):
    rng = np.random.default_rng(0)
    mask = rng.random((3, 11)) < 0.7
    mask[2] = False
    x = np.where(mask, rng.standard_normal((3, 11)), np.nan).astype(np.float32)
    got = np.asarray(scan(x, gamma, mask))
    np.testing.assert_allclose(got, ref_rdc(x, gamma, mask), rtol=1e-5, atol=1e-6)
    assert np.all(got[2] == 0)
    no_mask = rng.standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(scan(no_mask, gamma)), ref_rdc(no_mask, gamma), rtol=1e-5, atol=1e-6)


def test_other_axis_and_bf16():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    got = np.asarray(scan(x, 0.8, axis=0))
    np.testing.assert_allclose(got, np.moveaxis(ref_rdc(np.moveaxis(x, 0, -1), 0.8), -1, 0), rtol=1e-5, atol=1e-6)
    out = scan(jnp.asarray(x, jnp.bfloat16), 0.8, axis=0)
    assert out.dtype == jnp.float32


def test_gamma_one_is_exact_suffix_sum():
    x = np.array([[1.0, 2.0, 4.0, 8.0, 16.0, 0.5]], np.float32)
    np.testing.assert_array_equal(np.asarray(scan(x, 1.0)), [[31.5, 30.5, 28.5, 24.5, 16.5, 0.5]])


def test_traced_gamma_vmap_and_grad():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 9)).astype(np.float32)
    mask = rng.random((4, 9)) < 0.6
    w = rng.standard_normal((4, 9)).astype(np.float32)
    gammas = np.float32([1.0, 0.9, 0.5, 0.0])
    got = jax.vmap(lambda xi, mi, g: reverse_discounted_cumsum(xi, g, mi))(x, mask, gammas)
    for i in range(4):
        np.testing.assert_allclose(np.asarray(got[i]), ref_rdc(x[i], float(gammas[i]), mask[i]), rtol=1e-5,
                                   atol=1e-6)
    # d/dx_k sum_t w_t F_t = m_k sum_{t <= k} w_t gamma^(k - t)
    grad = np.asarray(jax.jit(jax.grad(lambda v: jnp.sum(w * reverse_discounted_cumsum(v, 0.7, mask))))(x))
    want = np.array([[mask[i, k] * sum(w[i, t] * 0.7 ** (k - t) for t in range(k + 1)) for k in range(9)]
                     for i in range(4)])
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


@given(st.data())
def test_property_shapes_and_masks(data):
    length = data.draw(st.sampled_from([1, 2, 7, 16]))
    gamma = data.draw(st.sampled_from([1.0, 0.99, 0.5]))
    vals = np.array(data.draw(st.lists(st.floats(-4, 4, width=32), min_size=2 * length, max_size=2 * length)),
                    np.float32).reshape(2, length)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=2 * length, max_size=2 * length))).reshape(2, length)
    np.testing.assert_allclose(np.asarray(scan(vals, gamma, mask)), ref_rdc(vals, gamma, mask), rtol=1e-4,
                               atol=1e-4)
