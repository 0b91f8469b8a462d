"""GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training", verl-agent,
arXiv 2505.10978): the episode-level GRPO advantage plus a step-level advantage over *anchor states*
(docs/algorithm.md §1.9). Registered as the advantage estimator ``gigpo``.

A *step* is one assistant segment: all the generated tokens between two tool observations (``obs_mask`` spans;
step k follows k observations). Only an observation ends a step: generated tokens separated by anything else
(padding, masked tokens that are neither generated nor observation) stay one step. Its *anchor state* is the
prompt plus the exact sequence of observation tokens received before it (the environment's state, not the model's
wording); two steps share an anchor group iff they belong to the same prompt group and saw identical observations.
With S_i the steps of row i and k the step index::

    ret_{i,k}  = R_i * gamma^(S_i - 1 - k)                    (the outcome reward at the end, discounted per step)
    A_step     = (ret - mean_anchor ret) / (std_anchor ret + 1e-6)     over the steps of one anchor group;
                 0 for a group of one step
    A_t        = A_episode(i) + omega * A_step(i, k(t))       on the generated tokens of step k

Anchor states are compared by a 32-bit rolling hash of the observation tokens (`observation_hashes`; a collision
merges two anchor groups, with probability ~ pairs / 2^32). Everything is static-shaped: one associative scan for
the hashes, one sort of the step starts for the groups, segment statistics; no Python loop over rows or tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from appo_jax.core.advantages import STD_EPS, _row_ok, grpo_advantages
from appo_jax.core.registry import ADVANTAGES
from appo_jax.core.stats import segment_zscore

Array = jax.Array

#: verl-agent's defaults: step discount gamma and the weight omega of the step-level term.
GIGPO_GAMMA = 0.95
GIGPO_STEP_WEIGHT = 1.0
_MUL = 16777619  # the 32-bit FNV prime
_SEP = 0x9E3779B9  # mixed in where an observation span starts


def _shift_right(x):
    return jnp.pad(x[:, :-1], ((0, 0), (1, 0)))


def observation_hashes(tokens, obs_mask) -> Array:
    """uint32 ``[N, L]``: ``H_t`` = rolling hash of the observation tokens at positions <= t (mod 2^32, H_-1 = 0)::

        H_t = H_{t-1}                                  where not obs_t
        H_t = (H_{t-1} P + SEP) P + (tok_t + 1)        where obs_t starts an observation span
        H_t = H_{t-1} P + (tok_t + 1)                  where obs_t continues one

    computed as one associative scan of the affine maps ``h -> a h + b`` (uint32 arithmetic wraps)."""
    obs = jnp.asarray(obs_mask).astype(bool)
    start = obs & ~_shift_right(obs)
    tok = jnp.asarray(tokens).astype(jnp.uint32) + jnp.uint32(1)
    p = jnp.uint32(_MUL)
    a = jnp.where(obs, jnp.where(start, jnp.uint32((_MUL * _MUL) % 2**32), p), jnp.uint32(1))
    b = jnp.where(obs, jnp.where(start, jnp.uint32((_SEP * _MUL) % 2**32) + tok, tok), jnp.uint32(0))

    def compose(first, second):  # apply `first`, then `second`
        (a1, b1), (a2, b2) = first, second
        return a2 * a1, a2 * b1 + b2

    _, h = jax.lax.associative_scan(compose, (a, b), axis=1)
    return h


def gigpo_step_advantages(rewards, group_ids, gen_mask, obs_mask, tokens, num_groups: int, valid=None, *,
                          gamma: float = GIGPO_GAMMA, norm_by_std: bool = True) -> Array:
    """The step-level term ``A_step`` of the module doc on every generated token, ``[N, L]`` float32 (0 for rows
    that do not take part, see `appo_jax.core.advantages`)."""
    ok = _row_ok(rewards, group_ids, num_groups, valid)
    gen = jnp.asarray(gen_mask).astype(bool) & ok[:, None]
    obs = jnp.asarray(obs_mask).astype(bool)
    n, length = gen.shape
    k = jnp.cumsum(obs & ~_shift_right(obs), axis=1, dtype=jnp.int32)  # observations received before position t
    # the step of the latest generated token at or before t (k is non-decreasing); a step starts at the first
    # generated token after an observation, whatever non-observation gaps lie between its tokens
    seen = jax.lax.cummax(jnp.where(gen, k, -1), axis=1)
    start = gen & (k > jnp.pad(seen[:, :-1], ((0, 0), (1, 0)), constant_values=-1))
    last = seen[:, -1]  # the last step's k (S_i - 1)
    r = jnp.where(ok, jnp.asarray(rewards, jnp.float32), 0.0)
    ret = r[:, None] * jnp.float32(gamma) ** (last[:, None] - k).astype(jnp.float32)
    # anchor groups: sort the step starts by (prompt group, observation hash); equal neighbours share a group
    g = jnp.asarray(group_ids, jnp.int32)
    key_g = jnp.where(start, g[:, None], num_groups).reshape(-1)
    key_h = observation_hashes(tokens, obs).reshape(-1)
    order = jnp.arange(n * length, dtype=jnp.int32)
    sg, sh, sidx = jax.lax.sort((key_g, key_h, order), num_keys=2)
    new = jnp.concatenate([jnp.ones((1,), bool), (sg[1:] != sg[:-1]) | (sh[1:] != sh[:-1])])
    seg = jnp.zeros((n * length,), jnp.int32).at[sidx].set(jnp.cumsum(new, dtype=jnp.int32) - 1)
    z = segment_zscore(ret.reshape(-1), seg, n * length, mask=start.reshape(-1), eps=STD_EPS,
                       norm_by_std=norm_by_std).reshape(n, length)
    # every token of a step takes the value at the step's first token
    src = jax.lax.cummax(jnp.where(start, jnp.arange(length, dtype=jnp.int32), -1), axis=1)
    step = jnp.take_along_axis(z, jnp.maximum(src, 0), axis=1)
    return jnp.where(gen & (src >= 0), step, 0.0)


@dataclass(frozen=True)
class GigpoOptions:
    """Options of ``gigpo``: ``norm_by_std`` (episode and step z-scores), ``gigpo_gamma`` (the step discount) and
    ``gigpo_step_weight`` (omega, the weight of the step-level term)."""

    norm_by_std: bool = True
    gigpo_gamma: float = GIGPO_GAMMA
    gigpo_step_weight: float = GIGPO_STEP_WEIGHT


@ADVANTAGES.register("gigpo", options=GigpoOptions)
def _gigpo(*, rewards, group_ids, gen_mask, num_groups, options, obs_mask=None, tokens=None, valid=None, **_):
    """GiGPO: ``A_t = A_episode(i) m_t + omega A_step`` (module doc); needs ``obs_mask`` and ``tokens``."""
    if obs_mask is None or tokens is None:
        raise ValueError("advantage 'gigpo' needs obs_mask and tokens (the observations define the anchor states)")
    o = options
    episode = grpo_advantages(rewards, group_ids, num_groups, o.norm_by_std, valid)
    m = jnp.asarray(gen_mask).astype(bool)
    step = gigpo_step_advantages(rewards, group_ids, gen_mask, obs_mask, tokens, num_groups, valid,
                                 gamma=o.gigpo_gamma, norm_by_std=o.norm_by_std)
    return jnp.where(m, episode[:, None], 0.0) + o.gigpo_step_weight * step
