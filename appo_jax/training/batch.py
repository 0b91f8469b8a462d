"""`TrainBatch`: the typed pytree one policy update reads (docs/algorithm.md §1.6)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from appo_jax.core.trajectory import Trajectory


@flax.struct.dataclass
class TrainBatch:
    """``N`` rows of the update. ``prompt_tokens`` / ``prompt_mask`` ``[N, P]`` (left-padded); ``tokens``,
    ``response_mask`` (generated or observation), ``loss_mask`` (the tokens whose loss counts), ``old_logp``
    (the PPO ratio's denominator), ``advantages`` ``[N, L]``; ``ref_logp`` ``[N, L]`` for the KL term, or None
    when the KL coefficient is 0; ``behavior_logp`` ``[N, L]`` (the sampler's log-probs) for truncated
    importance sampling (``loss.tis_cap``), or None."""

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    loss_mask: jax.Array
    old_logp: jax.Array
    advantages: jax.Array
    ref_logp: jax.Array | None = None
    behavior_logp: jax.Array | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def from_trajectory(cls, traj: Trajectory, advantages, old_logp, ref_logp=None, *,
                        train_branches: bool = False, with_behavior: bool = False) -> "TrainBatch":
        """The batch of a Trajectory: ``loss_mask`` = ``traj.loss_mask`` (generated tokens of valid initial rows:
        branch rows contribute nothing, docs/algorithm.md §1.3), or ``gen_mask & row_valid`` when
        ``train_branches`` (ARPO / AEPO / Tree-GRPO train on every rollout); ``with_behavior`` carries
        ``traj.behavior_logp`` (for ``loss.tis_cap``)."""
        gen, valid = jnp.asarray(traj.gen_mask), jnp.asarray(traj.row_valid)
        loss_mask = gen & valid[:, None] if train_branches else jnp.asarray(traj.loss_mask)
        return cls(prompt_tokens=jnp.asarray(traj.prompt_tokens), prompt_mask=jnp.asarray(traj.prompt_mask),
                   tokens=jnp.asarray(traj.tokens), response_mask=gen | jnp.asarray(traj.obs_mask),
                   loss_mask=loss_mask, old_logp=jnp.asarray(old_logp), advantages=jnp.asarray(advantages),
                   ref_logp=None if ref_logp is None else jnp.asarray(ref_logp),
                   behavior_logp=jnp.asarray(traj.behavior_logp) if with_behavior else None)
