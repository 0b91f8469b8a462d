"""Negative controls: the same run with the learning signal taken out of the rewards, to show that a gain comes
from the signal and not from the size of the updates (``algorithm.control``).

A control maps the per-row rewards of an iteration before any advantage estimator sees them (the logged reward
and accuracy stay the real ones):

    none:             R' = R
    permute_rewards:  R'_i = R_{pi(i)},  pi a uniformly random permutation inside each segment
                      (prompt group, initial / branch rows), drawn afresh every iteration from ``key``
    negate_rewards:   R'_i = -R_i

``permute_rewards`` keeps each group's reward distribution (so the update sizes are those of a real run) and cuts
its link to the responses: for GRPO (a group z-score) it is exactly the advantages permuted within groups. A policy
trained on it must not improve beyond noise. ``negate_rewards`` flips every group-relative advantage: the policy
is pushed away from what the reward favours, and must get worse. Both are jitted pure functions of ``[N]``
arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from appo_jax.core.registry import CONTROLS

Array = jax.Array


@CONTROLS.register("none")
def no_control(rewards, group_ids, kind, key) -> Array:
    """``R' = R``."""
    return jnp.asarray(rewards, jnp.float32)


@CONTROLS.register("permute_rewards")
@jax.jit
def permute_rewards(rewards, group_ids, kind, key) -> Array:
    """``R'_i = R_{pi(i)}`` with ``pi`` a uniformly random permutation inside each segment ``(group_ids,
    kind)`` (module doc). Rows are ordered segment-major twice, by row index and by a random key; the k-th row of
    the first order takes the reward of the k-th row of the second. O(N log N), one sort pair."""
    r = jnp.asarray(rewards, jnp.float32)
    segment = jnp.asarray(group_ids, jnp.int32) * 2 + (jnp.asarray(kind, jnp.int32) != 0)
    n = r.shape[0]
    slots = jnp.lexsort((jnp.arange(n), segment))
    shuffled = jnp.lexsort((jax.random.uniform(key, (n,)), segment))
    return r.at[slots].set(r[shuffled])


@CONTROLS.register("negate_rewards")
def negate_rewards(rewards, group_ids, kind, key) -> Array:
    """``R' = -R``."""
    return -jnp.asarray(rewards, jnp.float32)
