"""Decoder behaviour without external weights: KV-cache semantics against the uncached forward, RoPE variants
against transformers' formulas, remat / scan / dtype options, configs and presets."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appo_jax.models import (PRESETS, ModelConfig, forward, get_config, init_cache, init_params,
                             param_logical_axes, unembed)
from appo_jax.models.rope import rope_frequencies

fwd = jax.jit(forward, static_argnames=("config", "return_hidden"))
TINY = ("tiny-llama", "tiny-qwen2", "tiny-qwen3")


@functools.lru_cache(maxsize=None)
def _model(name):
    config = get_config(name)
    return config, init_params(config, jax.random.PRNGKey(7))


def _tokens(b, t, seed=0, vocab=256):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (b, t)), jnp.int32)


def _arange(b, t, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


# ------------------------------------------------------------------------------------------------ KV cache
# All cache tests use tiny-qwen3, batch 2, a 16-slot cache, chunk sizes in {1, 2, 3, 6} and uncached references of
# length REF_LEN (right-padded; causal attention makes the padding irrelevant), so jit compiles are shared.
REF_LEN = 12


def _reference(params, config, seqs):
    """Uncached logits of each row's own token list (no padding inside), as a list of [len, V] arrays."""
    tokens = np.zeros((2, REF_LEN), np.int32)
    mask = np.zeros((2, REF_LEN), bool)
    for r, seq in enumerate(seqs):
        tokens[r, :len(seq)] = seq
        mask[r, :len(seq)] = True
    out, _ = fwd(params, jnp.asarray(tokens), _arange(2, REF_LEN), config=config, token_mask=jnp.asarray(mask))
    return [np.asarray(out[r, :len(seq)]) for r, seq in enumerate(seqs)]


def test_prefill_then_decode_equals_uncached():
    config, params = _model("tiny-qwen3")
    tokens = _tokens(2, REF_LEN)
    full, _ = fwd(params, tokens, _arange(2, REF_LEN), config=config)
    cache = init_cache(config, 2, 16)
    pre, cache = fwd(params, tokens[:, :6], _arange(2, 6), config=config, cache=cache)
    np.testing.assert_allclose(pre, full[:, :6], atol=1e-5)
    np.testing.assert_array_equal(cache.end, [6, 6])
    for t in range(6, REF_LEN):
        step, cache = fwd(params, tokens[:, t:t + 1], _arange(2, 1, t), config=config, cache=cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
    np.testing.assert_array_equal(cache.end, [REF_LEN, REF_LEN])
    np.testing.assert_array_equal(cache.valid, np.arange(16)[None].repeat(2, 0) < REF_LEN)


def test_left_padded_prompts_and_per_row_ends():
    """Row 0: 3-token prompt left-padded to 6; row 1: 6 tokens. Then row 0 alone appends 2 tokens (row 1 idles
    with token_mask False, so its end stays) and both decode 3 steps: each row's logits equal that row's own
    unpadded sequence run without a cache."""
    config, params = _model("tiny-qwen3")
    prompt = np.asarray(_tokens(2, 6, seed=1))
    mask = np.array([[False] * 3 + [True] * 3, [True] * 6])
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = init_cache(config, 2, 16)
    logits, cache = fwd(params, jnp.asarray(prompt), jnp.asarray(positions), config=config,
                        token_mask=jnp.asarray(mask), cache=cache)
    np.testing.assert_array_equal(cache.end, [6, 6])
    np.testing.assert_array_equal(cache.valid[:, :6], mask)
    seqs = [list(prompt[0, 3:]), list(prompt[1])]
    outs = [[logits[0, 3:]], [logits[1]]]
    # Append two tokens to row 0 only (e.g. a tool result); row 1 does not move.
    extra = np.asarray(_tokens(2, 2, seed=2))
    logits, cache = fwd(params, jnp.asarray(extra), jnp.array([[3, 4], [0, 0]]), config=config,
                        token_mask=jnp.array([[True, True], [False, False]]), cache=cache)
    np.testing.assert_array_equal(cache.end, [8, 6])
    seqs[0] += list(extra[0])
    outs[0].append(logits[0])
    steps = np.asarray(_tokens(2, 3, seed=3))
    for k in range(3):
        pos = np.array([[len(seqs[0])], [len(seqs[1])]])
        logits, cache = fwd(params, jnp.asarray(steps[:, k:k + 1]), jnp.asarray(pos), config=config, cache=cache)
        for r in range(2):
            seqs[r].append(steps[r, k])
            outs[r].append(logits[r])
    np.testing.assert_array_equal(cache.end, [11, 9])
    for r, ref in enumerate(_reference(params, config, seqs)):
        np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outs[r]]), ref, atol=1e-5)


def test_reset_rows_starts_a_fresh_sequence():
    config, params = _model("tiny-qwen3")
    cache = init_cache(config, 2, 16)
    first = np.asarray(_tokens(2, 6, seed=4))
    _, cache = fwd(params, jnp.asarray(first), _arange(2, 6), config=config, cache=cache)
    cache = cache.reset_rows(jnp.array([True, False]))
    np.testing.assert_array_equal(cache.end, [0, 6])
    assert not cache.valid[0].any() and cache.valid[1, :6].all()
    new = np.asarray(_tokens(2, 3, seed=5))
    out, cache = fwd(params, jnp.asarray(new), jnp.array([[0, 1, 2], [6, 7, 8]]), config=config, cache=cache)
    np.testing.assert_array_equal(cache.end, [3, 9])
    refs = _reference(params, config, [list(new[0]), list(first[1]) + list(new[1])])
    np.testing.assert_allclose(out[0], refs[0], atol=1e-5)
    np.testing.assert_allclose(out[1], refs[1][6:], atol=1e-5)


@settings(max_examples=6)
@given(chunks=st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=4), pads=st.tuples(st.integers(0, 2),
                                                                                            st.integers(0, 2)))
def test_any_chunking_equals_uncached(chunks, pads):
    """Feeding left-padded rows (different pad per row) through the cache in arbitrary chunks gives the
    uncached logits of each row's real tokens."""
    config, params = _model("tiny-qwen3")
    total = sum(chunks)
    tokens = np.asarray(_tokens(2, total, seed=total))
    mask = np.arange(total)[None] >= np.minimum(np.array(pads), total - 1)[:, None]
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = init_cache(config, 2, 16)
    start, outs = 0, []
    for size in chunks:
        sl = slice(start, start + size)
        out, cache = fwd(params, jnp.asarray(tokens[:, sl]), jnp.asarray(positions[:, sl]), config=config,
                         token_mask=jnp.asarray(mask[:, sl]), cache=cache)
        outs.append(np.asarray(out))
        start += size
    got = np.concatenate(outs, axis=1)
    refs = _reference(params, config, [list(tokens[r][mask[r]]) for r in range(2)])
    for r in range(2):
        np.testing.assert_allclose(got[r][mask[r]], refs[r], atol=1e-5)


# ------------------------------------------------------------------------------------------------ options
def test_remat_scan_and_hidden_options_agree():
    config, params = _model("tiny-qwen2")
    tokens, positions = _tokens(2, 6), _arange(2, 6)

    def loss_and_grad(cfg):
        def loss(p):
            logits, _ = forward(p, tokens, positions, config=cfg)
            return jax.nn.log_softmax(logits).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grad = loss_and_grad(config)
    loss, grad = loss_and_grad(config.replace(remat_policy="full", scan_layers=False))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, ref_grad)
    hidden, _ = fwd(params, tokens, positions, config=config, return_hidden=True)
    logits, _ = fwd(params, tokens, positions, config=config)
    assert hidden.shape == (2, 6, config.hidden_size)
    np.testing.assert_allclose(unembed(params, hidden, config=config), logits, atol=1e-5)


def test_bfloat16_compute_and_params():
    config, params = _model("tiny-llama")
    tokens, positions = _tokens(2, 6), _arange(2, 6)
    ref, _ = fwd(params, tokens, positions, config=config)
    bf = config.replace(dtype="bfloat16")
    hidden, _ = fwd(params, tokens, positions, config=bf, return_hidden=True)
    assert hidden.dtype == jnp.bfloat16
    out = unembed(params, hidden, config=bf)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()
    cache = init_cache(bf, 2, 8)
    assert cache.k.dtype == jnp.bfloat16
    bf_params = jax.eval_shape(lambda: init_params(config.replace(param_dtype="bfloat16"), jax.random.PRNGKey(0)))
    assert {leaf.dtype for leaf in jax.tree.leaves(bf_params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name", TINY)
def test_param_logical_axes_match_params(name):
    config, params = _model(name)
    axes = param_logical_axes(config)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    jax.tree.map(lambda p, a: (len(a) == p.ndim) or pytest.fail(f"{a} vs {p.shape}"), params, axes)
    assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")


# ------------------------------------------------------------------------------------------------ RoPE
ROPE_CASES = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128, "beta_fast": 16,
     "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
]


@pytest.mark.parametrize("scaling", ROPE_CASES)
def test_rope_frequencies_match_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=50000.0,
                                  max_position_embeddings=2048,
                                  rope_scaling=None if scaling is None else dict(scaling))
    ours = ModelConfig.from_hf_dict(hf.to_dict())
    inv_freq, factor = rope_frequencies(ours)
    if scaling is None:
        expected = 1.0 / 50000.0 ** (np.arange(0, 128, 2) / 128)
        expected_factor = 1.0
    else:
        expected, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
        expected = expected.numpy()
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    assert factor == pytest.approx(expected_factor)


def test_unsupported_rope_type_is_rejected():
    with pytest.raises(NotImplementedError, match="dynamic"):
        get_config("tiny-llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_and_match_transformers_param_count(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = PRESETS[name]
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == config.num_params()


def test_known_preset_sizes():
    assert abs(PRESETS["smollm2-135m"].num_params() - 134.5e6) < 0.5e6
    assert abs(PRESETS["qwen2.5-0.5b"].num_params() - 494.0e6) < 1e6
    assert abs(PRESETS["llama3.1-8b"].num_params() - 8.03e9) < 0.01e9
    assert abs(PRESETS["qwen3-8b"].num_params() - 8.19e9) < 0.01e9


def test_config_is_hashable_and_validated():
    a = get_config("llama3.1-8b")
    b = a.replace(rope_scaling=dict(a.rope_scaling))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny-llama"):
        get_config("nope")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        get_config("tiny-llama", num_kv_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        get_config("tiny-llama", remat_policy="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        get_config("tiny-llama", dtype="float8")
    with pytest.raises(ValueError, match="batch > 0"):
        init_cache(get_config("tiny-llama"), 0, 4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_unstacked_layers_give_the_stacked_forward(name):
    """`unstack_layers`: leaf ``layers_i/...`` is ``layers/...[i]``, and the forward over the unstacked tree
    (one submodule per layer, no slicing of stacked weights) equals the scanned one, with and without a cache
    (prefill, then one decode step writing the same cache)."""
    from appo_jax.models.decoder import unstack_layers

    config, params = _model(name)
    flat = unstack_layers(params)
    assert "layers" not in flat and unstack_layers(flat) is flat
    for i in (0, config.num_layers - 1):
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), params["layers"], flat[f"layers_{i}"])
    tokens, positions = _tokens(2, 6), _arange(2, 6)
    want, _ = fwd(params, tokens, positions, config=config)
    got, _ = fwd(flat, tokens, positions, config=config)
    np.testing.assert_allclose(got, want, atol=2e-6)
    caches = []
    for p in (params, flat):
        _, cache = fwd(p, tokens[:, :5], positions[:, :5], config=config, cache=init_cache(config, 2, 8))
        logits, cache = fwd(p, tokens[:, 5:], positions[:, 5:], config=config, cache=cache)
        caches.append((logits, cache))
    np.testing.assert_allclose(caches[1][0], caches[0][0], atol=2e-6)
    np.testing.assert_allclose(caches[1][1].k, caches[0][1].k, atol=2e-6)
