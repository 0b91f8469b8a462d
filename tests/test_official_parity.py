"""``algorithm.branching_parity``: the official implementation's Branching Score against an independent slow
reference written from the official code's semantics (docs/official_differences.md), and the degenerate cases
where the two parities differ: constant Omega, constant entropy, a row that fills the whole length, rows with
tool-result holes and rows whose best points score below 0."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from appo_jax.core.branch_points import choose_branch_points
from appo_jax.core.candidates import CANDIDATE_RULES, candidate_table_from_strings
from appo_jax.core.stats import masked_zscore, official_zscore
from appo_jax.core.trajectory import TrajectoryBuilder

#: token texts of the test vocabulary: words, whitespace-only, punctuation-only and one special token (id 0)
TEXTS = ["<|im_end|>", " ", "\n", "  ", ".", ",", "(", "+"] + [f" w{i}" for i in range(40)]
SPECIAL = {0}


def ref_official(tokens, gen, entropy, lc, lb, groups, num_groups, budget, gamma=1.0, eps=0.2):
    """The official selection, loop by loop: Omega over the loss mask, Z-scores over every loss-mask token of
    the row with (std + 1e-6), whitespace-only tokens skipped afterwards, strict = Z(H) > 0 & Z(Omega) > 0 &
    BS > 0, top-B strict per prompt group then fallback by score (stable: row, position), cyclic fill, and a
    point at the last position dropped. Returns {group: [(row, pos, score, dropped), ...]}."""
    n, length = tokens.shape
    strict_c, fallback_c = {g: [] for g in range(num_groups)}, {g: [] for g in range(num_groups)}
    for r in range(n):
        valid = [t for t in range(length) if gen[r, t]]
        if not valid:
            continue
        d = [(lc[r, t] - lb[r, t]) if gen[r, t] else 0.0 for t in range(length)]
        omega = []
        for t in range(length):
            f = sum(gamma ** (k - t) * d[k] for k in range(t, length))
            o = math.exp(min(max(f, -20.0), 20.0))
            omega.append(min(max(o, 1 - eps), 1 + eps) if eps > 0 else o)

        def z(values):
            mu = sum(values) / len(values)
            sd = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
            return [(v - mu) / (sd + 1e-6) for v in values]

        zh = dict(zip(valid, z([float(entropy[r, t]) for t in valid])))
        zo = dict(zip(valid, z([omega[t] for t in valid])))
        for t in valid:
            if not TEXTS[tokens[r, t]].strip():
                continue
            bs = zh[t] * zo[t]
            fallback_c[groups[r]].append((bs, r, t))
            if zh[t] > 0 and zo[t] > 0 and bs > 0:
                strict_c[groups[r]].append((bs, r, t))
    out = {}
    for g in range(num_groups):
        strict = sorted(strict_c[g], key=lambda c: -c[0])
        fallback = sorted(fallback_c[g], key=lambda c: -c[0])
        chosen = strict[:budget]
        keys = {(r, t) for _, r, t in chosen}
        for c in fallback:
            if len(chosen) >= budget:
                break
            if (c[1], c[2]) not in keys:
                chosen.append(c)
                keys.add((c[1], c[2]))
        i = 0
        while chosen and len(chosen) < budget:
            chosen.append(chosen[i % len(chosen)])
            i += 1
        out[g] = [(r, t, s, t >= length - 1) for s, r, t in chosen]
    return out


def _traj(tokens, gen, entropy, groups):
    n, length = tokens.shape
    b = TrajectoryBuilder(n, length, 2)
    for r in range(n):
        b.set_row(r, prompt_ids=[1, 1], tokens=tokens[r], gen_mask=gen[r], obs_mask=np.zeros(length, bool),
                  behavior_logp=np.full(length, -1.0), entropy=entropy[r], reward=0.0, group=int(groups[r]), kind=0)
    return b.build()


def _official_table():
    return jnp.asarray(CANDIDATE_RULES["official"](TEXTS, SPECIAL))


def _batch(seed):
    """2-3 prompt groups x 4 initial rows, L 24-64, tool-result holes, a row that fills the whole length, a row
    with constant Omega (lc = lb) and one with constant entropy."""
    rng = np.random.default_rng(seed)
    num_groups, per = int(rng.integers(2, 4)), 4
    n, length = num_groups * per, int(rng.integers(24, 65))
    tokens = rng.integers(0, len(TEXTS), (n, length)).astype(np.int32)
    gen = np.zeros((n, length), bool)
    for r in range(n):
        end = length if r == 0 else int(rng.integers(length // 3, length + 1))
        gen[r, :end] = True
        if rng.random() < 0.5:  # a tool result inside the response
            a = int(rng.integers(0, end))
            gen[r, a:a + int(rng.integers(1, 6))] = False
    entropy = (rng.random((n, length)) * 3).astype(np.float32)
    lc = rng.normal(-1.0, 0.5, (n, length)).astype(np.float32)
    lb = (lc + rng.normal(0, 0.02, (n, length))).astype(np.float32)
    lb[1] = lc[1]  # constant Omega (exactly 1)
    entropy[2] = 0.5  # constant entropy (exactly representable: Z exactly 0)
    if seed % 3 == 0:  # a whole group with constant Omega: no strict candidate, every score 0
        lb[per:2 * per] = lc[per:2 * per]
    groups = np.repeat(np.arange(num_groups), per).astype(np.int32)
    return tokens, gen, entropy, lc, lb, groups, num_groups


@pytest.mark.parametrize("seed", range(25))
def test_official_parity_matches_the_slow_reference(seed):
    tokens, gen, entropy, lc, lb, groups, ng = _batch(seed)
    budget = (4, 40, 300)[seed % 3]  # top-B strict; fallback by score (< 0 too); cyclic fill past the candidates
    traj = _traj(tokens, gen, entropy, groups)
    pts = choose_branch_points(traj, jnp.asarray(lc), jnp.asarray(lb), _official_table(), num_groups=ng,
                               budget=budget, parity="official")
    want = ref_official(tokens, gen, entropy.astype(float), lc.astype(float), lb.astype(float), groups, ng, budget)
    for g in range(ng):
        got = [(int(pts.rows[g, j]), int(pts.positions[g, j])) for j in range(budget)]
        assert got == [(r, t) for r, t, _, _ in want[g]], f"group {g}"
        np.testing.assert_allclose(np.asarray(pts.selected_scores[g]), [s for _, _, s, _ in want[g]],
                                   rtol=1e-4, atol=1e-4)
        assert [bool(x) for x in pts.dropped[g]] == [d for _, _, _, d in want[g]]
        assert [bool(x) for x in pts.valid[g]] == [not d for _, _, _, d in want[g]]


def test_constant_omega_first_tokens_win_officially_entropy_ranks_ours():
    n, length = 2, 10
    tokens = np.full((n, length), 10, np.int32)  # " w2": a candidate under both rules
    gen = np.ones((n, length), bool)
    entropy = np.tile(np.linspace(0.1, 1.0, length, dtype=np.float32), (n, 1))  # rising: late tokens uncertain
    lp = jnp.full((n, length), -1.0)  # lc = lb: Omega constant
    traj = _traj(tokens, gen, entropy, np.zeros(n, np.int32))
    official = choose_branch_points(traj, lp, lp, _official_table(), num_groups=1, budget=3, parity="official")
    assert [(int(r), int(t)) for r, t in zip(official.rows[0], official.positions[0])] == [(0, 0), (0, 1), (0, 2)]
    assert not np.asarray(official.strict).any()
    ours = choose_branch_points(traj, lp, lp, jnp.asarray(candidate_table_from_strings(TEXTS, SPECIAL)),
                                num_groups=1, budget=3)
    assert [int(t) for t in ours.positions[0]] == [8, 8, 7]  # highest entropy, never the last position
    assert [int(r) for r in ours.rows[0]] == [0, 1, 0]


def test_last_position_is_offered_and_dropped_officially_never_ours():
    n, length = 1, 8
    tokens = np.full((n, length), 10, np.int32)
    gen = np.ones((n, length), bool)
    entropy = np.array([[0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 3.0]], np.float32)  # the last token is the peak
    lc = jnp.asarray(np.array([[-1, -1, -1, -1, -1, -1, -1, -0.5]], np.float32))
    lb = jnp.full((n, length), -1.0)
    traj = _traj(tokens, gen, entropy, np.zeros(n, np.int32))
    official = choose_branch_points(traj, lc, lb, _official_table(), num_groups=1, budget=2, parity="official")
    assert int(official.positions[0, 0]) == length - 1
    assert bool(official.dropped[0, 0]) and not bool(official.valid[0, 0])
    ours = choose_branch_points(traj, lc, lb, jnp.asarray(candidate_table_from_strings(TEXTS, SPECIAL)),
                                num_groups=1, budget=2)
    assert (np.asarray(ours.positions) < length - 1).all() and not np.asarray(ours.dropped).any()


def test_official_candidates_keep_punctuation_and_special_tokens():
    official = CANDIDATE_RULES["official"](TEXTS, SPECIAL)
    ours = CANDIDATE_RULES["appo_jax"](TEXTS, SPECIAL)
    assert official.tolist()[:8] == [True, False, False, False, True, True, True, True]
    assert ours.tolist()[:8] == [False] * 8
    assert official[8:].all() and ours[8:].all()


def test_official_zscore_of_a_constant_row_is_rounding_noise():
    x = jnp.full((1, 7), 0.7, jnp.float32)
    m = jnp.ones((1, 7), bool)
    z = np.asarray(official_zscore(x, m))
    assert np.abs(z).max() < 0.1 and len(set(np.sign(z[0]).tolist())) == 1  # noise, one sign for the whole row
    np.testing.assert_array_equal(np.asarray(masked_zscore(x, m)), 0.0)  # ours: exactly 0
    y = np.array([[1.0, 2.0, 4.0, 99.0]], np.float32)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    np.testing.assert_allclose(np.asarray(official_zscore(y, np.array([[1, 1, 1, 0]], bool))),
                               [[(v - 7 / 3) / (sd + 1e-6) for v in (1, 2, 4)] + [0.0]], rtol=1e-5)


def test_unknown_parity_is_rejected():
    tokens, gen, entropy, lc, lb, groups, ng = _batch(0)
    with pytest.raises(ValueError, match="branching parity"):
        choose_branch_points(_traj(tokens, gen, entropy, groups), jnp.asarray(lc), jnp.asarray(lb),
                             _official_table(), num_groups=ng, budget=2, parity="verl")


def test_config_errors_name_the_value():
    from appo_jax.rollout.config import RolloutConfig
    from appo_jax.training.config import ConfigError, ExperimentConfig, validate
    cfg = ExperimentConfig()
    cfg.algorithm.branching_parity = "verl"
    with pytest.raises(ConfigError, match="algorithm.branching_parity"):
        validate(cfg)
    with pytest.raises(ValueError, match="rollout.entropy='approx'"):
        RolloutConfig(entropy="approx")
    with pytest.raises(ValueError, match="rollout.entropy_k=0"):
        RolloutConfig(entropy="topk", entropy_k=0)


@pytest.mark.parametrize("seed", [0, 4])
def test_per_rollout_selection_is_each_rows_own_top_b(seed):
    """``branch_selection = per_rollout`` (the paper): B branch points per row, each row ranked on its own; row i
    of group g fills slots ``i B .. i B + B - 1`` of g."""
    tokens, gen, entropy, lc, lb, groups, ng = _batch(seed)
    per, budget = len(groups) // ng, 3
    table = jnp.asarray(candidate_table_from_strings(TEXTS, SPECIAL))
    pts = choose_branch_points(_traj(tokens, gen, entropy, groups), jnp.asarray(lc), jnp.asarray(lb), table,
                               num_groups=ng, budget=budget, per_row=True)
    assert pts.rows.shape == (ng, per * budget)
    for row in range(len(groups)):
        one = choose_branch_points(_traj(tokens[row:row + 1], gen[row:row + 1], entropy[row:row + 1],
                                         np.zeros(1, np.int32)), jnp.asarray(lc[row:row + 1]),
                                   jnp.asarray(lb[row:row + 1]), table, num_groups=1, budget=budget)
        g, i = divmod(row, per)
        cols = slice(i * budget, (i + 1) * budget)
        valid = np.asarray(one.valid[0])
        assert (np.asarray(pts.valid[g, cols]) == valid).all()
        assert (np.asarray(pts.positions[g, cols])[valid] == np.asarray(one.positions[0])[valid]).all()
        assert (np.asarray(pts.rows[g, cols])[valid] == row).all()
