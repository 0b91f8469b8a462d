"""O(L) reverse discounted cumulative sums (the recurrence behind Omega and the future-KL weights)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def reverse_discounted_cumsum(x, gamma, mask=None, axis: int = -1) -> Array:
    """``F_t = sum_{k >= t} gamma^(k - t) * m_k * x_k`` along ``axis``, i.e. ``F_t = m_t x_t + gamma F_{t+1}``.

    Computed with ``jax.lax.associative_scan`` (reverse) on the affine maps ``F -> a F + b`` with
    ``(a, b) = (gamma, m_t x_t)``, combined as ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``: O(L) work,
    O(log L) depth, never an L x L decay matrix. For ``gamma = 1`` the products stay exactly 1 and the
    result is a plain suffix sum; for ``gamma < 1`` powers underflow harmlessly to 0 (no overflow), so it is
    stable at L = 32k. Positions where ``mask`` is false contribute 0 (even if x is NaN) but still count
    in the exponent ``k - t``. ``gamma`` may be a Python float or a traced scalar; computation in float32.
    """
    x = jnp.asarray(x, jnp.float32)
    if mask is not None:
        x = jnp.where(jnp.asarray(mask).astype(bool), x, 0.0)
    axis = axis % x.ndim
    a = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), x.shape)

    def combine(left, right):
        # With reverse=True, `left` holds the later positions: out = b_t + a_t * F_{t+1}.
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, b_l * a_r + b_r

    _, out = jax.lax.associative_scan(combine, (a, x), reverse=True, axis=axis)
    return out
