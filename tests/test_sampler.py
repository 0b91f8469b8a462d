"""The jitted slot sampler and its token-selection math against independent references: a full (uncached)
forward pass of the same model, NumPy formulas for log-probs / entropy / the top-k and top-p sets, per-row runs
for batched ones, and empirical frequencies of many draws."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appo_jax.core.branching import token_entropy
from appo_jax.models.decoder import forward, init_params
from appo_jax.models.presets import get_config
from appo_jax.rollout.sampler import (CHUNK_EOS, CHUNK_LENGTH, CHUNK_RUNNING, CHUNK_STOP, Sampler, generate,
                                      prefill_pieces)
from appo_jax.rollout.sampling import SamplingParams, allowed_tokens, log_probs_and_entropy, select_tokens

REF_LEN = 96  # full-forward references are padded to this length (one compile)
SLOTS, MAX_LEN, CHUNK = 4, 96, 8


def _sharp_params(config, seed):
    """Random params with 8x layer matrices and a 30x final norm, so that the layers matter and next-token
    distributions range from peaked to flat (entropies ~0-3 nats over 256 tokens), unlike plain random init."""
    params = init_params(config, jax.random.PRNGKey(seed))
    params["layers"] = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 3 else x, params["layers"])
    params["norm"]["scale"] = params["norm"]["scale"] * 30.0
    return params


@functools.cache
def tiny(name: str):
    """(config, sharp params) of a tiny preset: tiny-llama (tied), tiny-qwen2 (qkv bias, untied head),
    tiny-qwen3 (q/k norm)."""
    config = get_config(name)
    return config, _sharp_params(config, 1)


@pytest.fixture(scope="module")
def llama():
    return tiny("tiny-llama")


@functools.partial(jax.jit, static_argnames=("config",))
def _full_logits(params, tokens, mask, *, config):
    logits, _ = forward(params, tokens, jnp.arange(REF_LEN)[None], config=config, token_mask=mask)
    return logits[0]


def ref_logits(config, params, seq) -> np.ndarray:
    """float64 logits [len(seq), V] of an uncached causal forward over seq (right-padded; causal => exact)."""
    assert len(seq) <= REF_LEN
    tokens = np.zeros((1, REF_LEN), np.int32)
    tokens[0, :len(seq)] = seq
    mask = np.arange(REF_LEN)[None] < len(seq)
    return np.asarray(_full_logits(params, jnp.asarray(tokens), jnp.asarray(mask), config=config),
                      np.float64)[:len(seq)]


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_entropy(z):
    lp = np_log_softmax(z)
    p = np.exp(lp)
    return -np.where(p > 0, p * np.where(p > 0, lp, 0.0), 0.0).sum(-1)


def np_allowed(z, top_k, top_p):
    """Reference allowed set from the definitions in appo_jax.rollout.sampling (explicit loops)."""
    allowed = np.ones(z.shape, bool)
    if 0 < top_k < z.size:
        kth = np.sort(z)[::-1][top_k - 1]
        allowed = z >= kth
    if top_p < 1:
        q = np.where(allowed, np.exp(z - z.max()), 0.0)
        q = q / q.sum()
        order = sorted(range(z.size), key=lambda v: -q[v])
        mass, threshold = 0.0, None
        for v in order:
            if mass < top_p:
                threshold = q[v]
                mass += q[v]
        allowed &= q >= threshold
    return allowed


def check_against_full_forward(config, params, seq, gen_start, token_ids, logprobs, entropies, temperature,
                               atol=1e-4):
    """The recorded log-probs / entropies of the tokens at seq[gen_start:] equal log_softmax(z / T) of a full
    forward at the preceding positions."""
    z = ref_logits(config, params, seq) / temperature
    rows = np.arange(gen_start - 1, gen_start - 1 + len(token_ids))
    assert list(seq[gen_start:gen_start + len(token_ids)]) == list(token_ids)
    np.testing.assert_allclose(logprobs, np_log_softmax(z[rows])[np.arange(len(rows)), token_ids], atol=atol)
    np.testing.assert_allclose(entropies, np_entropy(z[rows]), atol=atol)
    return z[rows]


def new_sampler(config, params, **kw):
    kw = {"num_slots": SLOTS, "max_len": MAX_LEN, "decode_chunk": CHUNK, "min_attention_window": 32, **kw}
    return Sampler(config, params, **kw)


def greedy_reference(config, params, prefix, n):
    seq = list(prefix)
    for _ in range(n):
        seq.append(int(np.argmax(ref_logits(config, params, seq)[-1])))
    return seq[len(prefix):]


# --------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name,sampling", [("tiny-llama", SamplingParams(1.0)),
                                           ("tiny-qwen3", SamplingParams(0.7, top_k=5)),
                                           ("tiny-qwen2", SamplingParams(1.3, top_p=0.8))])
def test_logprobs_and_entropies_equal_full_forward(name, sampling):
    config, params = tiny(name)
    prompts = [[1, 5, 9, 33], [1, 7], [1] + list(range(40, 60))]
    s = new_sampler(config, params, sampling=sampling, eos_token_ids=())
    s.start([2, 0, 3], prompts, [jax.random.key(i) for i in range(3)])
    out = s.decode(np.array([True, False, True, True]), 20)
    assert out.num_new.tolist() == [20, 0, 20, 20] and out.finish.tolist() == [CHUNK_RUNNING] * 4
    for slot, prompt in zip([2, 0, 3], prompts):
        seq = s.sequence(slot)
        assert seq[:len(prompt)] == prompt
        z = check_against_full_forward(config, params, seq, len(prompt), out.tokens[slot], out.logprobs[slot],
                                       out.entropies[slot], sampling.temperature)
        for row, tok in zip(z, out.tokens[slot]):
            assert np_allowed(row, sampling.top_k, sampling.top_p)[tok]


def test_greedy_equals_argmax_continuation():
    config, params = tiny("tiny-qwen2")
    prompt = [1, 17, 3, 99, 4]
    gens = generate(config, params, [prompt], max_new_tokens=24, key=jax.random.key(0),
                    sampling=SamplingParams(0.0), eos_token_ids=())
    g = gens[0]
    assert g.token_ids == greedy_reference(config, params, prompt, 24)
    assert g.finish_reason == "length"
    # greedy records the T = 1 distribution
    check_against_full_forward(config, params, prompt + g.token_ids, len(prompt), g.token_ids, g.logprobs,
                               g.entropies, 1.0)


def test_resume_from_prefix_equals_from_scratch(llama):
    config, params = llama
    prompt = [1, 8, 21, 7]
    key = jax.random.key(42)
    s = new_sampler(config, params, eos_token_ids=())
    s.start([0], [prompt], [key])
    full = s.decode(np.array([True, False, False, False]), 19)  # 19 = 2 chunks + 3: chunking must not matter
    gen = full.tokens[0, :19].tolist()
    for k in (1, 6, 11):
        # another slot, other slots busy: a slot's randomness depends only on its key and its context length
        s.start([3, 1], [prompt + gen[:k], [1, 2, 3]], [key, jax.random.key(7)])
        rest = s.decode(np.array([False, True, False, True]), 19 - k)
        assert rest.tokens[3, :19 - k].tolist() == gen[k:]
        np.testing.assert_allclose(rest.logprobs[3, :19 - k], full.logprobs[0, k:19], atol=1e-4)
        np.testing.assert_allclose(rest.entropies[3, :19 - k], full.entropies[0, k:19], atol=1e-4)


def test_appended_tokens_are_in_the_cache(llama):
    config, params = llama
    prompt = [1, 30, 31, 32]
    s = new_sampler(config, params, sampling=SamplingParams(0.9), eos_token_ids=())
    s.start([1, 2], [prompt, [1, 2]], [jax.random.key(3), jax.random.key(4)])
    first = s.decode(np.array([False, True, True, False]), 5)
    tool = [200, 201, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # > one 16-token piece
    s.append([1], [tool])
    assert s.sequence(1) == prompt + first.tokens[1, :5].tolist() + tool
    second = s.decode(np.array([False, True, True, False]), 7)
    seq = s.sequence(1)
    start = len(prompt) + 5 + len(tool)
    check_against_full_forward(config, params, seq, start, second.tokens[1, :7], second.logprobs[1, :7],
                               second.entropies[1, :7], 0.9)
    # the cache holds exactly the real tokens seq[:-1]; the untouched slot 2 kept its own state
    assert int(np.asarray(s.cache.valid[1]).sum()) == len(seq) - 1
    seq2 = s.sequence(2)
    assert len(seq2) == 2 + 12
    check_against_full_forward(config, params, seq2, 2, seq2[2:], np.concatenate(
        [first.logprobs[2, :5], second.logprobs[2, :7]]), np.concatenate(
        [first.entropies[2, :5], second.entropies[2, :7]]), 0.9)


def test_attention_window_leaves_long_rows_intact(llama):
    """Calls that attend over a window of the first W < max_len slots neither read nor clobber rows that
    extend past W, and those rows continue exactly."""
    config, params = llama
    s = new_sampler(config, params, sampling=SamplingParams(0.8), eos_token_ids=(), min_attention_window=16)
    long_prompt = [1] + list(range(100, 160))
    s.start([0], [long_prompt], [jax.random.key(0)])  # end 64: beyond the 16- and 32-slot windows
    s.decode(np.array([True, False, False, False]), 4)
    before = jax.tree.map(lambda x: np.asarray(x)[..., 0, :, :, :] if x.ndim == 5 else np.asarray(x)[0],
                          s.cache)
    s.start([1, 2], [[1, 2, 3], [1, 9]], [jax.random.key(1), jax.random.key(2)])  # gathered-rows prefill
    s.decode(np.array([False, True, True, False]), 9)  # window 16 / 32
    s.append([2], [[5, 6, 7]])
    after = jax.tree.map(lambda x: np.asarray(x)[..., 0, :, :, :] if x.ndim == 5 else np.asarray(x)[0], s.cache)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    out = s.decode(np.array([True, True, True, False]), 6)
    for slot in range(3):
        seq = s.sequence(slot)
        n = int(out.num_new[slot])
        check_against_full_forward(config, params, seq, len(seq) - n, out.tokens[slot, :n],
                                   out.logprobs[slot, :n], out.entropies[slot, :n], 0.8)


def test_left_padded_batch_equals_rows_alone(llama):
    config, params = llama
    prompts = [[1, 4, 5], [1] + list(range(60, 80)), [1, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    keys = [jax.random.key(5 + i) for i in range(3)]
    s = new_sampler(config, params, eos_token_ids=())
    s.start([0, 1, 2], prompts, keys)  # one batched prefill, rows left-padded to a common length
    batch = s.decode(np.array([True, True, True, False]), 12)
    for i, p in enumerate(prompts):
        s.start([3], [p], [keys[i]])  # the same prompt alone: its own prefill, decoded with the others idle
        alone = s.decode(np.array([False, False, False, True]), 12)
        assert batch.tokens[i].tolist() == alone.tokens[3].tolist()
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[3], atol=1e-4)
        np.testing.assert_allclose(batch.entropies[i], alone.entropies[3], atol=1e-4)


def test_eos_finish(llama):
    config, params = llama
    prompt = [1, 50, 51]
    ref = greedy_reference(config, params, prompt, 20)
    first = next(i for i in range(3, 20) if ref[i] not in ref[:i])  # an EOS id first produced at step >= 3
    eos = ref[first]
    s = new_sampler(config, params, sampling=SamplingParams(0.0), eos_token_ids=(eos,))
    s.start([0, 1], [prompt, prompt], [jax.random.key(0)] * 2)
    out = s.decode(np.array([True, True, False, False]), np.array([20, first, 1, 1]))
    assert out.finish[0] == CHUNK_EOS and out.tokens[0, :out.num_new[0]].tolist() == ref[:first + 1]
    assert out.finish[1] == CHUNK_RUNNING and out.num_new[1] == first  # max_new reached before the EOS
    gens = generate(config, params, [prompt], max_new_tokens=20, key=jax.random.key(0),
                    sampling=SamplingParams(0.0), eos_token_ids=(eos,))
    assert gens[0].finish_reason == "eos" and gens[0].token_ids == ref[:first + 1]


def _detok(ids):
    """Two characters per token, so stop strings can span token boundaries."""
    return "".join(chr(97 + i % 26) + chr(65 + (i // 26) % 26) for i in ids)


def test_stop_string_spanning_tokens_rolls_back_the_cache(llama):
    config, params = llama
    prompt = [1, 70, 71, 72, 73]
    ref = greedy_reference(config, params, prompt, 40)
    text = _detok(ref)
    # a stop string made of the last char of token 9 and the first two of tokens 10, 11 (3 tokens)
    stop = text[19:23]
    keep = next(j for j in range(1, 41) if stop in _detok(ref[:j]))
    assert keep >= 3 and keep % CHUNK != 0  # completed mid-chunk: overshoot tokens must be rolled back
    s = new_sampler(config, params, sampling=SamplingParams(0.0), eos_token_ids=(), stop_strings=(stop,),
                    detokenize=_detok)
    s.start([2], [prompt], [jax.random.key(0)])
    out = s.decode(np.array([False, False, True, False]), 40)
    assert out.finish[2] == CHUNK_STOP and out.tokens[2, :out.num_new[2]].tolist() == ref[:keep]
    assert not out.tokens[2, out.num_new[2]:].any()
    assert s.sequence(2) == prompt + ref[:keep]
    # the cache was rolled back: continuing equals a greedy continuation of the truncated sequence
    assert int(np.asarray(s.cache.valid[2]).sum()) == len(prompt) + keep - 1
    assert int(s.cache.end[2]) == s.max_len - s.free_cache_slots(2)
    more = s.decode(np.array([False, False, True, False]), 6)  # the old stop string is not matched again
    assert more.tokens[2, :more.num_new[2]].tolist() == greedy_reference(config, params, prompt + ref[:keep],
                                                                        more.num_new[2])
    gens = generate(config, params, [prompt], max_new_tokens=40, key=jax.random.key(0),
                    sampling=SamplingParams(0.0), eos_token_ids=(), stop_strings=(stop,), detokenize=_detok)
    assert gens[0].finish_reason == "stop" and gens[0].token_ids == ref[:keep]


def test_full_cache_row_finishes_with_length(llama):
    config, params = llama
    s = Sampler(config, params, num_slots=2, max_len=24, decode_chunk=CHUNK, eos_token_ids=())
    s.start([0, 1], [[1, 2, 3], [1] * 10], [jax.random.key(0), jax.random.key(1)])
    # row 0 used 16 slots (one 16-token prefill piece), row 1 as well: 8 tokens fit
    out = s.decode(np.array([True, True]), 50)
    assert out.finish.tolist() == [CHUNK_LENGTH, CHUNK_LENGTH] and out.num_new.tolist() == [8, 8]
    again = s.decode(np.array([True, False]), 3)
    assert again.finish[0] == CHUNK_LENGTH and again.num_new[0] == 0
    with pytest.raises(ValueError, match="max_len=24"):
        s.append([0], [[5] * 30])
    with pytest.raises(ValueError, match="max_len=24"):
        s.start([1], [list(range(1, 40))], [jax.random.key(0)])


def test_truncated_sampling_stays_in_the_allowed_set(llama):
    """top-k then top-p at a high temperature (a wide distribution): every draw is in the reference set."""
    config, params = llama
    sampling = SamplingParams(2.0, top_k=20, top_p=0.7)
    s = new_sampler(config, params, sampling=sampling, eos_token_ids=())
    prompts = [[1, 3 + i, 90 + i] for i in range(SLOTS)]
    s.start(range(SLOTS), prompts, [jax.random.key(10 + i) for i in range(SLOTS)])
    out = s.decode(np.ones(SLOTS, bool), 24)
    for slot, prompt in enumerate(prompts):
        z = ref_logits(config, params, s.sequence(slot))[len(prompt) - 1:-1] / sampling.temperature
        for row, tok in zip(z, out.tokens[slot]):
            assert np_allowed(row, sampling.top_k, sampling.top_p)[tok]


def test_determinism(llama):
    config, params = llama
    prompts = [[1, 2, 3], [1, 4]]
    a = generate(config, params, prompts, max_new_tokens=10, key=jax.random.key(1), eos_token_ids=())
    b = generate(config, params, prompts, max_new_tokens=10, key=jax.random.key(1), eos_token_ids=())
    c = generate(config, params, prompts, max_new_tokens=10, key=jax.random.key(2), eos_token_ids=())
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert all(np.array_equal(x.logprobs, y.logprobs) for x, y in zip(a, b))
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_bad_input(llama):
    config, params = llama
    s = new_sampler(config, params)
    with pytest.raises(ValueError, match="never started"):
        s.append([0], [[1]])
    with pytest.raises(ValueError, match="empty"):
        s.start([0], [[]], [jax.random.key(0)])
    with pytest.raises(ValueError, match="outside"):
        s.start([0], [[1, config.vocab_size]], [jax.random.key(0)])
    with pytest.raises(ValueError, match="not in"):
        s.start([SLOTS], [[1]], [jax.random.key(0)])
    with pytest.raises(ValueError, match="detokenize"):
        new_sampler(config, params, stop_strings=("x",))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(1.0, top_p=0.0)


def test_prefill_pieces():
    assert prefill_pieces(0, 512) == []
    assert prefill_pieces(3, 512) == [16]
    assert prefill_pieces(17, 512) == [32]
    assert prefill_pieces(1030, 512) == [16, 512, 512]
    assert prefill_pieces(100, 64) == [64, 64]


# ------------------------------------------------------------------------------------------- token selection
@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from([5, 24, 3000]), top_k=st.integers(0, 30),
       top_p=st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.2, 1e-3]), scale=st.sampled_from([0.1, 1.0, 5.0]),
       ties=st.booleans())
def test_allowed_set_matches_reference(seed, vocab, top_k, top_p, scale, ties):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, vocab)) * scale
    if ties:
        z = np.round(z)  # many exact ties, also at the top-k / top-p boundaries
    z = z.astype(np.float32)
    log_p, _ = log_probs_and_entropy(jnp.asarray(z))
    got = np.asarray(allowed_tokens(log_p, top_k, top_p))
    for row_got, row in zip(got, np.asarray(log_p, np.float64)):
        want = np_allowed(row, top_k, top_p)
        if not np.array_equal(row_got, want):
            # only float32 rounding of cumulative mass exactly at p may differ from the float64 reference
            q = np.exp(row - row.max())
            q = np.where(np_allowed(row, top_k, 1.0), q, 0) / np.where(np_allowed(row, top_k, 1.0), q, 0).sum()
            diff = row_got != want
            boundary = np.array([abs(q[q > q[v]].sum() - top_p) < 1e-5 for v in np.flatnonzero(diff)])
            assert boundary.all()
        assert row_got.any()


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.3, 1.0, 1.7]))
def test_logprob_and_entropy_formula(seed, temperature):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(4, 64)) * 4).astype(np.float32)
    z[0, :10] = -np.inf  # masked vocabulary entries contribute 0
    log_p, ent = log_probs_and_entropy(jnp.asarray(z), temperature)
    np.testing.assert_allclose(np.asarray(log_p)[np.isfinite(z)],
                               np_log_softmax(z.astype(np.float64) / temperature)[np.isfinite(z)], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np_entropy(z.astype(np.float64) / temperature), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(token_entropy(jnp.asarray(z), temperature)), atol=1e-6)


def test_draws_follow_the_truncated_distribution():
    """Frequencies of 20k draws from fixed logits match softmax(z / T) renormalised over the allowed set (5 sigma,
    fixed keys: deterministic)."""
    z = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9], np.float32)
    n = 20000
    for params in (SamplingParams(1.0), SamplingParams(0.6, top_k=4), SamplingParams(1.4, top_p=0.7)):
        keys = jax.random.split(jax.random.key(0), n)
        tokens, logp, ent = jax.jit(select_tokens, static_argnums=2)(
            jnp.broadcast_to(jnp.asarray(z), (n, z.size)), keys, params)
        zt = z.astype(np.float64) / params.temperature
        allowed = np_allowed(zt, params.top_k, params.top_p)
        p = np.where(allowed, np.exp(zt - zt.max()), 0)
        p /= p.sum()
        freq = np.bincount(np.asarray(tokens), minlength=z.size) / n
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12), (params, freq, p)
        # recorded numbers refer to the untruncated softmax(z / T)
        np.testing.assert_allclose(np.asarray(logp), np_log_softmax(zt)[np.asarray(tokens)], atol=1e-5)
        np.testing.assert_allclose(np.asarray(ent), np_entropy(zt), atol=1e-5)


def test_greedy_takes_argmax_and_records_temperature_one():
    z = np.array([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]], np.float32)
    tokens, logp, ent = select_tokens(jnp.asarray(z), jax.random.split(jax.random.key(0), 2), SamplingParams(0.0))
    assert np.asarray(tokens).tolist() == [1, 0]
    np.testing.assert_allclose(np.asarray(logp), np_log_softmax(z.astype(np.float64))[[0, 1], [1, 0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent), np_entropy(z.astype(np.float64)), atol=1e-6)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), zero_frac=st.sampled_from([0.0, 0.5, 0.97]))
def test_inverse_cdf_and_greedy_match_numpy(seed, zero_frac):
    from appo_jax.rollout.sampling import greedy_tokens, inverse_cdf_tokens

    rng = np.random.default_rng(seed)
    w = rng.exponential(size=(6, 300)).astype(np.float32)  # 300: not a multiple of the 128-entry block
    w[rng.random(w.shape) < zero_frac] = 0.0
    w[:, rng.integers(300)] += 1e-3  # at least one positive entry per row
    u = rng.random(6).astype(np.float32)
    u[0] = 0.0
    got = np.asarray(inverse_cdf_tokens(jnp.asarray(w), jnp.asarray(u)))
    assert (w[np.arange(6), got] > 0).all()
    cum = np.cumsum(w.astype(np.float64), axis=-1)
    want = np.array([np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cum, u)])
    # equal unless u * total lies within float32 rounding of a boundary
    near = np.abs(cum[np.arange(6), np.minimum(want, got)] - u * cum[:, -1]) < 1e-4 * cum[:, -1]
    assert ((got == want) | near).all()
    z = np.round(rng.normal(size=(6, 300)) * 2).astype(np.float32)  # ties
    np.testing.assert_array_equal(np.asarray(greedy_tokens(jnp.asarray(z))), np.argmax(z, axis=-1))


def test_real_smollm2_greedy_and_logprobs():
    """The real SmolLM2-135M-Instruct (GGUF): greedy sampler tokens are the argmax continuation of a full forward
    and the recorded log-probs / entropies are the full forward's (49152-entry vocabulary)."""
    from appo_jax.models.loading import find_smollm2_gguf, load_model

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    config, params, tok = load_model(path)
    prompt = tok.encode("The capital of France is")
    (g,) = generate(config, params, [prompt], max_new_tokens=6, key=jax.random.key(0), sampling=SamplingParams(0.0))
    seq = prompt + g.token_ids
    logits, _ = jax.jit(forward, static_argnames="config")(params, jnp.asarray([seq]),
                                                          jnp.arange(len(seq))[None], config=config)
    z = np.asarray(logits[0], np.float64)[len(prompt) - 1:-1]
    assert g.token_ids == np.argmax(z, axis=-1).tolist()
    np.testing.assert_allclose(g.logprobs, np_log_softmax(z)[np.arange(6), g.token_ids], atol=1e-4)
    # cached decode vs one full forward in float32: logits agree to ~1e-5 relative, which moves an entropy of a few
    # nats by up to ~5e-4 on AVX2 CPUs (different accumulation order than AVX-512)
    np.testing.assert_allclose(g.entropies, np_entropy(z), rtol=2e-4, atol=1e-4)
    assert tok.decode(g.token_ids).startswith(" Paris")


def test_sharded_sampler_equals_unsharded(llama):
    """Params sharded over fsdp x tensor and the cache over data x fsdp rows on 8 fake devices give the same
    tokens and log-probs as one device."""
    from appo_jax.parallel.mesh import make_mesh
    from appo_jax.models.sharding import shard_params

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    config, params = llama
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    prompts = [[1, 2, 3], [1, 40, 41, 42, 43], [1, 7], [1, 99, 98]]
    kw = dict(max_new_tokens=10, key=jax.random.key(3), sampling=SamplingParams(0.9), eos_token_ids=())
    ref = generate(config, params, prompts, **kw)
    got = generate(config, shard_params(params, mesh, config), prompts, mesh=mesh, **kw)
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


# ------------------------------------------------------------------------------------------- repetition penalty
def np_repetition_penalty(logits, seq, penalty):
    """Reference: for each distinct token v of seq, l_v / r if l_v > 0 else l_v * r (explicit loop)."""
    out = np.array(logits, np.float64)
    for v in set(seq):
        out[v] = out[v] / penalty if out[v] > 0 else out[v] * penalty
    return out


def test_repetition_penalty_matches_transformers_processor():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    from appo_jax.rollout.sampling import apply_repetition_penalty

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 50)).astype(np.float32)
    ids = rng.integers(0, 50, (4, 12))
    seen = np.zeros((4, 50), bool)
    seen[np.arange(4)[:, None], ids] = True
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    for row in range(4):
        np.testing.assert_allclose(ours[row], np_repetition_penalty(logits[row], ids[row].tolist(), 1.3), rtol=1e-6)
    assert (ours != logits).any(axis=1).all()


@pytest.mark.parametrize("sampling", [SamplingParams(0.0, repetition_penalty=1.8),
                                      SamplingParams(0.8, repetition_penalty=1.3)])
def test_repetition_penalty_in_the_sampler_equals_reference(llama, sampling):
    """Every recorded token's log-prob / entropy is that of softmax(penalised logits / T) of a full forward, the
    penalty covering the whole sequence so far (prompt, generated and appended tokens); greedy picks the argmax
    of the penalised logits."""
    config, params = llama
    prompt = [1, 9, 9, 9, 40, 41, 40]
    s = new_sampler(config, params, sampling=sampling, eos_token_ids=())
    s.start([1, 3], [prompt, [1, 2]], [jax.random.key(5), jax.random.key(6)])
    first = s.decode(np.array([False, True, False, True]), 9)
    s.append([1], [[77, 78, 77]])
    second = s.decode(np.array([False, True, False, True]), 9)
    seq = s.sequence(1)
    gen_a, tool_at = first.tokens[1, :9].tolist(), len(prompt) + 9
    assert seq == prompt + gen_a + [77, 78, 77] + second.tokens[1, :9].tolist()
    z = ref_logits(config, params, seq)
    temperature = sampling.record_temperature
    steps = [(len(prompt) + i, first, i) for i in range(9)] + [(tool_at + 3 + i, second, i) for i in range(9)]
    effect = 0.0
    for pos, out, i in steps:
        penalised = np_repetition_penalty(z[pos - 1], seq[:pos], sampling.repetition_penalty) / temperature
        tok = seq[pos]
        effect = max(effect, abs(np_entropy(penalised) - np_entropy(z[pos - 1] / temperature)))
        assert out.tokens[1, i] == tok
        np.testing.assert_allclose(out.logprobs[1, i], np_log_softmax(penalised)[tok], atol=1e-4)
        np.testing.assert_allclose(out.entropies[1, i], np_entropy(penalised), atol=1e-4)
        if sampling.greedy:
            assert tok == int(np.argmax(penalised))
    assert effect > 1e-2  # the penalty really changed the recorded distributions


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1.1"])
def test_bad_repetition_penalty(bad):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=bad)


def test_decoding_a_few_slots_equals_decoding_them_with_all_slots_active(llama):
    """When at most half the slots run, only their cache rows are decoded (gathered, then scattered back): the
    tokens, log-probs and entropies equal a call where every slot runs, the idle slots' state is untouched, and
    decoding every slot afterwards continues all of them exactly (repetition penalty on: its seen-set is gathered
    too)."""
    config, params = llama
    sampling = SamplingParams(0.9, repetition_penalty=1.2)
    prompts = [[1, 5 + i, 9, 9, 3 * i + 2] for i in range(8)]
    keys = [jax.random.key(30 + i) for i in range(8)]
    few, every = (new_sampler(config, params, num_slots=8, sampling=sampling, eos_token_ids=()) for _ in range(2))
    for s in (few, every):
        s.start(list(range(8)), prompts, keys)
    picked = np.zeros(8, bool)
    picked[[2, 6]] = True
    before = jax.tree.map(np.asarray, few.cache)
    a = few.decode(picked, 11)     # 2 of 8 running: a gathered batch of 2 rows
    b = every.decode(picked, 11)   # compare with the same slots decoded ...
    c = new_sampler(config, params, num_slots=8, sampling=sampling, eos_token_ids=())
    c.start(list(range(8)), prompts, keys)
    full = c.decode(np.ones(8, bool), 11)  # ... and with every slot running (all rows)
    for out in (b, full):
        np.testing.assert_array_equal(a.tokens[picked], out.tokens[picked])
        np.testing.assert_allclose(a.logprobs[picked], out.logprobs[picked], atol=1e-5)
        np.testing.assert_allclose(a.entropies[picked], out.entropies[picked], atol=1e-5)
    after = jax.tree.map(np.asarray, few.cache)
    idle = ~picked
    np.testing.assert_array_equal(after.k[:, idle], before.k[:, idle])
    np.testing.assert_array_equal(after.valid[idle], before.valid[idle])
    np.testing.assert_array_equal(after.end[idle], before.end[idle])
    assert (after.end[picked] == before.end[picked] + 11).all()
    rest_few, rest_every = few.decode(np.ones(8, bool), 7), every.decode(np.ones(8, bool), 7)
    np.testing.assert_array_equal(rest_few.tokens, rest_every.tokens)
    np.testing.assert_allclose(rest_few.logprobs, rest_every.logprobs, atol=1e-5)
    assert [few.sequence(s) for s in range(8)] == [every.sequence(s) for s in range(8)]


def test_decode_sampling_override_equals_a_sampler_built_with_it(llama):
    """``decode(..., sampling=p)`` equals decode from a Sampler built with ``p`` (tokens, log-probs, entropies),
    also when the override has a repetition penalty; the sampler's own setting is used again without one."""
    config, params = llama
    prompts = [[1, 5, 9, 9], [1, 7, 3], [1, 40, 41, 42, 43], [1, 2]]
    keys = [jax.random.key(50 + i) for i in range(4)]
    active = np.array([True, False, True, True])
    for override in (SamplingParams(0.8, top_p=0.9), SamplingParams(0.0, repetition_penalty=1.3)):
        base, built = new_sampler(config, params, eos_token_ids=()), new_sampler(config, params, sampling=override,
                                                                                  eos_token_ids=())
        for s in (base, built):
            s.start(list(range(4)), prompts, keys)
        a, b = base.decode(active, 13, sampling=override), built.decode(active, 13)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.entropies, b.entropies)
        # then its own setting again: equal to a default Sampler resumed from the same sequences and keys
        resumed = new_sampler(config, params, eos_token_ids=())
        resumed.start(list(range(4)), [base.sequence(i) for i in range(4)], keys)
        np.testing.assert_array_equal(base.decode(active, 5).tokens, resumed.decode(active, 5).tokens)
    with pytest.raises(ValueError, match="SamplingParams"):
        base.decode(active, 1, sampling={"temperature": 0.5})


def np_topk_entropy(z, tokens, k, mode):
    """Slow reference of `topk_entropy` from logits z [B, V] (sorting each row; ties -> lower id)."""
    out = []
    for row, a in zip(z.astype(np.float64), tokens):
        lp = np_log_softmax(row)
        top = sorted(range(row.size), key=lambda v: (-lp[v], v))[:k]
        if mode == "topk":
            q = np.exp(lp[top]) / np.exp(lp[top]).sum()
            out.append(-sum(x * np.log(x) for x in q if x > 0))
        else:
            keep = set(top) | {int(a)}
            out.append(-sum(np.exp(lp[v]) * lp[v] for v in keep if np.isfinite(lp[v])))
    return np.array(out)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 3, 10, 64]),
       mode=st.sampled_from(["topk", "official_topk"]), temperature=st.sampled_from([0.7, 1.0]))
def test_topk_entropy_matches_reference(seed, k, mode, temperature):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(6, 64)) * 3).astype(np.float32)
    z[0, :5] = -np.inf
    params = SamplingParams(temperature, entropy=mode, entropy_k=k)
    tokens, logp, ent = jax.jit(select_tokens, static_argnums=2)(
        jnp.asarray(z), jax.random.split(jax.random.key(seed % 1000), 6), params)
    want = np_topk_entropy(z / temperature, np.asarray(tokens), k, mode)
    np.testing.assert_allclose(np.asarray(ent), want, atol=1e-5)
    exact = np_entropy(z.astype(np.float64) / temperature)
    if mode == "official_topk":
        assert (np.asarray(ent) <= exact + 1e-5).all()  # a partial sum of the exact entropy's terms
    if k == 64 and mode == "topk":
        np.testing.assert_allclose(np.asarray(ent), exact, atol=1e-5)  # the whole vocabulary: exact
    # the behaviour log-prob does not depend on the entropy mode
    np.testing.assert_allclose(np.asarray(logp), np_log_softmax(z.astype(np.float64) / temperature)[
        np.arange(6), np.asarray(tokens)], atol=1e-5)


def test_topk_entropy_in_the_sampler_equals_full_forward():
    config, params = tiny("tiny-llama")
    sampling = SamplingParams(1.0, entropy="topk", entropy_k=5)
    s = new_sampler(config, params, sampling=sampling, eos_token_ids=())
    prompt = [1, 5, 9, 33]
    s.start([0], [prompt], [jax.random.key(3)])
    out = s.decode(np.array([True, False, False, False]), 12)
    seq = s.sequence(0)
    z = ref_logits(config, params, seq)[len(prompt) - 1:len(prompt) - 1 + 12]
    np.testing.assert_allclose(out.entropies[0][:12], np_topk_entropy(z, out.tokens[0][:12], 5, "topk"), atol=2e-4)


def test_bad_entropy_settings():
    with pytest.raises(ValueError, match="entropy must be one of"):
        SamplingParams(1.0, entropy="approx")
    with pytest.raises(ValueError, match="entropy_k"):
        SamplingParams(1.0, entropy="topk", entropy_k=0)
    with pytest.raises(ValueError, match="entropy_k=99"):
        select_tokens(jnp.zeros((1, 8)), jax.random.split(jax.random.key(0), 1),
                      SamplingParams(1.0, entropy="topk", entropy_k=99))


@pytest.mark.parametrize("sampling", [SamplingParams(0.0), SamplingParams(1.0)])
def test_fork_from_a_snapshot_equals_a_reprefilled_start(llama, sampling):
    """A branch forked from its parent's KV row (copied from a snapshot taken before the slot was reused) samples
    the same tokens as one started by prefilling the same prefix with the same key, log-probs within 1e-5; through
    an appended tool result too."""
    config, params = llama
    prompt, key = [1, 8, 21, 7], jax.random.key(5)
    s = new_sampler(config, params, sampling=sampling, eos_token_ids=())
    s.start([0], [prompt], [key])
    s.decode(np.array([True, False, False, False]), 9)
    s.append([0], [[40, 41, 42]])  # a tool result inside the prefix
    s.decode(np.array([True, False, False, False]), 6)
    parent = s.sequence(0)
    snap = s.snapshot()
    s.start([0], [[1, 2, 3]], [jax.random.key(9)])  # the parent's slot is reused after the snapshot
    for k in (len(prompt) + 2, len(prompt) + 11, len(parent) - 1):
        prefix = parent[:k]
        s.fork([1], snap, [0], [prefix], [key])
        s.start([2], [prefix], [key])
        out = s.decode(np.array([False, True, True, False]), 12)
        assert out.tokens[1].tolist() == out.tokens[2].tolist()
        np.testing.assert_allclose(out.logprobs[1], out.logprobs[2], atol=1e-5)
        np.testing.assert_allclose(out.entropies[1], out.entropies[2], atol=1e-5)
        assert s.sequence(1) == s.sequence(2)
    with pytest.raises(ValueError, match="row 0, which holds .*past the row's end"):
        s.fork([1], snap, [0], [parent + [5, 6]], [key])
    with pytest.raises(ValueError, match=r"differ at position 5\): its slot was reused"):
        s.fork([1], snap, [0], [parent[:5] + [99] + parent[6:9]], [key])
    with pytest.raises(ValueError, match="row 3 of the snapshot holds no sequence"):
        s.fork([1], snap, [3], [prompt], [key])
    s.set_params(jax.tree.map(lambda x: x * 1.0, params))
    with pytest.raises(ValueError, match="other weights"):
        s.fork([1], snap, [0], [prompt], [key])


def test_fork_within_the_live_cache_equals_a_reprefilled_start(llama):
    """`Sampler.live` (no copy): a slot forked from a row that is still running (ARPO's copy after a tool result)
    samples what a slot started by prefilling the same prefix samples, and the source row goes on unchanged;
    a fork into the source row's own slot truncates it to the prefix; a view older than the last cache change is
    refused."""
    config, params = llama
    prompt, key = [1, 8, 21, 7], jax.random.key(5)
    s = new_sampler(config, params, sampling=SamplingParams(1.0), eos_token_ids=())
    s.start([0], [prompt], [key])
    s.decode(np.array([True, False, False, False]), 7)
    s.append([0], [[40, 41, 42]])
    s.decode(np.array([True, False, False, False]), 5)
    parent = s.sequence(0)
    prefix = parent[:len(prompt) + 10]  # ends with the tool result's last token
    view = s.live()
    s.fork([1], view, [0], [prefix], [key])
    s.start([2], [prefix], [key])
    out = s.decode(np.array([True, True, True, False]), 8)
    assert out.tokens[1].tolist() == out.tokens[2].tolist()
    np.testing.assert_allclose(out.logprobs[1], out.logprobs[2], atol=1e-5)
    alone = new_sampler(config, params, sampling=SamplingParams(1.0), eos_token_ids=())
    alone.start([0], [prompt], [key])
    alone.decode(np.array([True, False, False, False]), 7)
    alone.append([0], [[40, 41, 42]])
    alone.decode(np.array([True, False, False, False]), 13)
    assert s.sequence(0) == alone.sequence(0)  # the source row was only read
    with pytest.raises(ValueError, match="live view is stale"):
        s.fork([3], view, [0], [prefix], [key])
    s.fork([0], s.live(), [0], [prefix], [key])  # into its own slot: the row keeps the prefix only
    s.start([3], [prefix], [key])
    out = s.decode(np.array([True, False, False, True]), 6)
    assert out.tokens[0].tolist() == out.tokens[3].tolist()


def test_forks_on_a_sharded_cache_equal_a_one_device_start(llama):
    """On 8 fake devices (params over fsdp x tensor, cache rows over data x fsdp): a fork from a snapshot and one
    within the live cache sample what a one-device sampler started by prefilling the same prefix samples, and
    the cache keeps its sharding."""
    from appo_jax.models.sharding import shard_params
    from appo_jax.parallel.mesh import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    config, params = llama
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    prompt, key, sampling = [1, 8, 21, 7], jax.random.key(5), SamplingParams(0.9)
    s = new_sampler(config, shard_params(params, mesh, config), sampling=sampling, eos_token_ids=(), mesh=mesh)
    s.start([0], [prompt], [key])
    s.decode(np.array([True, False, False, False]), 7)
    s.append([0], [[40, 41, 42]])
    s.decode(np.array([True, False, False, False]), 4)
    prefix = s.sequence(0)[:len(prompt) + 9]
    shardings = jax.tree.map(lambda x: x.sharding, s.cache)
    snap = s.snapshot()
    s.start([1], [[1, 2, 3]], [key])
    s.fork([2], snap, [0], [prefix], [key])
    s.fork([3], s.live(), [0], [prefix], [key])
    got = s.decode(np.array([False, False, True, True]), 8)
    assert jax.tree.map(lambda x: x.sharding, s.cache) == shardings
    one = new_sampler(config, params, sampling=sampling, eos_token_ids=())
    one.start([0], [prefix], [key])
    want = one.decode(np.array([True, False, False, False]), 8)
    for row in (2, 3):
        assert got.tokens[row].tolist() == want.tokens[0].tolist()
        np.testing.assert_allclose(got.logprobs[row], want.logprobs[0], atol=1e-4)


def test_unstacked_weights_sample_what_stacked_ones_do(llama):
    """``Sampler(unstack_weights=True)`` (one weight subtree per layer) samples the tokens the default sampler
    samples, log-probs within 1e-5, through a prefill, an append and two decode chunks."""
    config, params = llama
    outs = []
    for unstack in (False, True):
        s = new_sampler(config, params, sampling=SamplingParams(1.0), eos_token_ids=(), unstack_weights=unstack)
        s.start([0, 1], [[1, 8, 21, 7], [1, 5]], [jax.random.key(1), jax.random.key(2)])
        a = s.decode(np.array([True, True, False, False]), 5)
        s.append([0], [[40, 41]])
        b = s.decode(np.array([True, True, False, False]), 6)
        outs.append((a, b, "layers" in s.params))
    (a0, b0, stacked0), (a1, b1, stacked1) = outs
    assert stacked0 and not stacked1
    for x, y in ((a0, a1), (b0, b1)):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
