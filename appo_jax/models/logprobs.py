"""Token log-probs (and entropies) of Trajectory responses under a policy, without the full [N, T, V] logits.

The model input of a row is ``concat(prompt_tokens [P], tokens [L])`` (prompt left-padded) with mask
``concat(prompt_mask, response_mask)`` and RoPE positions ``max(cumsum(mask) - 1, 0)`` (the i-th real token of
the row sits at position i, padding never shifts positions). The log-prob of response token ``t`` is read from
the final hidden state at input index ``P - 1 + t``:

    logits_t = unembed(h_{P-1+t}) / temperature        (float32)
    lp_t     = logits_t[a_t] - logsumexp(logits_t)
    H_t      = logsumexp(logits_t) - sum_v softmax(logits_t)_v * logits_t[v]

The L response positions are processed in chunks of ``chunk`` positions under ``lax.scan`` with the chunk body
rematerialised (``jax.checkpoint``): at most ``[N, chunk, V]`` float32 logits exist at a time, in the forward
and in the backward pass. Values at positions outside ``response_mask`` are meaningless (mask them).
"""
from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp

from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import forward, unembed

Array = jax.Array


def model_inputs(prompt_tokens, prompt_mask, tokens, response_mask) -> tuple[Array, Array, Array]:
    """``(input_ids [N, P+L], input_mask [N, P+L], positions [N, P+L])`` of the module docstring."""
    ids = jnp.concatenate([jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(tokens, jnp.int32)], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask, bool), jnp.asarray(response_mask, bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0).astype(jnp.int32)
    return ids, mask, positions


def _chunk_stats(params, hidden, targets, *, config: ModelConfig, temperature: float, with_entropy: bool):
    """lp (and H) of one chunk: hidden [N, C, D], targets [N, C] -> [N, C] float32."""
    logits = unembed(params, hidden, config=config).astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / jnp.float32(temperature)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lp = picked - lse
    if not with_entropy:
        return lp, jnp.zeros_like(lp)
    probs = jnp.exp(logits - lse[..., None])
    ent = lse - jnp.sum(probs * logits, axis=-1)
    return lp, ent


def hidden_logprobs(params, hidden, targets, *, config: ModelConfig, chunk: int = 512, temperature: float = 1.0,
                    with_entropy: bool = False) -> tuple[Array, Array | None]:
    """``lp[n, t] = log softmax(unembed(hidden[n, t]) / temperature)[targets[n, t]]`` (and the entropy H[n, t])
    for hidden ``[N, L, D]`` and targets ``[N, L]``, chunked over L (``chunk`` positions per rematerialised
    scan step; L is padded to a multiple of the chunk). Returns float32 ``([N, L], [N, L] | None)``."""
    n, length, d = hidden.shape
    c = max(1, min(int(chunk), length))
    pad = (-length) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    k = (length + pad) // c
    h = jnp.moveaxis(hidden.reshape(n, k, c, d), 1, 0)           # [K, N, C, D]
    tg = jnp.moveaxis(targets.reshape(n, k, c), 1, 0)           # [K, N, C]
    body = jax.checkpoint(partial(_chunk_stats, config=config, temperature=temperature, with_entropy=with_entropy))

    def step(_, xs):
        return None, body(params, *xs)

    _, (lp, ent) = jax.lax.scan(step, None, (h, tg))
    lp = jnp.moveaxis(lp, 0, 1).reshape(n, k * c)[:, :length]
    ent = jnp.moveaxis(ent, 0, 1).reshape(n, k * c)[:, :length]
    return lp, (ent if with_entropy else None)


def token_logprobs(params, prompt_tokens, prompt_mask, tokens, response_mask, *, config: ModelConfig,
                   chunk: int = 512, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[Array, Array | None]:
    """Log-probs ``[N, L]`` (and entropies) of the response ``tokens`` given the left-padded prompt, per the
    module docstring. Differentiable w.r.t. ``params``; float32 whatever the compute dtype."""
    p = prompt_tokens.shape[1]
    if p < 1:
        raise ValueError("token_logprobs needs at least one prompt column (the first response token's context)")
    ids, mask, positions = model_inputs(prompt_tokens, prompt_mask, tokens, response_mask)
    # The last response token predicts nothing we need: feed P + L - 1 tokens.
    hidden, _ = forward(params, ids[:, :-1], positions[:, :-1], config=config, token_mask=mask[:, :-1],
                        return_hidden=True)
    hidden = hidden[:, p - 1:]
    return hidden_logprobs(params, hidden, jnp.asarray(tokens, jnp.int32), config=config, chunk=chunk,
                           temperature=temperature, with_entropy=with_entropy)


def trajectory_logprobs(params, traj, *, config: ModelConfig, chunk: int = 512, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[Array, Array | None]:
    """:func:`token_logprobs` of a :class:`~appo_jax.core.trajectory.Trajectory` (responses incl. tool results)."""
    return token_logprobs(params, traj.prompt_tokens, traj.prompt_mask, traj.tokens, traj.gen_mask | traj.obs_mask,
                          config=config, chunk=chunk, temperature=temperature, with_entropy=with_entropy)


@lru_cache(maxsize=32)
def make_logprob_fn(config: ModelConfig, *, chunk: int, temperature: float, micro_rows: int = 0):
    """(Cached) jitted ``(params, prompt_tokens, prompt_mask, tokens, response_mask) -> logp [N, L]``: the
    :func:`token_logprobs` of every row, evaluated in row micro-batches of ``micro_rows`` (0 = all rows at once;
    rows ``j U + u`` form micro-batch u, which keeps the split local to each data shard)."""

    def fn(params, prompt_tokens, prompt_mask, tokens, response_mask):
        n, length = tokens.shape
        micro = micro_rows if micro_rows and n % micro_rows == 0 else n
        u, m = n // micro, micro
        inputs = (prompt_tokens, prompt_mask, tokens, response_mask)
        xs = tuple(jnp.moveaxis(x.reshape((m, u) + x.shape[1:]), 1, 0) for x in inputs)

        def one(args):
            return token_logprobs(params, *args, config=config, chunk=chunk, temperature=temperature)[0]

        out = jax.lax.map(one, xs)  # [U, m, L]
        return jnp.moveaxis(out, 0, 1).reshape(n, length)

    return jax.jit(fn)
