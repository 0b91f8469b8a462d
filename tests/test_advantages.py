"""Advantage estimators vs independent explicit-loop references written from docs/algorithm.md §1.4-1.7."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from appo_jax.core import advantages as adv_mod
from appo_jax.core.advantages import (
    ADVANTAGE_FIELDS, advantages_from_trajectory, appo_advantages, compute_advantages, entropy_zscore,
    grpo_advantages, outcome_token_rewards, reward_scale, scale_token_advantages, scaled_outcome_rewards,
)
from appo_jax.core.registry import ADVANTAGES, UnknownNameError, get_advantage
from appo_jax.core.trajectory import KIND_BRANCH, Trajectory

EPS = 1e-6


# --------------------------------------------------------------------------------------------- references
def ref_group_norm(values, members, seg_of, norm_by_std):
    """values/members/seg_of: Python lists; member rows of the same segment are normalised together."""
    out = [0.0] * len(values)
    for s in set(seg_of[i] for i in range(len(values)) if members[i]):
        idx = [i for i in range(len(values)) if members[i] and seg_of[i] == s]
        mu = sum(values[i] for i in idx) / len(idx)
        sd = math.sqrt(sum((values[i] - mu) ** 2 for i in idx) / len(idx))
        for i in idx:
            out[i] = (values[i] - mu) / (sd + EPS) if norm_by_std else values[i] - mu
    return out


def ref_takes_part(r, g, num_groups, valid, i):
    return bool(valid[i]) and 0 <= g[i] < num_groups and math.isfinite(r[i])


def ref_grpo(r, g, num_groups, norm_by_std=True, valid=None):
    n = len(r)
    valid = [True] * n if valid is None else list(valid)
    members = [ref_takes_part(r, g, num_groups, valid, i) for i in range(n)]
    return ref_group_norm(list(r), members, list(g), norm_by_std)


def ref_landed(g, br, par, pos, valid, L, j, r=None, num_groups=None):
    n = len(g)

    def ok(i):
        good = bool(valid[i]) and g[i] >= 0 and (num_groups is None or g[i] < num_groups)
        return good and (r is None or math.isfinite(r[i]))

    if not (br[j] and ok(j) and 0 <= par[j] < n and 0 <= pos[j] < L):
        return False
    p = par[j]
    return ok(p) and not br[p] and g[p] == g[j]


def ref_appo(r, g, br, par, pos, m, num_groups, norm_by_std=True, valid=None, prefix_credit=True):
    n, L = m.shape
    valid = [True] * n if valid is None else list(valid)
    landed = [ref_landed(g, br, par, pos, valid, L, j, r, num_groups) for j in range(n)]
    init = [ref_takes_part(r, g, num_groups, valid, i) and not br[i] for i in range(n)]
    members = [init[i] or landed[i] for i in range(n)]
    seg = [(g[i], bool(br[i])) for i in range(n)]
    a = ref_group_norm(list(r), members, seg, norm_by_std)
    out = np.zeros((n, L))
    for i in range(n):
        if not init[i]:
            continue
        for t in range(L):
            if not m[i, t]:
                continue
            credit = [a[j] for j in range(n) if landed[j] and par[j] == i and t <= pos[j]]
            out[i, t] = a[i] + (sum(credit) / len(credit) if credit and prefix_credit else 0.0)
    return out


def ref_reward_scale(bs, br, par, pos, m, discount, valid=None, g=None):
    n, L = m.shape
    valid = [True] * n if valid is None else list(valid)
    g = [0] * n if g is None else list(g)
    landed = [ref_landed(g, br, par, pos, valid, L, j) for j in range(n)]
    finite = [landed[j] and math.isfinite(bs[j]) for j in range(n)]
    mx = max([bs[j] for j in range(n) if finite[j]], default=-math.inf)
    out = np.ones((n, L))
    for i in range(n):
        kids = [j for j in range(n) if landed[j] and par[j] == i]
        if not kids:
            continue
        for t in range(L):
            if not m[i, t]:
                continue
            vals = []
            for j in kids:
                f = bs[j] / mx if (finite[j] and bs[j] > 0 and mx > 0) else 0.0
                vals.append(1.0 + f * discount ** (pos[j] - t) if t <= pos[j] else 1.0)
            out[i, t] = sum(vals) / len(vals)
    return out


def ref_token_z(h, mask):
    vals = [h[i, t] for i in range(h.shape[0]) for t in range(h.shape[1]) if mask[i, t]]
    out = np.zeros(h.shape)
    if not vals:
        return out
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
    sd = 1.0 if sd < 1e-8 else sd
    for i in range(h.shape[0]):
        for t in range(h.shape[1]):
            if mask[i, t]:
                out[i, t] = (h[i, t] - mu) / sd
    return out


# ------------------------------------------------------------------------------------------- generators
def random_batch(seed, n, L, num_groups, nan_reward=False):
    rng = np.random.default_rng(seed)
    g = rng.integers(-1, num_groups + 1, size=n)  # includes -1 and num_groups (out of range)
    br = rng.random(n) < 0.5
    par = np.where(br, rng.integers(-2, n + 1, size=n), -1)
    # make most parents plausible: an initial row of the same group
    for j in range(n):
        cands = [i for i in range(n) if not br[i] and g[i] == g[j]]
        if br[j] and cands and rng.random() < 0.8:
            par[j] = rng.choice(cands)
    pos = np.where(br, rng.integers(-1, L + 1, size=n), -1)
    m = rng.random((n, L)) < 0.7
    m[rng.random(n) < 0.2] = False  # some all-masked rows
    r = rng.choice([0.0, 1.0, -1.0, 0.5], size=n) + (rng.random(n) < 0.3) * rng.normal(size=n)
    if nan_reward and n > 1:
        r[rng.integers(0, n)] = np.nan
    valid = rng.random(n) < 0.9
    bs = rng.normal(size=n)
    return dict(r=r.astype(np.float32), g=g.astype(np.int32), br=br, par=par.astype(np.int32),
                pos=pos.astype(np.int32), m=m, valid=valid, bs=bs.astype(np.float32))


# (N, L, num_groups): few distinct shapes keep compilation cheap; masks, ids and values vary freely.
sizes = st.sampled_from([(1, 1, 1), (4, 1, 2), (3, 5, 3), (8, 5, 2)])


# -------------------------------------------------------------------------------------------------- grpo
def test_grpo_small_cases():
    r = np.array([1.0, 0.0, 1.0, 5.0, 2.0, 7.0], np.float32)
    g = np.array([0, 0, 0, 1, -1, 3], np.int32)  # group 1 of one, -1 padding, 3 out of range, group 2 empty
    a = np.asarray(grpo_advantages(r, g, 3))
    mu, sd = 2 / 3, math.sqrt(2 / 9)
    z = [(x - mu) / (sd + EPS) for x in (1.0, 0.0, 1.0)]
    np.testing.assert_allclose(a, z + [0, 0, 0], rtol=1e-5)
    a = np.asarray(grpo_advantages(r, g, 3, norm_by_std=False))
    np.testing.assert_allclose(a, [1 / 3, -2 / 3, 1 / 3, 0, 0, 0], rtol=1e-5, atol=1e-6)
    # valid mask: row 2 left out of the statistics
    a = np.asarray(grpo_advantages(r, g, 3, valid=np.array([1, 1, 0, 1, 1, 1], bool)))
    np.testing.assert_allclose(a, [0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0, 0, 0, 0], rtol=1e-5)


def test_grpo_nan_reward_is_left_out():
    r = np.array([1.0, np.nan, 0.0, np.inf], np.float32)
    a = np.asarray(grpo_advantages(r, np.zeros(4, np.int32), 1))
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, [1 / (0.5 + EPS) * 0.5, 0, -0.5 / (0.5 + EPS), 0], rtol=1e-5)


@settings(max_examples=25)
@given(sizes, st.integers(0, 10_000), st.booleans())
def test_grpo_matches_loop(size, seed, norm):
    n, _, ng = size
    b = random_batch(seed, n, 1, ng, nan_reward=True)
    got = np.asarray(grpo_advantages(b["r"], b["g"], ng, norm, valid=b["valid"]))
    want = ref_grpo(b["r"].astype(float), b["g"], ng, norm, b["valid"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------- appo
def test_appo_hand_example():
    # group 0: initial rows 0, 1, 5; branches 2, 3 (parent 0 at t=2, t=4) and 4 (parent 1 at t=1)
    r = np.array([1.0, 0.0, 1.0, 0.5, 0.0, 1.0], np.float32)
    g = np.zeros(6, np.int32)
    br = np.array([0, 0, 1, 1, 1, 0], bool)
    par = np.array([-1, -1, 0, 0, 1, -1], np.int32)
    pos = np.array([-1, -1, 2, 4, 1, -1], np.int32)
    m = np.ones((6, 6), bool)
    m[0, 5] = False
    got = np.asarray(appo_advantages(r, g, br, par, pos, m, 1))
    a_init = [(x - 2 / 3) / (math.sqrt(2 / 9) + EPS) for x in (1.0, 0.0, 1.0)]
    a_br = [(x - 0.5) / (math.sqrt(1 / 6) + EPS) for x in (1.0, 0.5, 0.0)]
    want = np.zeros((6, 6))
    want[0, :3] = a_init[0] + (a_br[0] + a_br[1]) / 2
    want[0, 3:5] = a_init[0] + a_br[1]
    want[1, :2] = a_init[1] + a_br[2]
    want[1, 2:] = a_init[1]
    want[5] = a_init[2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # ablation: no prefix credit
    got = np.asarray(appo_advantages(r, g, br, par, pos, m, 1, prefix_credit=False))
    want = np.zeros((6, 6))
    want[0, :5], want[1], want[5] = a_init[0], a_init[1], a_init[2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_appo_ignored_branches_and_rows_without_branches():
    # rows 0, 1 initial (group 0), 5, 6 initial (group 1), 10 the only landed branch (parent 0 at t=1);
    # every other branch row is ignored: 2: no parent, 3: parent out of range, 4: parent in another group,
    # 7: parent is a branch row, 8: branch position beyond L, 9: invalid row (valid=False)
    r = np.array([1.0, 0.0, 1.0, 0.0, 5.0, 1.0, 0.0, 3.0, 2.0, 4.0, 2.0], np.float32)
    g = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0], np.int32)
    br = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    par = np.array([-1, -1, -1, 11, 5, -1, -1, 2, 0, 0, 0], np.int32)
    pos = np.array([-1, -1, 1, 1, 1, -1, -1, 0, 3, 0, 1], np.int32)
    valid = np.array([1] * 9 + [0, 1], bool)
    m = np.ones((11, 3), bool)
    got = np.asarray(appo_advantages(r, g, br, par, pos, m, 2, valid=valid))
    a = 0.5 / (0.5 + EPS)
    want = np.zeros((11, 3))
    want[0], want[1], want[5], want[6] = a, -a, a, -a  # the lone landed branch has A_branch = 0
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, ref_appo(r.astype(float), g, br, par, pos, m, 2, valid=valid), rtol=1e-5)
    bs = np.full(11, 2.0, np.float32)
    bs[10] = 1.0
    scale = np.asarray(reward_scale(bs, br, par, pos, m, valid=valid, group_ids=g))
    want = np.ones((11, 3))
    want[0, :2] = [1 + 0.9, 2.0]  # only branch 10 counts; max over landed branches = its own score
    np.testing.assert_allclose(scale, want, rtol=1e-6)


@settings(max_examples=30)
@given(sizes, st.integers(0, 10_000), st.booleans(), st.booleans())
def test_appo_matches_loop(size, seed, norm, credit):
    n, L, ng = size
    b = random_batch(seed, n, L, ng, nan_reward=True)
    got = np.asarray(appo_advantages(b["r"], b["g"], b["br"], b["par"], b["pos"], b["m"], ng, norm,
                                     valid=b["valid"], prefix_credit=credit))
    want = ref_appo(b["r"].astype(float), b["g"], b["br"], b["par"], b["pos"], b["m"], ng, norm, b["valid"],
                    credit)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.all(got[b["br"]] == 0) and np.all(got[~b["m"]] == 0)


def test_appo_jit_and_vmap():
    bs = [random_batch(s, 8, 5, 2) for s in range(3)]
    stack = {k: np.stack([b[k] for b in bs]) for k in bs[0]}
    f = jax.jit(appo_advantages, static_argnames=("num_groups",))
    got = jax.vmap(lambda r, g, br, par, pos, m: f(r, g, br, par, pos, m, num_groups=2))(
        stack["r"], stack["g"], stack["br"], stack["par"], stack["pos"], stack["m"])
    for k, b in enumerate(bs):
        want = ref_appo(b["r"].astype(float), b["g"], b["br"], b["par"], b["pos"], b["m"], 2)
        np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-4, atol=1e-4)


def test_appo_sharded_equals_unsharded():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    b = random_batch(7, 16, 12, 3)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    row, tok = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
    args = (b["r"], b["g"], b["br"], b["par"], b["pos"], b["m"])
    shardings = (row, row, row, row, row, tok)
    sharded = [jax.device_put(x, s) for x, s in zip(args, shardings)]
    f = jax.jit(lambda *a: appo_advantages(*a, 3, valid=None))
    out_s = f(*sharded)
    out_u = f(*args)
    assert len(out_s.sharding.device_set) == 8 or out_s.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_u), rtol=1e-6, atol=1e-6)
    want = ref_appo(b["r"].astype(float), b["g"], b["br"], b["par"], b["pos"], b["m"], 3)
    np.testing.assert_allclose(np.asarray(out_s), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ reward scale
def test_reward_scale_hand_example():
    br = np.array([0, 0, 1, 1, 1], bool)
    par = np.array([-1, -1, 0, 0, 1], np.int32)
    pos = np.array([-1, -1, 2, 4, 1], np.int32)
    bs = np.array([0, 0, 2.0, 1.0, -1.0], np.float32)
    m = np.ones((5, 6), bool)
    got = np.asarray(reward_scale(bs, br, par, pos, m, discount=0.9))
    want = np.ones((5, 6))
    for t in range(6):
        m2 = 1 + 1.0 * 0.9 ** (2 - t) if t <= 2 else 1.0
        m3 = 1 + 0.5 * 0.9 ** (4 - t) if t <= 4 else 1.0
        want[0, t] = (m2 + m3) / 2
    # row 1's only branch scored -1.0 (a fallback selection): factor 0, M = 1 -- never below 1
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reward_scale_negative_score_regression():
    """The minimal case of the negative-score bug: initial rewards 1, 0, 0.9; row 0 has branches scored 2.0 at
    position 3 and -0.5 at position 5 (its last token). The official implementation gives M = 1 at position 5
    and initial advantages [0.815, -1.408, 0.593]; the bug (factor -0.5 / 2) gave M = 0.875 and
    [0.677, -1.414, 0.737]."""
    r = np.array([1.0, 0.0, 0.9, 1.0, 0.0], np.float32)
    g = np.zeros(5, np.int32)
    br = np.array([0, 0, 0, 1, 1], bool)
    par = np.array([-1, -1, -1, 0, 0], np.int32)
    pos = np.array([-1, -1, -1, 3, 5], np.int32)
    bs = np.array([0, 0, 0, 2.0, -0.5], np.float32)
    m = np.ones((5, 6), bool)
    scale = np.asarray(reward_scale(bs, br, par, pos, m, discount=0.9, group_ids=g))
    assert scale[0, 5] == 1.0
    # t <= 3: the mean of 1 + 0.9^(3 - t) (score 2.0 / max 2.0) and 1 (score -0.5 -> factor 0)
    np.testing.assert_allclose(scale[0, :4], [(2 + 0.9 ** (3 - t)) / 2 for t in range(4)], rtol=1e-6)
    np.testing.assert_array_equal(scale[1:], 1.0)
    adv = np.asarray(compute_advantages("appo", rewards=r, group_ids=g, is_branch=br, parent=par, branch_pos=pos,
                                        gen_mask=m, num_groups=1, branch_scores=bs, prefix_credit=False))
    np.testing.assert_allclose(adv[:3, 5], [0.815, -1.408, 0.593], atol=1e-3)


def test_reward_scale_degenerate_max_is_one():
    br = np.array([0, 1], bool)
    par, pos = np.array([-1, 0], np.int32), np.array([-1, 1], np.int32)
    m = np.ones((2, 3), bool)
    for bs in ([0.0, 0.0], [0.0, -2.0], [0.0, np.nan]):
        got = np.asarray(reward_scale(np.array(bs, np.float32), br, par, pos, m))
        np.testing.assert_array_equal(got, np.ones((2, 3)))


@settings(max_examples=25)
@given(sizes, st.integers(0, 10_000), st.sampled_from([0.9, 1.0, 0.5]))
def test_reward_scale_matches_loop(size, seed, disc):
    n, L, ng = size
    b = random_batch(seed, n, L, ng)
    got = np.asarray(reward_scale(b["bs"], b["br"], b["par"], b["pos"], b["m"], discount=disc,
                                  valid=b["valid"], group_ids=b["g"]))
    want = ref_reward_scale(b["bs"].astype(float), b["br"], b["par"], b["pos"], b["m"], disc, b["valid"],
                            b["g"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reward_scale_helpers():
    m = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    r = np.array([2.0, 3.0, -1.0], np.float32)
    tok = np.asarray(outcome_token_rewards(r, m))
    np.testing.assert_array_equal(tok, [[0, 0, 0, 2, 0], [0] * 5, [-1, 0, 0, 0, 0]])
    scale = np.array([[5, 5, 5, 1.5, 5], [9] * 5, [2, 1, 1, 1, 1]], np.float32)
    np.testing.assert_allclose(np.asarray(scaled_outcome_rewards(r, m, scale)), [3.0, 3.0, -2.0])
    np.testing.assert_allclose(np.asarray(scale_token_advantages(tok, scale)), tok * scale)


# --------------------------------------------------------------------------------- baselines / registry
def test_registry_names_and_errors():
    assert {"appo", "appo_no_prefix_credit", "grpo", "arpo", "tree_grpo", "aepo"} <= set(ADVANTAGES.names())
    with pytest.raises(UnknownNameError, match="known: .*appo"):
        get_advantage("nope")
    with pytest.raises(TypeError, match="rewardz"):
        compute_advantages("grpo", rewardz=np.zeros(2))
    with pytest.raises(ValueError, match="tree_ids"):
        compute_advantages("tree_grpo", rewards=np.zeros(2), group_ids=np.zeros(2, np.int32),
                           gen_mask=np.ones((2, 2), bool), num_groups=1)
    with pytest.raises(ValueError, match="procedure_scaling"):
        compute_advantages("appo", rewards=np.zeros(2), group_ids=np.zeros(2, np.int32),
                           is_branch=np.zeros(2, bool), parent=-np.ones(2, np.int32),
                           branch_pos=-np.ones(2, np.int32), gen_mask=np.ones((2, 2), bool), num_groups=1,
                           procedure_scaling="bogus")
    with pytest.raises(ValueError, match="num_groups"):
        grpo_advantages(np.zeros(2), np.zeros(2, np.int32), 0)


@settings(max_examples=15)
@given(sizes, st.integers(0, 10_000), st.booleans())
def test_baselines_match_loops(size, seed, norm):
    n, L, ng = size
    b = random_batch(seed, n, L, ng)
    rng = np.random.default_rng(seed + 1)
    fields = dict(rewards=b["r"], group_ids=b["g"], is_branch=b["br"], parent=b["par"], branch_pos=b["pos"],
                  gen_mask=b["m"], num_groups=ng, valid=b["valid"], norm_by_std=norm)
    r = b["r"].astype(float)
    row = np.array(ref_grpo(r, b["g"], ng, norm, b["valid"]))
    want_grpo = np.where(b["m"], row[:, None], 0.0)
    for name in ("grpo", "arpo"):
        np.testing.assert_allclose(np.asarray(compute_advantages(name, **fields)), want_grpo, rtol=1e-4,
                                   atol=1e-4)
    # Tree-GRPO: prompt-group GRPO + tree-group GRPO over the rows taking part in their prompt group
    trees = rng.integers(-1, 3, size=n).astype(np.int32)
    takes = [ref_takes_part(r, b["g"], ng, b["valid"], i) for i in range(n)]
    tree_part = np.array(ref_grpo(r, trees, 2, norm, takes))
    got = np.asarray(compute_advantages("tree_grpo", tree_ids=trees, num_trees=2, **fields))
    np.testing.assert_allclose(got, np.where(b["m"], (row + tree_part)[:, None], 0.0), rtol=1e-4, atol=1e-4)
    # AEPO: A (1 + 0.2 z(H)) with H z-scored over the valid tokens of the batch
    h = rng.random((n, L)).astype(np.float32)
    tok_valid = b["m"] & b["valid"][:, None]
    want = want_grpo * (1 + 0.2 * ref_token_z(h.astype(float), tok_valid))
    got = np.asarray(compute_advantages("aepo", entropy=h, **fields))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # APPO entries: no scaling == appo_advantages; "advantage" scaling == A * M
    plain = appo_advantages(b["r"], b["g"], b["br"], b["par"], b["pos"], b["m"], ng, norm, valid=b["valid"])
    np.testing.assert_allclose(np.asarray(compute_advantages("appo", procedure_scaling="none", **fields)),
                               np.asarray(plain), rtol=1e-6)
    M = ref_reward_scale(b["bs"].astype(float), b["br"], b["par"], b["pos"], b["m"], 0.9, b["valid"], b["g"])
    got = compute_advantages("appo", procedure_scaling="advantage", branch_scores=b["bs"], **fields)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain) * M, rtol=1e-4, atol=1e-4)
    # official: scale the token-level outcome reward, then the advantage
    last = [max([t for t in range(L) if b["m"][i, t]], default=None) for i in range(n)]
    r_scaled = np.array([r[i] * M[i, last[i]] if last[i] is not None else r[i] for i in range(n)])
    want = ref_appo(r_scaled, b["g"], b["br"], b["par"], b["pos"], b["m"], ng, norm, b["valid"])
    got = compute_advantages("appo", branch_scores=b["bs"], **fields)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    no_credit = ref_appo(r, b["g"], b["br"], b["par"], b["pos"], b["m"], ng, norm, b["valid"], prefix_credit=False)
    for name, extra in (("appo_no_prefix_credit", {}), ("appo", {"prefix_credit": False})):
        got = compute_advantages(name, procedure_scaling="none", **extra, **fields)
        np.testing.assert_allclose(np.asarray(got), no_credit, rtol=1e-4, atol=1e-4)


def test_aepo_rollout_scope_and_no_entropy_gradient():
    m = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
    h = np.array([[1.0, 3.0, 99], [0.5, 0.5, 0.5], [4.0, 0, 0], [7, 7, 7]], np.float32)
    g = np.array([0, 0, 0, 0], np.int32)
    z = np.asarray(entropy_zscore(h, m, scope="rollout", group_ids=g, num_groups=1))
    means = [2.0, 0.5, 4.0]
    mu, sd = sum(means) / 3, math.sqrt(sum((x - sum(means) / 3) ** 2 for x in means) / 3)
    want = np.zeros((4, 3))
    for i in range(3):
        want[i][m[i]] = (means[i] - mu) / (sd + EPS)
    np.testing.assert_allclose(z, want, rtol=1e-5)
    with pytest.raises(ValueError, match="entropy scope"):
        entropy_zscore(h, m, scope="nope")
    r = np.array([1.0, 0.0, 0.5, 0.0], np.float32)

    def f(hh):
        return jnp.sum(compute_advantages("aepo", rewards=r, group_ids=g, gen_mask=m, num_groups=1,
                                          entropy=hh))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(f))(jnp.asarray(h))), 0.0)


def test_advantages_from_trajectory():
    t = Trajectory.empty(4, 3, 2)
    t = t.replace(reward=np.array([1.0, 0.0, 1.0, 0.0], np.float32), group_id=np.zeros(4, np.int32),
                  kind=np.array([0, 0, KIND_BRANCH, 0], np.int32), parent=np.array([-1, -1, 0, -1], np.int32),
                  branch_pos=np.array([-1, -1, 1, -1], np.int32), gen_mask=np.ones((4, 3), bool),
                  row_valid=np.array([1, 1, 1, 0], bool), branch_score=np.array([0, 0, 1.0, 0], np.float32))
    got = np.asarray(advantages_from_trajectory("appo", t, 1, procedure_scaling="none"))
    want = ref_appo(np.array([1.0, 0.0, 1.0, 0.0]), [0] * 4, [0, 0, 1, 0], [-1, -1, 0, -1], [-1, -1, 1, -1],
                    np.ones((4, 3), bool), 1, valid=[1, 1, 1, 0])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "branch_scores" in ADVANTAGE_FIELDS and adv_mod.REWARD_SCALE_DISCOUNT == 0.9


# ------------------------------------------------------------------------------------------ REINFORCE++
def ref_reinforce_pp(r, g, m, ng, valid, baseline):
    n, L = m.shape
    ok = [bool(valid[i]) and 0 <= g[i] < ng and math.isfinite(r[i]) for i in range(n)]
    rr = [float(r[i]) if ok[i] else 0.0 for i in range(n)]
    if baseline:
        means = {}
        for k in range(ng):
            members = [rr[i] for i in range(n) if ok[i] and g[i] == k]
            means[k] = sum(members) / len(members) if members else 0.0
        rr = [rr[i] - means[g[i]] if ok[i] else rr[i] for i in range(n)]
    toks = [(i, t) for i in range(n) for t in range(L) if ok[i] and m[i, t]]
    out = np.zeros((n, L))
    if not toks:
        return out
    mu = sum(rr[i] for i, _ in toks) / len(toks)
    var = sum((rr[i] - mu) ** 2 for i, _ in toks) / len(toks)
    for i, t in toks:
        out[i, t] = (rr[i] - mu) / math.sqrt(var + 1e-8)
    return out


@settings(max_examples=25)
@given(sizes, st.integers(0, 10_000), st.booleans())
def test_reinforce_pp_matches_loop(size, seed, baseline):
    n, L, ng = size
    b = random_batch(seed, n, L, ng)
    name = "reinforce_pp_baseline" if baseline else "reinforce_pp"
    got = np.asarray(compute_advantages(name, rewards=b["r"], group_ids=b["g"], gen_mask=b["m"], num_groups=ng,
                                        valid=b["valid"]))
    want = ref_reinforce_pp(b["r"].astype(float), b["g"], b["m"], ng, b["valid"], baseline)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- levels and dual groups (§1.10)
def ref_lineage(g, br, par, pos, valid, L, j, levels, r, num_groups):
    """(landed, root, shared_end, level) of row j by walking its chain (slow loop)."""
    n = len(g)

    def ok(i):
        return bool(valid[i]) and 0 <= g[i] < num_groups and math.isfinite(r[i])

    cur, shared, level = j, L - 1, 0
    if not br[j] or not ok(j):
        return False, j, shared, 0
    while br[cur]:
        if level == levels:
            return False, j, shared, 0
        p = par[cur]
        if not (0 <= p < n and 0 <= pos[cur] < L and ok(p) and g[p] == g[cur]):
            return False, j, shared, 0
        shared, level, cur = min(shared, pos[cur]), level + 1, p
    return True, cur, shared, level


def ref_appo_levels(r, g, br, par, pos, m, num_groups, levels, norm_by_std=True, valid=None, dual_group=True):
    n, L = m.shape
    valid = [True] * n if valid is None else list(valid)
    lin = [ref_lineage(g, br, par, pos, valid, L, j, levels, r, num_groups) for j in range(n)]
    init = [ref_takes_part(r, g, num_groups, valid, i) and not br[i] for i in range(n)]
    members = [init[i] or lin[i][0] for i in range(n)]
    seg = [(g[i], lin[i][3] if dual_group else 0) for i in range(n)]
    a = ref_group_norm(list(r), members, seg, norm_by_std)
    out = np.zeros((n, L))
    for i in range(n):
        for t in range(L):
            if not init[i] or not m[i, t]:
                continue
            out[i, t] = a[i]
            for level in range(1, levels + 1):
                credit = [a[d] for d in range(n) if lin[d][0] and lin[d][1] == i and lin[d][3] == level
                          and t <= lin[d][2]]
                out[i, t] += sum(credit) / len(credit) if credit else 0.0
    return out


def random_tree_batch(seed, num_groups, n_init, branches, levels, L):
    """Group-major trees: n_init roots per group, ``branches`` children per row of the previous level, random
    branch positions, some broken links (out-of-range position, a parent in another group, an invalid row)."""
    rng = np.random.default_rng(seed)
    g, br, par, pos = [], [], [], []
    prev = []
    for q in range(num_groups):
        for _ in range(n_init):
            prev.append(len(g))
            g.append(q), br.append(False), par.append(-1), pos.append(-1)
    for _ in range(levels):
        nxt = []
        for p in prev:
            for _ in range(branches):
                nxt.append(len(g))
                g.append(g[p]), br.append(True), par.append(p), pos.append(int(rng.integers(0, L)))
        prev = nxt
    n = len(g)
    g, br, par, pos = map(np.array, (g, br, par, pos))
    broken = rng.random(n) < 0.1
    pos = np.where(broken & br, L + 1, pos)
    par = np.where((rng.random(n) < 0.05) & br, (par + n_init) % n, par)
    valid = rng.random(n) < 0.95
    r = rng.choice([0.0, 1.0, 0.5], size=n) + (rng.random(n) < 0.3) * rng.normal(size=n)
    m = rng.random((n, L)) < 0.8
    return dict(r=r.astype(np.float32), g=g.astype(np.int32), br=br, par=par.astype(np.int32),
                pos=pos.astype(np.int32), m=m, valid=valid)


@settings(max_examples=15)
@given(st.sampled_from([(2, 2, 1, 2), (1, 2, 3, 2), (2, 1, 2, 3)]), st.integers(0, 10_000), st.booleans())
def test_appo_levels_match_the_chain_walking_loop(shape, seed, dual):
    """L levels (docs/algorithm.md §1.10): each level's branches normalised as their own group (or, w/o dual
    group, with the initial rows), prefix credit to the root up to the prefix the branch shares with it."""
    ng, n_init, branches, levels = shape
    L, norm = 6, seed % 2 == 0  # norm_by_std from the seed: half the compiled variants
    b = random_tree_batch(seed, ng, n_init, branches, levels, L)
    got = np.asarray(appo_advantages(b["r"], b["g"], b["br"], b["par"], b["pos"], b["m"], ng, norm,
                                     valid=b["valid"], levels=levels, dual_group=dual))
    want = ref_appo_levels(b["r"].astype(float), b["g"], b["br"], b["par"], b["pos"], b["m"], ng, levels, norm,
                           b["valid"], dual)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if levels > 1 and dual:  # one level fewer: the deepest branches are ignored, the rest as before
        fewer = np.asarray(appo_advantages(b["r"], b["g"], b["br"], b["par"], b["pos"], b["m"], ng, norm,
                                           valid=b["valid"], levels=levels - 1))
        want = ref_appo_levels(b["r"].astype(float), b["g"], b["br"], b["par"], b["pos"], b["m"], ng, levels - 1,
                               norm, b["valid"])
        np.testing.assert_allclose(fewer, want, rtol=1e-4, atol=1e-4)


def test_two_level_hand_example_and_no_dual_group():
    """Group of one initial row i (R 1) with branches a (t 3, R 0) and b (t 1, R 1) and a's child c (t 2 in a,
    R 1), d (t 4 in a, R 0): level 1 = {a, b}, level 2 = {c, d}; c shares i's prefix up to min(3, 2) = 2, d up to
    min(3, 4) = 3."""
    r = np.array([1.0, 0.0, 1.0, 1.0, 0.0], np.float32)
    g = np.zeros(5, np.int32)
    br = np.array([False, True, True, True, True])
    par = np.array([-1, 0, 0, 1, 1], np.int32)
    pos = np.array([-1, 3, 1, 2, 4], np.int32)
    m = np.ones((5, 6), bool)
    got = np.asarray(appo_advantages(r, g, br, par, pos, m, 1, levels=2))
    a1 = np.array([-0.5, 0.5]) / (0.5 + EPS)  # level 1: a = -1, b = +1
    a2 = np.array([0.5, -0.5]) / (0.5 + EPS)  # level 2: c = +1, d = -1
    want = np.zeros(6)  # A_init(i) = 0 (a group of one)
    want[:2] += a1.mean()  # t <= 1: a and b
    want[2:4] += a1[0]  # 2 <= t <= 3: a only
    want[:3] += a2.mean()  # t <= 2: c and d
    want[3] += a2[1]  # t = 3: d only
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    assert np.all(got[1:] == 0)
    one_level = np.asarray(appo_advantages(r, g, br, par, pos, m, 1, levels=1))
    np.testing.assert_allclose(one_level[0], np.where(np.arange(6) <= 1, a1.mean(), 0) + np.where(
        (np.arange(6) >= 2) & (np.arange(6) <= 3), a1[0], 0), rtol=1e-5)
    pooled = np.asarray(appo_advantages(r, g, br, par, pos, m, 1, levels=2, dual_group=False))
    z = (r - r.mean()) / (r.std() + EPS)  # all five rows in one group
    want = np.full(6, z[0])
    want[:2] += z[[1, 2]].mean()
    want[2:4] += z[1]
    want[:3] += z[[3, 4]].mean()
    want[3] += z[4]
    np.testing.assert_allclose(pooled[0], want, rtol=1e-5)
    assert get_advantage("appo_no_dual_group") is not None
