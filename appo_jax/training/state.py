"""The train state (params, optimizer state, step, PRNG key) and its optax chain.

The optimizer is ``clip_by_global_norm(grad_clip) -> AdamW(schedule, b1, b2, eps, weight_decay)``; the
schedule is ``constant`` (``lr``, after an optional linear warmup from 0) or ``cosine`` (linear warmup to
``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``). Steps count
optimizer updates (PPO mini-batches), not RL iterations.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from appo_jax.training.config import ConfigError, OptimizerSection


@flax.struct.dataclass
class TrainState:
    """``params`` (plain pytree), ``opt_state`` (optax), ``step`` (int32 scalar, optimizer updates done),
    ``rng`` (a raw uint32 PRNG key, shape [2]). ``tx`` is static (not a leaf)."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def apply_gradients(self, grads) -> "TrainState":
        """One optimizer update: ``params <- params + tx.update(grads)``; ``step += 1``."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1)


def _key(opt: OptimizerSection) -> tuple:
    return tuple(dataclasses.astuple(opt))


def learning_rate_schedule(opt: OptimizerSection, total_steps: int) -> optax.Schedule:
    """The lr schedule of :mod:`state` (module doc) as a function ``step -> lr``. Equal settings give the same
    function object (so jitted steps that close over it are reused, not recompiled)."""
    return _schedule(_key(opt), _horizon(opt, total_steps))


@functools.lru_cache(maxsize=64)
def _schedule(key: tuple, total_steps: int) -> optax.Schedule:
    opt = OptimizerSection(*key)
    warmup = int(opt.warmup_steps)
    if opt.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(opt.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, opt.lr, warmup), optax.constant_schedule(opt.lr)], [warmup])
    if opt.schedule == "cosine":
        decay_steps = max(int(total_steps), warmup + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else opt.lr, peak_value=opt.lr, warmup_steps=warmup,
            decay_steps=decay_steps, end_value=opt.lr * opt.min_lr_ratio)
    raise ConfigError(f"optimizer.schedule={opt.schedule!r}; expected 'constant' or 'cosine'")


def make_optimizer(opt: OptimizerSection, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` (skipped when 0) then AdamW with :func:`learning_rate_schedule`.
    Equal settings give the same (static) transformation object, so a TrainState's jitted steps are reused."""
    return _optimizer(_key(opt), _horizon(opt, total_steps))


def _horizon(opt: OptimizerSection, total_steps: int) -> int:
    """``total_steps`` where the schedule depends on it (cosine), else 0: a constant schedule's optimizer is the
    same object whatever the run's length (so extending a run with more steps compiles nothing again)."""
    return int(total_steps) if opt.schedule == "cosine" else 0


@functools.lru_cache(maxsize=64)
def _optimizer(key: tuple, total_steps: int) -> optax.GradientTransformation:
    opt = OptimizerSection(*key)
    parts = []
    if opt.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay))
    return optax.chain(*parts)


def create_train_state(params, tx: optax.GradientTransformation, seed: int | jax.Array = 0) -> TrainState:
    """A fresh state at step 0. ``seed``: an int (a Python or traced scalar) or a raw uint32 key. Under ``jax.jit`` with
    ``out_shardings`` the optimizer state inherits the parameter shardings (AdamW moments are like params)."""
    rng = jax.random.PRNGKey(seed) if jnp.ndim(seed) == 0 else jnp.asarray(seed, jnp.uint32)
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=rng, tx=tx)
