"""Policy losses vs explicit-loop references written from docs/algorithm.md §1.6, gradients vs finite differences."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from appo_jax.core.losses import (
    AGGS, aggregate, future_kl_weights, kl_penalty, policy_loss,
)
from appo_jax.core.registry import POLICY_LOSSES, UnknownNameError, get_policy_loss

MODES = POLICY_LOSSES.names()  # the built-in modes (the test that registers one removes it again)

EL, EH, C = 0.2, 0.28, 3.0


# --------------------------------------------------------------------------------------------- references
def ref_kl(lp, ref, kind):
    out = np.zeros(np.shape(lp))
    for idx in np.ndindex(out.shape):
        a, b = float(lp[idx]), float(ref[idx])
        if kind in ("k1", "kl"):
            out[idx] = a - b
        elif kind == "abs":
            out[idx] = abs(a - b)
        elif kind in ("k2", "mse"):
            out[idx] = 0.5 * (a - b) ** 2
        else:  # k3: exp(ref - lp) - (ref - lp) - 1 with the log-ratio clipped to +-20, clamped to [-10, 10]
            x = min(max(b - a, -20.0), 20.0)
            out[idx] = min(max(math.exp(x) - x - 1.0, -10.0), 10.0)
    return out


def finite(*xs):
    return all(x is None or math.isfinite(x) for x in xs)


def ref_valid(lp, old, A, m, *extra):
    n, L = lp.shape
    return np.array([[bool(m[i, t]) and finite(lp[i, t], old[i, t], A[i, t],
                                                 *[e[i, t] for e in extra if e is not None])
                      for t in range(L)] for i in range(n)])


def ref_dlog(lp, old, i, t):
    return min(max(lp[i, t] - old[i, t], -20.0), 20.0)


def ref_fkl(lp, old, A, m, decay=64.0, eps=0.2, high_only=True, c=C, safety=6.0, valid=None):
    n, L = lp.shape
    valid = ref_valid(lp, old, A, m) if valid is None else valid
    g = 2.0 ** (-1.0 / decay)
    w = np.zeros((n, L))
    for i in range(n):
        for t in range(L):
            if not valid[i, t]:
                continue
            G = 0.0
            for k in range(t, L):
                if valid[i, k] and ref_dlog(lp, old, i, k) <= math.log(c):
                    G += g ** (k - t) * ref_dlog(lp, old, i, k)
            lo = 1.0 if high_only else 1.0 - eps
            wt = min(max(math.exp(G), lo), 1.0 + eps)
            if A[i, t] < 0 and math.exp(ref_dlog(lp, old, i, t)) > safety:
                wt = min(max(wt, 0.8), 1.0)
            w[i, t] = wt
    return w


def ref_agg(v, m, agg):
    n, L = v.shape
    if agg == "token-mean":
        cnt = sum(1 for i in range(n) for t in range(L) if m[i, t])
        return sum(v[i, t] for i in range(n) for t in range(L) if m[i, t]) / cnt if cnt else 0.0
    rows = []
    for i in range(n):
        toks = [v[i, t] for t in range(L) if m[i, t]]
        if toks:
            rows.append(sum(toks) if agg == "seq-mean-token-sum" else sum(toks) / len(toks))
    return sum(rows) / len(rows) if rows else 0.0


def ref_policy_loss(lp, old, A, m, mode, el=EL, eh=EH, c=C, decay=64.0, fclip=0.2, high_only=True, b=1.0,
                    safety=6.0, agg="token-mean", ref=None, kl_coef=0.0, kl_kind="low_var_kl", ent=None,
                    ent_coef=0.0, beh=None, tis_cap=None):
    n, L = lp.shape
    A = np.broadcast_to(A if A.ndim == 2 else A[:, None], (n, L))
    valid = ref_valid(lp, old, A, m, ref, ent, beh if tis_cap is not None else None)
    w = ref_fkl(lp, old, A, m, decay, fclip, high_only, c, safety, valid=valid) if mode == "future_kl" else None
    tok = np.zeros((n, L))
    ndual = [0] * n
    for i in range(n):
        for t in range(L):
            if not valid[i, t]:
                continue
            a = A[i, t] * (1 + b * w[i, t]) if mode == "future_kl" else A[i, t]
            r = math.exp(ref_dlog(lp, old, i, t))
            lc = max(-a * r, -a * min(max(r, 1 - el), 1 + eh))
            if mode == "gppo":  # the value of the PPO clip (no dual clip)
                tok[i, t] = lc
            elif mode == "cispo":  # -sg(min(r, 1 + eh)) A lp
                tok[i, t] = -min(r, 1 + eh) * a * lp[i, t]
            elif mode == "ppo" or a >= 0:
                tok[i, t] = lc
            else:
                tok[i, t] = min(-a * c, lc)
                ndual[i] += lc > -a * c
            if tis_cap is not None:  # truncated importance sampling: min(exp(lc - lb), C), a constant
                tok[i, t] *= min(math.exp(min(max(old[i, t] - beh[i, t], -20.0), 20.0)), tis_cap)
    final = valid.copy()
    if mode == "future_kl":
        for i in range(n):
            if ndual[i] > 1:
                final[i, :] = False
    loss = ref_agg(tok, final, agg)
    if ref is not None:
        loss += kl_coef * ref_agg(ref_kl(np.where(valid, lp, 0), np.where(valid, ref, 0), kl_kind), final, agg)
    if ent is not None:
        loss -= ent_coef * ref_agg(np.where(valid, ent, 0), final, agg)
    return loss, final, valid


# ------------------------------------------------------------------------------------------- generators
def loss_batch(seed, n, L, *, bad=False, per_row_adv=False, scale=0.8):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.0, 0.5, (n, L))
    lp = old + rng.normal(0.0, scale, (n, L))
    A = rng.choice([-1.0, 1.0], (n, L)) * rng.uniform(0.2, 2.0, (n, L))
    if per_row_adv:
        A = A[:, 0]
    m = rng.random((n, L)) < 0.75
    m[rng.random(n) < 0.15] = False
    ref = old + rng.normal(0.0, 0.3, (n, L))
    if bad:  # NaN / inf at masked positions, and at one valid position
        for arr in (lp, old, ref):
            arr[~m] = rng.choice([np.nan, np.inf, -np.inf], size=int((~m).sum()))
        if m.any():
            k = np.argwhere(m)[rng.integers(0, int(m.sum()))]
            lp[tuple(k)] = np.nan
    f = np.float32
    return lp.astype(f), old.astype(f), A.astype(f), m, ref.astype(f)


shapes = st.sampled_from([(1, 1), (3, 4), (4, 6)])

_GRADS = {}


def loss_grad(lp, old, A, m, *, ref_logp=None, entropy=None, **opts):
    """jit(grad of policy_loss w.r.t. logp), one compiled function per option set (eager grads are slow)."""
    key = tuple(sorted(opts.items()))
    if key not in _GRADS:
        _GRADS[key] = jax.jit(jax.grad(
            lambda x, o, a, mm, r, e: policy_loss(x, o, a, mm, ref_logp=r, entropy=e, **opts)[0]))
    return np.asarray(_GRADS[key](jnp.asarray(lp), old, A, m, ref_logp, entropy))


# -------------------------------------------------------------------------------------------------- KL
@pytest.mark.parametrize("kind", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"])
def test_kl_penalty_each_kind(kind):
    rng = np.random.default_rng(0)
    lp = rng.normal(-1, 2, (3, 5)).astype(np.float32)
    ref = rng.normal(-1, 2, (3, 5)).astype(np.float32)
    ref[0, 0], lp[0, 1] = lp[0, 0] + 25.0, ref[0, 1] + 30.0  # exercise the clamps
    got = np.asarray(kl_penalty(lp, ref, kind))
    np.testing.assert_allclose(got, ref_kl(lp, ref, kind), rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32


def test_kl_penalty_unknown_kind():
    with pytest.raises(ValueError, match="unknown kl kind 'k9'.*low_var_kl"):
        kl_penalty(np.zeros(2), np.zeros(2), "k9")


# ------------------------------------------------------------------------------------------ future KL
@settings(max_examples=25)
@given(shapes, st.integers(0, 10_000), st.booleans(), st.sampled_from([64.0, 4.0, 1.0]), st.booleans())
def test_future_kl_weights_match_loop(shape, seed, high_only, decay, bad):
    lp, old, A, m, _ = loss_batch(seed, *shape, bad=bad, scale=1.5)
    got = np.asarray(future_kl_weights(lp, old, A, m, decay_rate=decay, high_only=high_only))
    want = ref_fkl(lp.astype(float), old.astype(float), A.astype(float), m, decay, 0.2, high_only)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_future_kl_weights_participation_and_safety_cap():
    # one row, L = 3; log ratios: 2.0 (r = 7.39 > c = 3 and > safety 6: no participation), 0.1, -0.05
    old = np.zeros((1, 3), np.float32)
    lp = np.array([[2.0, 0.1, -0.05]], np.float32)
    m = np.ones((1, 3), bool)
    g = 2 ** (-1 / 64)
    G1 = 0.1 + g * -0.05
    for a0, cap in ((1.0, False), (-1.0, True)):
        A = np.array([[a0, 1.0, 1.0]], np.float32)
        w = np.asarray(future_kl_weights(lp, old, A, m, high_only=False))
        w0 = min(max(math.exp(g * G1), 0.8), 1.2)  # G_0 excludes d_0 (p_0 = 0)
        w0 = min(max(w0, 0.8), 1.0) if cap else w0
        np.testing.assert_allclose(w[0], [w0, min(math.exp(G1), 1.2), max(math.exp(-0.05), 0.8)], rtol=1e-6)
    assert w[0, 0] == pytest.approx(1.0) and w[0, 2] < 1.0  # cap hit; low side open with high_only=False
    w = np.asarray(future_kl_weights(lp, old, A, m, high_only=True))
    assert w[0, 2] == 1.0


def test_future_kl_weights_have_no_gradient():
    lp, old, A, m, _ = loss_batch(3, 3, 5)
    g = jax.jit(jax.grad(lambda x: jnp.sum(future_kl_weights(x, old, A, m))))(jnp.asarray(lp))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------------------------------- policy loss
@settings(max_examples=40)
@given(shapes, st.integers(0, 10_000), st.sampled_from(MODES), st.sampled_from(AGGS), st.booleans(),
       st.booleans())
def test_policy_loss_matches_loop(shape, seed, mode, agg, bad, per_row):
    lp, old, A, m, ref = loss_batch(seed, *shape, bad=bad, per_row_adv=per_row, scale=1.2)
    kind = ["k1", "abs", "k2", "low_var_kl"][seed % 4]
    loss, met = policy_loss(lp, old, A, m, mode=mode, agg=agg, ref_logp=ref, kl_coef=0.05, kl_kind=kind)
    want, final, valid = ref_policy_loss(*(x.astype(float) for x in (lp, old, A)), m, mode, agg=agg,
                                         ref=ref.astype(float), kl_coef=0.05, kl_kind=kind)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
    assert float(met["valid_tokens"]) == final.sum()
    assert float(met["nonfinite_tokens"]) == (m & ~valid).sum()
    assert all(np.isfinite(float(v)) for v in met.values())


def test_policy_loss_modes_hand_example():
    # tokens: r = 1.5 (A > 0: high clip), r = 0.5 (A < 0: low clip), r = 5 (A < 0: dual clip), r = 1.1
    d = np.log(np.array([[1.5, 0.5, 5.0, 1.1]]))
    lp, old = d.astype(np.float32), np.zeros((1, 4), np.float32)
    A = np.array([[1.0, -1.0, -2.0, 0.5]], np.float32)
    m = np.ones((1, 4), bool)
    ppo = [-1.28, 0.8, 10.0, -0.55]
    dual = [-1.28, 0.8, 6.0, -0.55]
    for mode, toks in (("ppo", ppo), ("dual_clip", dual), ("aepo", dual)):
        loss, met = policy_loss(lp, old, A, m, mode=mode)
        assert float(loss) == pytest.approx(np.mean(toks), rel=1e-5)
        assert float(met["clip_frac_high"]) == 0.25 and float(met["clip_frac_low"]) == 0.25
        assert float(met["clip_frac_dual"]) == (0.0 if mode == "ppo" else 0.25)
        assert float(met["ratio_max"]) == pytest.approx(5.0) and float(met["ratio_min"]) == pytest.approx(0.5)
    for agg, want in (("seq-mean-token-sum", sum(dual)), ("seq-mean-token-mean", np.mean(dual))):
        assert float(policy_loss(lp, old, A, m, mode="dual_clip", agg=agg)[0]) == pytest.approx(want, rel=1e-5)


def test_future_kl_drops_rows_with_two_dual_clipped_tokens():
    old = np.zeros((2, 4), np.float32)
    lp = np.log(np.array([[5.0, 4.0, 1.05, 0.9], [5.0, 1.05, 0.95, 1.1]])).astype(np.float32)
    A = np.array([[-1.0] * 4, [-1.0] * 4], np.float32)
    m = np.ones((2, 4), bool)
    loss, met = policy_loss(lp, old, A, m, mode="future_kl")
    assert float(met["dropped_row_frac"]) == 0.5 and float(met["valid_tokens"]) == 4
    want, final, _ = ref_policy_loss(lp.astype(float), old.astype(float), A.astype(float), m, "future_kl")
    assert not final[0].any() and final[1].all()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    g = loss_grad(lp, old, A, m, mode="future_kl")
    np.testing.assert_array_equal(g[0], 0.0)
    assert np.all(g[1, 1:] != 0.0) and g[1, 0] == 0.0  # token 0 of row 1 is dual-clipped (constant)


def test_loss_is_float32_for_bf16_inputs():
    lp, old, A, m, _ = loss_batch(1, 3, 4)
    loss_bf, met = policy_loss(*(jnp.asarray(x, jnp.bfloat16) for x in (lp, old, A)), m)
    loss_32, _ = policy_loss(*(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32) for x in (lp, old, A)), m)
    assert loss_bf.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in met.values())
    assert float(loss_bf) == float(loss_32)


def test_entropy_bonus():
    lp, old, A, m, _ = loss_batch(2, 3, 4)
    ent = np.abs(np.random.default_rng(0).normal(size=(3, 4))).astype(np.float32)
    loss, met = policy_loss(lp, old, A, m, mode="ppo", entropy=ent, entropy_coef=0.01)
    want, _, valid = ref_policy_loss(*(x.astype(float) for x in (lp, old, A)), m, "ppo", ent=ent.astype(float),
                                     ent_coef=0.01)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    g = np.asarray(jax.jit(jax.grad(
        lambda e: policy_loss(lp, old, A, m, mode="ppo", entropy=e, entropy_coef=0.01)[0]))(jnp.asarray(ent)))
    np.testing.assert_allclose(g, np.where(valid, -0.01 / valid.sum(), 0.0), rtol=1e-6)


# ----------------------------------------------------------------------------------------- gradients
def kink_free_batch(seed, n, L):
    """log ratios at least 0.03 away from every clip boundary (ln 0.8, ln 1.28, ln 3) and A != 0."""
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.0, 0.5, (n, L))
    d = rng.normal(0.0, 0.9, (n, L))
    for b in (math.log(1 - EL), math.log(1 + EH), math.log(C), math.log(6.0)):
        close = np.abs(d - b) < 0.03
        d[close] += 0.06
    A = rng.choice([-1.0, 1.0], (n, L)) * rng.uniform(0.3, 2.0, (n, L))
    m = rng.random((n, L)) < 0.8
    ref = old + rng.normal(0.0, 0.3, (n, L))
    return old + d, old, A, m, ref


@pytest.mark.parametrize("mode,agg,kind", [("ppo", "token-mean", "low_var_kl"),
                                           ("dual_clip", "seq-mean-token-sum", "k2"),
                                           ("dual_clip", "seq-mean-token-mean", "abs"),
                                           ("future_kl", "token-mean", "low_var_kl")])
def test_grad_matches_finite_differences_float64(mode, agg, kind):
    lp, old, A, m, ref = kink_free_batch(11, 3, 5)
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (old, A)]
        refj = jnp.asarray(ref, jnp.float64)
        if mode == "future_kl":
            # w carries no gradient: differentiate the dual-clip loss with A~ = A (1 + w) held fixed
            _, final, _ = ref_policy_loss(lp, old, A, m, "future_kl")
            w = np.asarray(future_kl_weights(jnp.asarray(lp), args[0], args[1], m))
            fd_args, fd_mask, fd_mode = [args[0], args[1] * (1 + w)], final, "dual_clip"
        else:
            fd_args, fd_mask, fd_mode = args, m, mode

        def f(x, mode_, args_, mask_):
            return policy_loss(x, *args_, mask_, mode=mode_, agg=agg, ref_logp=refj, kl_coef=0.1,
                               kl_kind=kind)[0]

        x0 = jnp.asarray(lp, jnp.float64)
        g = np.asarray(jax.jit(jax.grad(f), static_argnums=1)(x0, mode, args, m))
        assert g.dtype == np.float64
        fj = jax.jit(f, static_argnums=1)
        h = 1e-6
        fd = np.zeros_like(lp)
        for idx in np.ndindex(lp.shape):
            e = np.zeros_like(lp)
            e[idx] = h
            hi, lo = fj(x0 + e, fd_mode, fd_args, fd_mask), fj(x0 - e, fd_mode, fd_args, fd_mask)
            fd[idx] = (float(hi) - float(lo)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
        # the loss value itself against the loop reference, in float64
        want, _, _ = ref_policy_loss(lp, old, A, m, mode, agg=agg, ref=ref, kl_coef=0.1, kl_kind=kind)
        # (float64 throughout, except the future-KL weights, whose scan runs in float32)
        assert float(f(x0, mode, args, m)) == pytest.approx(want, rel=1e-6 if mode == "future_kl" else 1e-10)


def test_zero_gradient_where_clipped_or_masked():
    lp, old, A, m, _ = kink_free_batch(5, 6, 8)
    lp, old, A = (x.astype(np.float32) for x in (lp, old, A))
    r = np.exp(lp - old)
    high, low, dual = (A > 0) & (r > 1 + EH), (A < 0) & (r < 1 - EL), (A < 0) & (r > C)
    assert high.any() and low.any() and dual.any() and (~m).any()
    for mode, zero in (("ppo", high | low), ("dual_clip", high | low | dual)):
        g = loss_grad(lp, old, A, m, mode=mode)
        np.testing.assert_array_equal(g[zero | ~m], 0.0)
        assert np.all(g[m & ~zero] != 0.0)
    # AEPO: the high-clipped tokens keep the gradient -A (1 + eps_high) / count (token-mean)
    g = loss_grad(lp, old, A, m, mode="aepo")
    np.testing.assert_array_equal(g[(low | dual) | ~m], 0.0)
    np.testing.assert_allclose(g[high & m], -A[high & m] * (1 + EH) / m.sum(), rtol=1e-5)
    rest = m & ~(high | low | dual)
    np.testing.assert_allclose(g[rest], -A[rest] * r[rest] / m.sum(), rtol=1e-5)


def test_future_kl_grad_equals_dual_clip_with_fixed_weights():
    lp, old, A, m, _ = kink_free_batch(8, 4, 6)
    lp, old, A = (x.astype(np.float32) for x in (lp, old, A))
    w = np.asarray(future_kl_weights(lp, old, A, m))
    _, final, _ = ref_policy_loss(lp.astype(float), old.astype(float), A.astype(float), m, "future_kl")
    g1 = loss_grad(lp, old, A, m, mode="future_kl")
    g2 = loss_grad(lp, old, A * (1 + w), final, mode="dual_clip")
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_at_masked_positions_has_no_effect(mode):
    lp, old, A, m, ref = loss_batch(4, 4, 6)
    bad = [x.copy() for x in (lp, old, A, ref)]
    vals = np.array([np.nan, np.inf, -np.inf], np.float32)
    for x in bad:
        x[~m] = vals[np.arange(int((~m).sum())) % 3]

    def run(lp_, old_, A_, ref_):
        return (policy_loss(lp_, old_, A_, m, mode=mode, ref_logp=ref_, kl_coef=0.01),
                loss_grad(lp_, old_, A_, m, mode=mode, ref_logp=ref_, kl_coef=0.01))

    (l1, met1), g1 = run(lp, old, A, ref)
    (l2, met2), g2 = run(*bad)
    assert np.isfinite(float(l2)) and float(l1) == float(l2)
    assert np.all(np.isfinite(g2))
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(g2[~m], 0.0)
    assert float(met2["nonfinite_tokens"]) == 0.0


def test_nonfinite_at_valid_positions_is_masked_and_counted():
    lp, old, A, m, _ = loss_batch(6, 3, 5)
    m[:] = True
    lp[0, 1], old[1, 2], A[2, 3] = np.nan, np.inf, -np.inf
    loss, met = policy_loss(lp, old, A, m, mode="dual_clip")
    clean = m.copy()
    clean[0, 1] = clean[1, 2] = clean[2, 3] = False
    loss_clean, _ = policy_loss(np.where(clean, lp, 0), np.where(clean, old, 0), np.where(clean, A, 0), clean,
                                mode="dual_clip")
    assert float(met["nonfinite_tokens"]) == 3.0 and float(met["valid_tokens"]) == 12.0
    assert float(loss) == pytest.approx(float(loss_clean), rel=1e-6)
    g = loss_grad(lp, old, A, m, mode="dual_clip")
    assert np.all(np.isfinite(g)) and g[0, 1] == 0.0


@pytest.mark.parametrize("mode,agg", [(mode, "token-mean") for mode in MODES]
                         + [("future_kl", agg) for agg in AGGS[1:]])
def test_all_masked_batch_gives_zero_loss_and_zero_grad(mode, agg):
    lp, old, A, _, ref = loss_batch(0, 3, 4, bad=True)
    m = np.zeros((3, 4), bool)
    loss, met = policy_loss(lp, old, A, m, mode=mode, agg=agg, ref_logp=ref, kl_coef=0.001)
    g = loss_grad(lp, old, A, m, mode=mode, agg=agg, ref_logp=ref, kl_coef=0.001)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(g, 0.0)
    assert all(float(v) == 0.0 for v in met.values())


def test_errors_are_clear():
    lp, old, A, m, _ = loss_batch(0, 2, 3)
    with pytest.raises(ValueError, match="unknown policy loss mode 'grpo'"):
        policy_loss(lp, old, A, m, mode="grpo")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        policy_loss(lp, old, A, m, agg="mean")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(lp, m, "sum")
    with pytest.raises(ValueError, match="unknown kl_kind"):
        policy_loss(lp, old, A, m, kl_kind="k7")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(lp, old, A, m, kl_coef=0.001)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(lp, old, A, m, mode="dual_clip", clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="old_logp shape"):
        policy_loss(lp, old[:, :2], A, m)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, A[:1], m)
    with pytest.raises(ValueError, match="logp must be"):
        policy_loss(lp[0], old[0], A[0], m[0])


def test_registry():
    assert set(MODES) <= set(POLICY_LOSSES.names())
    lp, old, A, m, _ = loss_batch(9, 3, 4)
    for mode in MODES:
        a = get_policy_loss(mode)(lp, old, A, m, agg="seq-mean-token-mean")[0]
        b = policy_loss(lp, old, A, m, mode=mode, agg="seq-mean-token-mean")[0]
        assert float(a) == float(b)
    with pytest.raises(UnknownNameError, match="known: aepo, cispo, dual_clip, future_kl, gppo, ppo"):
        get_policy_loss("trpo")


# ------------------------------------------------------------------------------------ jit / vmap / shard
def test_jit_and_vmap():
    batches = [loss_batch(s, 4, 5) for s in range(3)]
    lp, old, A, m, _ = (np.stack(x) for x in zip(*batches))
    f = jax.jit(partial(policy_loss, mode="future_kl", agg="seq-mean-token-mean"))
    losses, mets = jax.vmap(f)(lp, old, A, m)
    for k, (lp_, old_, A_, m_, _) in enumerate(batches):
        want, _, _ = ref_policy_loss(lp_.astype(float), old_.astype(float), A_.astype(float), m_, "future_kl",
                                     agg="seq-mean-token-mean")
        assert float(losses[k]) == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert mets["valid_tokens"].shape == (3,)


def test_sharded_equals_unsharded():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    lp, old, A, m, ref = loss_batch(21, 16, 12, scale=1.2)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    tok = NamedSharding(mesh, P("data", None))

    def f(lp_, old_, A_, m_, ref_):
        loss, met = policy_loss(lp_, old_, A_, m_, mode="future_kl", ref_logp=ref_, kl_coef=0.001)
        return loss, met, jax.grad(lambda x: policy_loss(x, old_, A_, m_, mode="future_kl", ref_logp=ref_,
                                                         kl_coef=0.001)[0])(lp_)

    fj = jax.jit(f)
    args = (lp, old, A, m, ref)
    out_s = fj(*[jax.device_put(x, tok) for x in args])
    out_u = fj(*args)
    assert len(out_s[2].sharding.device_set) == 8
    np.testing.assert_allclose(float(out_s[0]), float(out_u[0]), rtol=1e-6)
    for k in out_u[1]:
        np.testing.assert_allclose(float(out_s[1][k]), float(out_u[1][k]), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(out_s[2]), np.asarray(out_u[2]), rtol=1e-6, atol=1e-9)
    want, _, _ = ref_policy_loss(*(x.astype(float) for x in (lp, old, A)), m, "future_kl",
                                 ref=ref.astype(float), kl_coef=0.001)
    assert float(out_s[0]) == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------------------- truncated importance sampling
@settings(max_examples=30)
@given(shapes, st.integers(0, 10_000), st.sampled_from(MODES), st.sampled_from(AGGS), st.booleans(),
       st.sampled_from([0.5, 1.0, 2.0, 10.0]))
def test_tis_matches_loop(shape, seed, mode, agg, bad, cap):
    lp, old, A, m, ref = loss_batch(seed, *shape, bad=bad, scale=1.2)
    rng = np.random.default_rng(seed + 7)
    beh = (old + rng.normal(0.0, 0.8, old.shape)).astype(np.float32)  # sampler log-probs: ratios up to ~10
    loss, met = policy_loss(lp, old, A, m, mode=mode, agg=agg, behavior_logp=beh, tis_cap=cap)
    want, final, valid = ref_policy_loss(*(x.astype(float) for x in (lp, old, A)), m, mode, agg=agg,
                                         beh=beh.astype(float), tis_cap=cap)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
    with np.errstate(invalid="ignore"):
        w = np.minimum(np.exp(np.clip(old.astype(float) - beh, -20, 20)), cap)
    np.testing.assert_allclose(float(met["tis_weight_mean"]), w[valid].mean() if valid.any() else 0.0,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(met["tis_capped_frac"]), (w[valid] >= cap).mean() if valid.any() else 0.0,
                               atol=1e-6)


def test_tis_scales_each_tokens_gradient_by_its_detached_weight():
    lp, old, A, m, _ = loss_batch(3, 4, 6, scale=1.2)
    beh = (old + np.random.default_rng(0).normal(0.0, 0.8, old.shape)).astype(np.float32)
    for mode in MODES:
        plain = loss_grad(lp, old, A, m, mode=mode)
        with_tis = np.asarray(jax.grad(lambda x: policy_loss(x, old, A, m, mode=mode, behavior_logp=beh,
                                                             tis_cap=2.0)[0])(jnp.asarray(lp)))
        w = np.where(m, np.minimum(np.exp(old - beh), 2.0), 0.0)
        np.testing.assert_allclose(with_tis, plain * w, rtol=1e-4, atol=1e-6)
        # off by default: the loss does not look at behavior_logp
        np.testing.assert_allclose(float(policy_loss(lp, old, A, m, mode=mode, behavior_logp=beh)[0]),
                                   float(policy_loss(lp, old, A, m, mode=mode)[0]))


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), float("inf")])
def test_tis_bad_cap_names_the_value(cap):
    lp, old, A, m, _ = loss_batch(0, 2, 3)
    with pytest.raises(ValueError, match="loss.tis_cap="):
        policy_loss(lp, old, A, m, behavior_logp=old, tis_cap=cap)
    with pytest.raises(ValueError, match="behaviour log-probs"):
        policy_loss(lp, old, A, m, tis_cap=2.0)


def test_gppo_keeps_a_bounded_gradient_where_ppo_clips():
    """GPPO: the value of the PPO clip; where PPO clips (A > 0, r > 1 + eh or A < 0, r < 1 - el) the gradient
    d loss_t / d lp_t is -A (1 + eh) resp. -A (1 - el) instead of 0, elsewhere it equals PPO's (-A r)."""
    lp = np.array([[0.5, -0.5, 0.5, -0.5, 0.1, 0.0]], np.float32)
    old = np.zeros_like(lp)
    A = np.array([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0]], np.float32)
    m = np.ones_like(lp, bool)
    g = np.asarray(jax.grad(lambda x: policy_loss(x, old, A, m, mode="gppo", agg="seq-mean-token-sum")[0])(
        jnp.asarray(lp)))[0]
    r = np.exp(lp[0])
    want = [-1.0 * (1 + EH), 1.0 * (1 - EL), -(-1.0) * r[2], -1.0 * r[3], -1.0 * r[4], 1.0 * r[5]]
    np.testing.assert_allclose(g, want, rtol=1e-5)
    ppo = np.asarray(jax.grad(lambda x: policy_loss(x, old, A, m, mode="ppo", agg="seq-mean-token-sum")[0])(
        jnp.asarray(lp)))[0]
    np.testing.assert_allclose(ppo[:2], 0.0)  # PPO: no gradient at the clipped tokens
    np.testing.assert_allclose(ppo[2:], g[2:], rtol=1e-5)


def test_cispo_gradient_is_the_clipped_detached_weight_times_the_advantage():
    lp = np.array([[0.5, -0.5, 0.1, -2.0]], np.float32)
    old = np.zeros_like(lp)
    A = np.array([[1.0, -1.0, -2.0, 0.5]], np.float32)
    m = np.ones_like(lp, bool)
    g = np.asarray(jax.grad(lambda x: policy_loss(x, old, A, m, mode="cispo", agg="seq-mean-token-sum")[0])(
        jnp.asarray(lp)))[0]
    np.testing.assert_allclose(g, -np.minimum(np.exp(lp[0]), 1 + EH) * A[0], rtol=1e-5)  # no token dropped


def test_gppo_and_aepo_keep_the_clipped_gradient_beyond_the_log_ratio_guard():
    """Log-ratios +-25 lie beyond the +-20 guard of r. The loss stays finite, and a token clipped on GPPO's side
    keeps the published gradient: -(1 + eh) A where A > 0 and r > 1 + eh, -(1 - el) A where A < 0 and r < 1 - el
    (times the token-mean weight 1/4). The other two take the unclipped -A r: at -25 its gradient -A e^-25 (~0),
    at +25 the guard holds the value at -A e^20 and its gradient at 0 (as in every mode). AEPO shares the high
    side."""
    lp = np.array([[25.0, -25.0, 25.0, -25.0]], np.float32)
    old = np.zeros_like(lp)
    A = np.array([[1.5, -0.5, -1.0, 2.0]], np.float32)
    m = np.ones_like(lp, bool)
    loss, g = jax.value_and_grad(lambda x: policy_loss(x, old, A, m, mode="gppo")[0])(jnp.asarray(lp))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(np.asarray(g)[0], [-(1 + EH) * 1.5 / 4, -(1 - EL) * -0.5 / 4, 0.0,
                                                  -2.0 * math.exp(-25.0) / 4], rtol=1e-6, atol=1e-9)
    loss, g = jax.value_and_grad(lambda x: policy_loss(x, old, A, m, mode="aepo")[0])(jnp.asarray(lp))
    assert np.isfinite(float(loss)) and float(g[0, 0]) == pytest.approx(-(1 + EH) * 1.5 / 4, rel=1e-6)


def test_a_loss_registered_outside_the_package_validates_computes_and_trains():
    """docs/architecture.md, "Adding a loss": its code block, run here as written, registers REINFORCE (loss_t =
    -A_t lp_t) from outside the package; it is a loss mode like the built-in ones: the shared wrapper sanitises and
    aggregates it, the config accepts its name, the train step trains with it."""
    import optax
    from test_config import _small
    from test_train_step import CFG, PARAMS, _batch

    from appo_jax.training.batch import TrainBatch
    from appo_jax.training.config import apply_overrides, resolved_loss, validate
    from appo_jax.training.train_step import StepConfig, TrainStepRunner, init_train_state

    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    block = re.search(r"```python\n# my_loss.py\n(.*?)```", doc, re.S).group(1)  # docs' "Adding a loss", as written
    name = "reinforce"
    try:
        exec(compile(block, "my_loss.py", "exec"), {})
        lp, old, A, m, _ = loss_batch(5, 4, 6, bad=True)
        loss, met = policy_loss(lp, old, A, m, mode=name)
        valid = ref_valid(lp, old, A, m)
        want = ref_agg(-A.astype(float) * lp.astype(float), valid, "token-mean")
        assert float(loss) == pytest.approx(want, rel=1e-5)
        assert float(get_policy_loss(name)(lp, old, A, m)[0]) == float(loss)
        assert float(met["valid_tokens"]) == valid.sum() and float(met["nonfinite_tokens"]) == (m & ~valid).sum()
        assert float(met["clip_frac_dual"]) == 0.0 and float(met["dropped_row_frac"]) == 0.0
        np.testing.assert_allclose(loss_grad(lp, old, A, m, mode=name), np.where(valid, -A / valid.sum(), 0.0),
                                   rtol=1e-6)

        cfg = apply_overrides(_small(), [f"loss.mode={name}"])
        validate(cfg)
        options = resolved_loss(cfg)
        assert options["mode"] == name
        step = StepConfig.make(CFG, options, micro_batches=2, logprob_chunk=4)
        state, _ = init_train_state(PARAMS, optax.sgd(1.0))
        batch = TrainBatch(**{k: jnp.asarray(v) for k, v in _batch().items()})
        new, metrics = TrainStepRunner(step)(state, batch)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["update_skipped"]) == 0.0
        assert any(not np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(new.params)))
    finally:
        POLICY_LOSSES.remove(name)
