"""Chunked log-prob recomputation vs the full-logits log_softmax of the decoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from appo_jax.core.branching import token_entropy
from appo_jax.models import decoder
from appo_jax.models.decoder import init_params
from appo_jax.models.presets import get_config
from appo_jax.models import logprobs

# jitted once per shape: eager op-by-op execution of the scanned decoder is far slower than one compile
forward = jax.jit(decoder.forward, static_argnames=("config", "return_hidden"))
token_logprobs = jax.jit(logprobs.token_logprobs, static_argnames=("config", "chunk", "temperature", "with_entropy"))
model_inputs = logprobs.model_inputs

P, L, N = 5, 11, 3


def _batch(seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, vocab, (N, P)).astype(np.int32)
    pmask = np.ones((N, P), bool)
    pmask[0, :2] = False  # left padding
    pmask[2, :4] = False
    tokens = rng.integers(3, vocab, (N, L)).astype(np.int32)
    rmask = np.ones((N, L), bool)
    rmask[1, 7:] = False  # a shorter response
    return prompt, pmask, tokens, rmask


def _reference(params, cfg, prompt, pmask, tokens, rmask, temperature=1.0):
    """Independent reference: each row's real tokens (prompt padding dropped) start at position 0, rows are
    right-padded to one length (causal attention: padding after a token never affects it), one full-vocabulary
    forward, log_softmax in float64."""
    seqs = [np.concatenate([prompt[i][pmask[i]], tokens[i]]) for i in range(N)]
    width = max(len(x) for x in seqs)
    ids = np.zeros((N, width), np.int32)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = x
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), (N, width))
    logits, _ = forward(params, jnp.asarray(ids), jnp.asarray(pos), config=cfg)
    logits = np.asarray(logits, np.float64) / temperature
    lps = np.zeros((N, L))
    ents = np.zeros((N, L))
    for i in range(N):
        start = pmask[i].sum() - 1
        rows = logits[i, start:start + L]
        lse = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
        lps[i] = rows[np.arange(L), tokens[i]] - lse
        p = np.exp(rows - lse[:, None])
        ents[i] = -(p * (rows - lse[:, None])).sum(-1)
    return lps, ents


@pytest.mark.parametrize("preset,chunk,temperature", [("tiny-llama", 4, 1.0), ("tiny-qwen2", 64, 0.7)])
def test_chunked_logprobs_match_full_logits(preset, chunk, temperature):
    cfg = get_config(preset)
    params = init_params(cfg, jax.random.PRNGKey(1))
    batch = _batch()
    lp, ent = token_logprobs(params, *batch, config=cfg, chunk=chunk, temperature=temperature, with_entropy=True)
    ref_lp, ref_ent = _reference(params, cfg, *batch, temperature=temperature)
    rmask = batch[3]
    np.testing.assert_allclose(np.asarray(lp)[rmask], ref_lp[rmask], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[rmask], ref_ent[rmask], atol=2e-5, rtol=1e-5)


def test_gradient_matches_full_logits_and_entropy_matches_core():
    cfg = get_config("tiny-llama")
    params = init_params(cfg, jax.random.PRNGKey(2))
    prompt, pmask, tokens, rmask = _batch(3)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(N, L)).astype(np.float32)) * rmask

    def chunked(p):
        lp, _ = token_logprobs(p, prompt, pmask, tokens, rmask, config=cfg, chunk=3)
        return jnp.sum(lp * w)

    def full(p):
        ids, mask, pos = model_inputs(prompt, pmask, tokens, rmask)
        logits, _ = forward(p, ids, pos, config=cfg, token_mask=mask)
        logp = jax.nn.log_softmax(logits[:, P - 1:-1], axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0] * w), logits

    g1 = jax.jit(jax.grad(chunked))(params)
    g2, logits = jax.jit(jax.grad(full, has_aux=True))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    _, ent = token_logprobs(params, prompt, pmask, tokens, rmask, config=cfg, chunk=5, with_entropy=True)
    core = token_entropy(logits[:, P - 1:-1])
    np.testing.assert_allclose(np.asarray(ent)[rmask], np.asarray(core)[rmask], atol=1e-5)


def test_bfloat16_compute_gives_float32_logprobs():
    cfg = get_config("tiny-llama", dtype="bfloat16")  # float32 parameters, bfloat16 activations
    params = init_params(get_config("tiny-llama"), jax.random.PRNGKey(1))
    lp, _ = token_logprobs(params, *_batch(), config=cfg, chunk=4, with_entropy=True)
    assert lp.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lp)))
    ref, _ = token_logprobs(params, *_batch(), config=get_config("tiny-llama"), chunk=4, with_entropy=True)
    rmask = _batch()[3]
    diff = np.abs(np.asarray(lp - ref)[rmask])
    assert 0 < diff.max() < 0.1
