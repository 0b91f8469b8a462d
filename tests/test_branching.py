"""Branching Score (docs/algorithm.md §1.1-1.2) against slow explicit-loop references written from the formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appo_jax.core.branching import (
    branching_scores,
    future_log_ratio,
    future_values,
    select_branch_points,
    token_entropy,
)

# ----------------------------------------------------------------------------------------- references


def ref_entropy(logits_row, temperature):
    z = [float(v) / temperature for v in logits_row]
    finite = [v for v in z if v != -math.inf]
    zmax = max(finite)
    denom = sum(math.exp(v - zmax) for v in finite)
    h = 0.0
    for v in finite:
        p = math.exp(v - zmax) / denom
        if p > 0:
            h -= p * math.log(p)
    return h


def ref_future(log_ratio_row, mask_row, gamma, clip_eps):
    length = len(log_ratio_row)
    d = [float(log_ratio_row[t]) if mask_row[t] else 0.0 for t in range(length)]
    f = [sum(gamma ** (k - t) * d[k] for k in range(t, length)) for t in range(length)]
    omega = []
    for ft in f:
        o = math.exp(min(max(ft, -20.0), 20.0))
        if clip_eps > 0:
            o = min(max(o, 1 - clip_eps), 1 + clip_eps)
        omega.append(o)
    return f, omega


def ref_row_z(values, valid):
    idx = [t for t in range(len(values)) if valid[t]]
    if not idx:
        return [0.0] * len(values), True
    mean = sum(values[t] for t in idx) / len(idx)
    std = math.sqrt(sum((values[t] - mean) ** 2 for t in idx) / len(idx))
    constant = std < 1e-8
    sd = 1.0 if constant else std
    return [(values[t] - mean) / sd if valid[t] else 0.0 for t in range(len(values))], constant


def ref_scores(h_row, o_row, cand_row):
    valid = [bool(cand_row[t]) and math.isfinite(h_row[t]) and math.isfinite(o_row[t]) for t in range(len(h_row))]
    zh, hc = ref_row_z([float(v) for v in h_row], valid)
    zo, oc = ref_row_z([float(v) for v in o_row], valid)
    scores, strict = [], []
    for t in range(len(h_row)):
        if not valid[t]:
            scores.append(0.0)
            strict.append(False)
        elif oc and not hc:
            scores.append(zh[t])
            strict.append(zh[t] > 0)
        elif hc and not oc:
            scores.append(zo[t])
            strict.append(zo[t] > 0)
        else:
            scores.append(zh[t] * zo[t])
            strict.append(zh[t] > 0 and zo[t] > 0)
    return scores, strict, zh, zo


def ref_select(scores, strict, cand, group_ids, num_groups, budget):
    n, length = len(scores), len(scores[0]) if scores else 0
    rows = [[-1] * budget for _ in range(num_groups)]
    pos = [[-1] * budget for _ in range(num_groups)]
    sc = [[0.0] * budget for _ in range(num_groups)]
    valid = [[False] * budget for _ in range(num_groups)]
    for g in range(num_groups):
        strict_list, other = [], []
        for r in range(n):
            if group_ids[r] != g:
                continue
            for t in range(length):
                if cand[r][t] and math.isfinite(scores[r][t]):
                    (strict_list if strict[r][t] else other).append((-float(scores[r][t]), r, t))
        chosen = (sorted(strict_list) + sorted(other))[:budget]
        for j in range(budget if chosen else 0):
            s, r, t = chosen[j % len(chosen)]
            rows[g][j], pos[g][j], sc[g][j], valid[g][j] = r, t, -s, True
    return np.array(rows, np.int64).reshape(num_groups, budget), np.array(pos, np.int64).reshape(
        num_groups, budget), np.array(sc, np.float64).reshape(num_groups, budget), np.array(valid).reshape(
        num_groups, budget)


# ----------------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_entropy_matches_reference_with_masked_vocab(temperature):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 4, 33)) * 4).astype(np.float32)
    logits[rng.random(logits.shape) < 0.3] = -np.inf
    logits[..., 0] = 1.0  # at least one finite entry per position
    got = np.asarray(jax.jit(token_entropy)(logits, temperature))
    assert got.shape == (3, 4)
    want = np.array([[ref_entropy(logits[i, j], temperature) for j in range(4)] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_entropy_bf16_and_huge_logits():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((5, 50)) * 3).astype(np.float32)
    bf = jnp.asarray(logits, jnp.bfloat16)
    got = token_entropy(bf)
    assert got.dtype == jnp.float32
    want = [ref_entropy(np.asarray(bf[i], np.float32), 1.0) for i in range(5)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # logsumexp without shift would overflow; H = lse - sum p z would cancel catastrophically.
    huge = jnp.array([[1e30, 1e30, -1e30, -jnp.inf], [3e38, -3e38, 0.0, 3e38], [5e4, 5e4 - 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(token_entropy(huge)),
                               [math.log(2), math.log(2), ref_entropy([5e4, 5e4 - 1.0, 0.0, 0.0], 1.0)],
                               rtol=1e-6)
    uniform = token_entropy(jnp.zeros((1000,)))
    np.testing.assert_allclose(float(uniform), math.log(1000), rtol=1e-6)


def test_entropy_nan_stays_at_its_position():
    logits = jnp.array([[0.0, 1.0, 2.0], [jnp.nan, 0.0, 0.0], [jnp.inf, 0.0, 0.0], [-jnp.inf] * 3, [0.0, 0.0, 0.0]])
    got = np.asarray(token_entropy(logits))
    assert np.isnan(got[1:4]).all()
    np.testing.assert_allclose(got[[0, 4]], [ref_entropy([0.0, 1.0, 2.0], 1.0), math.log(3)], rtol=1e-6)
    grad = jax.grad(lambda x: token_entropy(x).sum())(jnp.array([[0.0, 1.0, -jnp.inf]]))
    assert np.isfinite(np.asarray(grad)[0, :2]).all()


def test_entropy_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(jnp.zeros((2, 3)), 0.0)


# ----------------------------------------------------------------------------------------- future values


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("clip_eps", [0.2, 0.0, -1.0])
def test_future_values_match_loop(gamma, clip_eps):
    rng = np.random.default_rng(2)
    lr = (rng.standard_normal((4, 13)) * 0.3).astype(np.float32)
    lr[0, :] *= 30  # large |F| to exercise the +-20 clip
    mask = rng.random((4, 13)) < 0.7
    mask[1] = False
    lr[~mask & (rng.random((4, 13)) < 0.5)] = np.nan  # masked-out NaN must not leak
    got_f = np.asarray(jax.jit(future_log_ratio)(lr, mask, gamma))
    got_o = np.asarray(jax.jit(future_values)(lr, mask, gamma, clip_eps))
    for i in range(4):
        f, om = ref_future(lr[i], mask[i], gamma, clip_eps)
        np.testing.assert_allclose(got_f[i], f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_o[i], om, rtol=1e-5, atol=1e-6)
    assert np.all(got_o[1] == 1.0)


def test_future_values_nan_at_valid_position_propagates_backwards_only():
    lr = np.zeros((1, 6), np.float32)
    lr[0, 3] = np.nan
    om = np.asarray(jax.jit(future_values)(lr, np.ones((1, 6), bool)))
    assert np.isnan(om[0, :4]).all() and np.all(om[0, 4:] == 1.0)


@pytest.mark.parametrize("gamma", [1.0, 0.99])
def test_future_values_stable_at_32k(gamma):
    rng = np.random.default_rng(3)
    length = 32768
    lr = (rng.standard_normal((2, length)) * 0.05).astype(np.float32)
    mask = rng.random((2, length)) < 0.9
    got_f, got_o = jax.jit(lambda x, m, g: (future_log_ratio(x, m, g), future_values(x, m, g, 0.2)))(lr, mask, gamma)
    got_f, got_o = np.asarray(got_f), np.asarray(got_o)
    assert np.isfinite(got_f).all() and np.isfinite(got_o).all()
    d = np.where(mask, lr, 0.0).astype(np.float64)
    want = np.zeros_like(d)
    acc = np.zeros(2)
    for t in range(length - 1, -1, -1):  # float64 reverse recurrence F_t = D_t + gamma F_{t+1}
        acc = d[:, t] + gamma * acc
        want[:, t] = acc
    scale = np.abs(want).max()
    np.testing.assert_allclose(got_f, want, atol=1e-4 * max(scale, 1.0))
    np.testing.assert_allclose(got_o, np.clip(np.exp(np.clip(want, -20, 20)), 0.8, 1.2), rtol=1e-4)


def test_future_values_traced_params_and_vmap():
    rng = np.random.default_rng(4)
    lr = rng.standard_normal((3, 2, 7)).astype(np.float32)
    mask = rng.random((3, 2, 7)) < 0.8
    f = jax.jit(lambda x, m, g, e: future_values(x, m, g, e))
    got = np.asarray(f(lr, mask, jnp.float32(0.7), jnp.float32(0.3)))
    got_vmap = np.asarray(jax.vmap(lambda x, m: future_values(x, m, 0.7, 0.3))(lr, mask))
    np.testing.assert_allclose(got, got_vmap, rtol=1e-6)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(got[i, j], ref_future(lr[i, j], mask[i, j], 0.7, 0.3)[1], rtol=1e-5)


# ----------------------------------------------------------------------------------------- scores


def _check_scores(h, o, cand):
    scores, strict = jax.jit(branching_scores)(h, o, cand)
    scores, strict = np.asarray(scores), np.asarray(strict)
    for i in range(h.shape[0]):
        ref_s, ref_st, zh, zo = ref_scores(h[i], o[i], cand[i])
        np.testing.assert_allclose(scores[i], ref_s, rtol=1e-4, atol=1e-5)
        decided = np.array([abs(a) > 1e-4 for a in zh]) & np.array([abs(b) > 1e-4 for b in zo])
        np.testing.assert_array_equal(strict[i][decided], np.array(ref_st)[decided])
    assert not strict[~cand].any() and np.all(scores[~cand] == 0)
    return scores, strict


def test_branching_scores_match_loop():
    rng = np.random.default_rng(5)
    h = rng.random((6, 20)).astype(np.float32) * 3
    o = rng.uniform(0.8, 1.2, (6, 20)).astype(np.float32)
    cand = rng.random((6, 20)) < 0.6
    cand[2] = False  # no candidates
    cand[3] = False
    cand[3, 5] = True  # one candidate: both constant -> score 0, not strict
    h[4, 3] = np.nan  # a NaN candidate is dropped, the rest of the row is unaffected
    o[4, 7] = np.inf
    scores, strict = _check_scores(h, o, cand)
    assert scores[3, 5] == 0 and not strict[3].any()
    vm_scores, vm_strict = jax.vmap(branching_scores)(h[:, None], o[:, None], cand[:, None])  # rows independent
    np.testing.assert_allclose(np.asarray(vm_scores)[:, 0], scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(vm_strict)[:, 0], strict)
    assert scores[4, 3] == 0 and scores[4, 7] == 0 and np.isfinite(scores).all()


@pytest.mark.parametrize("const", [1.0, 1.2, 0.8, 1.1])
def test_constant_omega_degrades_to_entropy_ranking(const):
    # 1.2 / 0.8: Omega saturated at a clip bound; float32 means of such rows are off by an ulp, which must not
    # turn Z(Omega) into +-1 (that would reverse or randomise the ranking).
    rng = np.random.default_rng(6)
    length = 100
    h = rng.random((3, length)).astype(np.float32)
    o = np.full((3, length), const, np.float32)
    cand = rng.random((3, length)) < 0.8
    scores, strict = _check_scores(h, o, cand)
    best = []
    for i in range(3):
        idx = np.flatnonzero(cand[i])
        zh = (h[i, idx] - h[i, idx].mean()) / h[i, idx].std()
        np.testing.assert_allclose(scores[i, idx], zh, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.argsort(-scores[i, idx], kind="stable"),
                                      np.argsort(-h[i, idx], kind="stable"))
        np.testing.assert_array_equal(strict[i, idx], zh > 0)
        best += [(-z, i, t) for z, t in zip(zh, idx)]
    # and the selection follows the per-rollout entropy Z-scores (not "first tokens win")
    rows, pos, _, valid = select_branch_points(scores, strict, cand, np.zeros(3, np.int32), 1, 4)
    assert np.asarray(valid).all()
    assert list(zip(np.asarray(rows[0]).tolist(), np.asarray(pos[0]).tolist())) == [(r, t) for _, r, t in
                                                                                    sorted(best)[:4]]


def test_constant_entropy_uses_omega():
    rng = np.random.default_rng(7)
    h = np.full((2, 30), 0.37, np.float32)
    o = rng.uniform(0.8, 1.2, (2, 30)).astype(np.float32)
    cand = rng.random((2, 30)) < 0.7
    scores, strict = _check_scores(h, o, cand)
    for i in range(2):
        idx = np.flatnonzero(cand[i])
        zo = (o[i, idx] - o[i, idx].mean()) / o[i, idx].std()
        np.testing.assert_allclose(scores[i, idx], zo, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(strict[i, idx], zo > 0)


_DYADIC = st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.5, 2.0])


@given(st.data())
def test_branching_scores_property(data):
    n = data.draw(st.sampled_from([1, 3]))
    length = data.draw(st.sampled_from([1, 2, 7]))
    h = np.array(data.draw(st.lists(_DYADIC, min_size=n * length, max_size=n * length)), np.float32)
    o = np.array(data.draw(st.lists(_DYADIC, min_size=n * length, max_size=n * length)), np.float32)
    cand = np.array(data.draw(st.lists(st.booleans(), min_size=n * length, max_size=n * length)))
    h, o, cand = h.reshape(n, length), o.reshape(n, length), cand.reshape(n, length)
    scores, strict = jax.jit(branching_scores)(h, o, cand)
    scores, strict = np.asarray(scores), np.asarray(strict)
    for i in range(n):
        ref_s, ref_st, _, _ = ref_scores(h[i], o[i], cand[i])
        np.testing.assert_allclose(scores[i], ref_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(strict[i], ref_st)  # dyadic inputs: the signs of Z are exact


# ----------------------------------------------------------------------------------------- selection


def _check_select(scores, strict, cand, group_ids, num_groups, budget):
    rows, pos, sc, valid = select_branch_points(scores, strict, cand, group_ids, num_groups, budget)
    want = ref_select(scores.tolist(), strict.tolist(), cand.tolist(), list(group_ids), num_groups, budget)
    for got, ref in zip((rows, pos, sc, valid), want):
        assert got.shape == (num_groups, budget)
        np.testing.assert_array_equal(np.asarray(got), ref)
    return rows, pos, sc, valid


@given(st.data())
def test_select_branch_points_matches_reference(data):
    # a few shapes only (each new shape compiles); L = 1, groups of one, empty groups and budgets 0 / above the
    # number of candidates all occur.
    n = data.draw(st.sampled_from([1, 2, 5]), label="N")
    length = data.draw(st.sampled_from([1, 4, 6]), label="L")
    num_groups = data.draw(st.sampled_from([1, 3]), label="G")
    budget = data.draw(st.sampled_from([0, 1, 3, 9]), label="B")
    size = n * length
    # few distinct values -> many ties, exercising the (row, position) tie-break
    scores = np.array(data.draw(st.lists(st.sampled_from([-1.5, -0.5, 0.0, 0.5, 1.0, 2.0]), min_size=size,
                                         max_size=size)), np.float32).reshape(n, length)
    cand = np.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size))).reshape(n, length)
    strict = np.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size))).reshape(n, length)
    group_ids = np.array(data.draw(st.lists(st.integers(-1, num_groups), min_size=n, max_size=n)), np.int32)
    _check_select(scores, strict, cand, group_ids, num_groups, budget)


def test_select_rules_by_hand():
    # group 0: rows 0 and 2 (non-contiguous), group 1: row 1 with one fallback candidate, group 2: empty,
    # row 3 has an out-of-range group id and must be ignored.
    scores = np.array([[0.9, 0.1, 0.5, -0.2], [0.3, 0.0, 0.0, 0.0], [0.7, 2.0, 0.9, 0.0], [9.0, 9.0, 9.0, 9.0]],
                      np.float32)
    strict = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], bool)
    cand = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    rows, pos, sc, valid = _check_select(scores, strict, cand, np.array([0, 1, 0, 5]), 3, 6)
    # strict by score (0.9 tie -> lower row), then fallback by score (2.0 > 0.1 > -0.2)
    assert np.asarray(rows[0]).tolist() == [0, 2, 2, 0, 2, 0]
    assert np.asarray(pos[0]).tolist() == [0, 2, 0, 2, 1, 1]
    assert np.asarray(rows[1]).tolist() == [1] * 6 and np.asarray(pos[1]).tolist() == [0] * 6  # cyclic repeat
    assert not np.asarray(valid[2]).any() and np.asarray(rows[2]).tolist() == [-1] * 6
    np.testing.assert_array_equal(np.asarray(sc[0]), np.float32([0.9, 0.9, 0.7, 0.5, 2.0, 0.1]))


def test_select_budget_zero_and_all_masked():
    z = np.zeros((3, 5), np.float32)
    out = select_branch_points(z, z > 0, z > 0, np.array([0, 1, 1]), 2, 0)
    assert all(a.shape == (2, 0) for a in out)
    rows, pos, sc, valid = select_branch_points(z, z > 0, z > 0, np.array([0, 1, 1]), 2, 3)
    assert not np.asarray(valid).any() and np.all(np.asarray(rows) == -1) and np.all(np.asarray(pos) == -1)


def test_select_is_vmappable():
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((2, 5, 7)).astype(np.float32)
    strict = rng.random((2, 5, 7)) < 0.3
    cand = rng.random((2, 5, 7)) < 0.7
    gid = np.array([[0, 1, 0, 2, 1], [2, 2, 0, 0, -1]], np.int32)
    out = jax.vmap(lambda s, st_, c, g: select_branch_points(s, st_, c, g, 3, 4))(scores, strict, cand, gid)
    for b in range(2):
        want = ref_select(scores[b].tolist(), strict[b].tolist(), cand[b].tolist(), list(gid[b]), 3, 4)
        for got, ref in zip(out, want):
            np.testing.assert_array_equal(np.asarray(got[b]), ref)


def test_pipeline_end_to_end_under_jit():
    """future values -> scores -> selection on one jitted function, checked against the loop references."""
    rng = np.random.default_rng(9)
    n, length = 6, 16
    lr = (rng.standard_normal((n, length)) * 0.1).astype(np.float32)
    h = rng.random((n, length)).astype(np.float32)
    cand = rng.random((n, length)) < 0.6
    gid = np.array([1, 0, 1, 0, 1, 0], np.int32)

    @jax.jit
    def pipeline(lr, h, cand, gid):
        omega = future_values(lr, cand, 0.95, 0.2)
        scores, strict = branching_scores(h, omega, cand)
        return scores, strict, select_branch_points(scores, strict, cand, gid, 2, 5)

    scores, strict, out = pipeline(lr, h, cand, gid)
    ref_s = [ref_scores(h[i], ref_future(lr[i], cand[i], 0.95, 0.2)[1], cand[i])[0] for i in range(n)]
    np.testing.assert_allclose(np.asarray(scores), ref_s, rtol=1e-4, atol=1e-5)
    want = ref_select(np.asarray(scores).tolist(), np.asarray(strict).tolist(), cand.tolist(), list(gid), 2, 5)
    for got, ref in zip(out, want):
        np.testing.assert_array_equal(np.asarray(got), ref)
