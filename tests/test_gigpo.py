"""GiGPO (appo_jax/core/gigpo.py) against a slow loop that groups steps by their literal observation history."""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appo_jax.core.advantages import compute_advantages
from appo_jax.core.gigpo import observation_hashes


def ref_gigpo(r, g, gen, obs, tok, ng, valid, gamma, omega):
    n, L = gen.shape
    ok = [bool(valid[i]) and 0 <= g[i] < ng and math.isfinite(r[i]) for i in range(n)]
    # episode level: GRPO over the prompt group
    ep = np.zeros(n)
    for k in range(ng):
        members = [i for i in range(n) if ok[i] and g[i] == k]
        if len(members) > 1:
            mu = sum(r[i] for i in members) / len(members)
            sd = math.sqrt(sum((r[i] - mu) ** 2 for i in members) / len(members))
            for i in members:
                ep[i] = (r[i] - mu) / (sd + 1e-6)
    # step level: a step is the generated tokens between two observations (a gap that is not an observation does
    # not split it); its anchor is (group, observations seen so far)
    steps = []  # (row, k, anchor, positions)
    for i in range(n):
        if not ok[i]:
            continue
        history, span, rows_steps = [], None, []
        for t in range(L):
            if obs[i, t]:
                if span is None:
                    span = []
                    history.append(span)
                span.append(int(tok[i, t]))
            else:
                span = None
            if gen[i, t]:
                if not rows_steps or rows_steps[-1][0] != len(history):
                    rows_steps.append([len(history), (int(g[i]), tuple(tuple(s) for s in history)), []])
                rows_steps[-1][2].append(t)
        last = max((s[0] for s in rows_steps), default=0)
        for k, anchor, pos in rows_steps:
            steps.append((i, r[i] * gamma ** (last - k), anchor, pos))
    out = np.where(gen & np.array(ok)[:, None], ep[:, None], 0.0)
    groups = {}
    for s in steps:
        groups.setdefault(s[2], []).append(s)
    for members in groups.values():
        if len(members) < 2:
            continue
        vals = [m[1] for m in members]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
        for i, ret, _, pos in members:
            for t in pos:
                out[i, t] += omega * (ret - mu) / (sd + 1e-6)
    return out


def random_agent_batch(seed, n, L, ng):
    """Rows of alternating generated runs and short observations drawn from a 2-token vocabulary, so that
    identical observation histories (shared anchor states) are common; about one generated token in eight is
    masked out (neither generated nor observation: a gap inside a step)."""
    rng = np.random.default_rng(seed)
    gen, obs = np.zeros((n, L), bool), np.zeros((n, L), bool)
    tok = rng.integers(0, 50, (n, L)).astype(np.int32)
    for i in range(n):
        t = 0
        while t < L:
            run = int(rng.integers(1, 4))
            gen[i, t:t + run] = True
            t += run
            if t < L and rng.random() < 0.6:
                span = min(int(rng.integers(1, 3)), L - t)
                obs[i, t:t + span] = True
                tok[i, t:t + span] = rng.integers(5, 7, span)
                t += span
        end = int(rng.integers(L // 2, L + 1))
        gen[i, end:], obs[i, end:] = False, False
    gen &= rng.random((n, L)) > 0.125
    r = rng.choice([0.0, 1.0, 0.5], n).astype(np.float32)
    g = rng.integers(0, ng, n).astype(np.int32)
    valid = rng.random(n) > 0.1
    return r, g, gen, obs, tok, valid


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(4, 8, 1), (6, 12, 2), (8, 16, 2)]), st.integers(0, 10_000),
       st.sampled_from([(0.95, 1.0), (1.0, 0.5)]))
def test_gigpo_matches_loop(size, seed, gamma_omega):
    n, L, ng = size
    gamma, omega = gamma_omega
    r, g, gen, obs, tok, valid = random_agent_batch(seed, n, L, ng)
    got = np.asarray(compute_advantages("gigpo", rewards=r, group_ids=g, gen_mask=gen, obs_mask=obs, tokens=tok,
                                        num_groups=ng, valid=valid, gigpo_gamma=gamma, gigpo_step_weight=omega))
    want = ref_gigpo(r.astype(float), g, gen, obs, tok, ng, valid, gamma, omega)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gigpo_step_groups_by_observation_history_hand_example():
    """Two rows of one prompt: the first steps share the prompt as anchor; after observation [5] both share it
    again; row 2's observation [6] is its own anchor (a singleton: step term 0)."""
    gen = np.array([[1, 1, 0, 1, 1, 0], [1, 1, 0, 1, 1, 0], [1, 1, 0, 1, 1, 0]], bool)
    obs = np.array([[0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]], bool)
    tok = np.array([[9, 9, 5, 9, 9, 0], [9, 9, 5, 9, 9, 0], [9, 9, 6, 9, 9, 0]], np.int32)
    r = np.array([1.0, 0.0, 1.0], np.float32)
    g = np.zeros(3, np.int32)
    got = np.asarray(compute_advantages("gigpo", rewards=r, group_ids=g, gen_mask=gen, obs_mask=obs, tokens=tok,
                                        num_groups=1, gigpo_gamma=0.5, gigpo_step_weight=1.0))
    ep = (r - r.mean()) / (r.std() + 1e-6)
    first = np.array([0.5, 0.0, 0.5])  # R * 0.5^(2 - 1 - 0)
    z_first = (first - first.mean()) / (first.std() + 1e-6)
    z_second = np.array([1.0, -1.0, 0.0]) * (0.5 / (0.5 + 1e-6))  # rows 0, 1 share [5]; row 2 alone
    np.testing.assert_allclose(got[:, 0], ep + z_first, rtol=1e-5)
    np.testing.assert_allclose(got[:, 3], ep + z_second, rtol=1e-5)
    assert (got[:, [2, 5]] == 0).all()  # observation and padding tokens


def test_a_gap_that_is_not_an_observation_does_not_split_a_step():
    """Row 0's first step is interrupted at position 1 by a token that is neither generated nor observation: it is
    still one step, one member of the anchor group (prompt, no observation) with row 1's first step, and both of
    its tokens take its value."""
    gen = np.array([[1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 1, 1]], bool)
    obs = np.array([[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]], bool)
    tok = np.array([[9, 0, 9, 5, 9, 9], [9, 9, 9, 5, 9, 9]], np.int32)
    r = np.array([1.0, 0.0], np.float32)
    g = np.zeros(2, np.int32)
    got = np.asarray(compute_advantages("gigpo", rewards=r, group_ids=g, gen_mask=gen, obs_mask=obs, tokens=tok,
                                        num_groups=1, gigpo_gamma=0.5, gigpo_step_weight=1.0))
    ep = np.array([1.0, -1.0]) * (0.5 / (0.5 + 1e-6))
    z_first = np.array([1.0, -1.0]) * (0.25 / (0.25 + 1e-6))  # returns R * 0.5 = [0.5, 0]: two members, not three
    z_second = np.array([1.0, -1.0]) * (0.5 / (0.5 + 1e-6))  # returns R = [1, 0]
    np.testing.assert_allclose(got[0, [0, 2]], ep[0] + z_first[0], rtol=1e-5)
    np.testing.assert_allclose(got[1, :3], ep[1] + z_first[1], rtol=1e-5)
    np.testing.assert_allclose(got[:, 4:], (ep + z_second)[:, None] * np.ones((1, 2)), rtol=1e-5)
    assert got[0, 1] == 0 and (got[:, 3] == 0).all()  # the gap and the observation
    want = ref_gigpo(r.astype(float), g, gen, obs, tok, 1, np.ones(2, bool), 0.5, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gigpo_under_x64_warns_nothing_and_matches_float32():
    """Under ``jax_enable_x64`` (int64 defaults) no dtype warning is raised (e.g. int64 written into int32, which
    future JAX makes an error) and the result equals the default (32-bit) one."""
    r, g, gen, obs, tok, valid = random_agent_batch(3, 6, 12, 2)
    fields = dict(rewards=r, group_ids=g, gen_mask=gen, obs_mask=obs, tokens=tok, num_groups=2, valid=valid)
    want = np.asarray(compute_advantages("gigpo", **fields))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with jax.enable_x64(True):
            got = np.asarray(compute_advantages("gigpo", **fields))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_observation_hash_depends_on_content_order_and_span_boundaries():
    obs = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0]], bool)
    tok = np.array([[5, 6, 0], [6, 5, 0], [5, 0, 6], [1, 2, 3]], np.int32)
    h = np.asarray(observation_hashes(jnp.asarray(tok), jnp.asarray(obs)))
    assert h.dtype == np.uint32
    assert len({int(h[0, 2]), int(h[1, 2]), int(h[2, 2])}) == 3  # [5, 6] vs [6, 5] vs [5] [6]
    assert (h[3] == 0).all()  # no observation: the empty history


def test_gigpo_needs_observations():
    with pytest.raises(ValueError, match="obs_mask and tokens"):
        compute_advantages("gigpo", rewards=np.zeros(2, np.float32), group_ids=np.zeros(2, np.int32),
                           gen_mask=np.ones((2, 3), bool), num_groups=1)
