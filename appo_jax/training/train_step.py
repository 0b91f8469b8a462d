"""One jitted policy update over the mesh: PPO epochs x mini-batches, each with micro-batch gradient
accumulation, the core ``policy_loss`` (+ KL to the reference) and one AdamW step.

Batch layout. A :class:`~appo_jax.training.batch.TrainBatch` of ``N`` rows (``ref_logp`` only when the KL
coefficient is non-zero). With ``K`` mini-batches of ``U`` micro-batches of ``m`` rows (``N = m U K``), row
``i = j U K + u K + k`` (``j < m``) belongs to mini-batch ``k``, micro-batch ``u``. This strided assignment keeps
the reshape ``[N] -> [m, U, K]`` local to every data shard (rows are split over ``data x fsdp`` in contiguous
blocks of ``N / D`` rows, and ``D`` divides ``m``), so each micro-batch is spread evenly over all shards and no
row moves between devices.

Loss and exact accumulation. For micro-batch u the core returns ``loss_u = agg(loss_t, mask_u)`` with its final
mask (after non-finite removal and the future-KL row drop). The mini-batch loss is

    L = sum_u n_u loss_u / sum_u n_u,     n_u = valid tokens (token-mean) or valid rows (seq-mean-*)

i.e. exactly the aggregate over the whole mini-batch; the gradient is accumulated as ``sum_u grad(n_u loss_u)``
(float32) and divided by ``sum_u n_u`` once, so micro-batching does not change the update.

Non-finite guard. When the gradient norm or the loss is not finite the update is skipped (params and
optimizer state unchanged, ``update_skipped = 1`` in the metrics); the RL loop stops with a clear error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from appo_jax.core.losses import policy_loss
from appo_jax.models.config import ModelConfig
from appo_jax.models.logprobs import token_logprobs
from appo_jax.models.sharding import param_shardings as model_param_shardings
from appo_jax.parallel.placement import Placement
from appo_jax.training.batch import TrainBatch
from appo_jax.training.state import TrainState, create_train_state

_SUM_KEYS = ("valid_tokens", "nonfinite_tokens")


@dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step. ``loss``: keyword options of ``policy_loss`` as sorted (key, value)
    pairs (``kl_coef`` / ``kl_kind`` included); ``mini_batches`` K, ``micro_batches`` U per mini-batch,
    ``epochs``; ``logprob_chunk`` and ``temperature`` of the log-prob recomputation."""

    model: ModelConfig
    loss: tuple = ()
    mini_batches: int = 1
    micro_batches: int = 1
    epochs: int = 1
    logprob_chunk: int = 512
    temperature: float = 1.0

    @property
    def loss_options(self) -> dict:
        return dict(self.loss)

    @staticmethod
    def make(model: ModelConfig, loss: dict, **kw) -> "StepConfig":
        return StepConfig(model=model, loss=tuple(sorted(loss.items())), **kw)


def _normaliser(metrics, mask, agg: str):
    """n_u of the module docstring (from the core's final-mask count / row-drop fraction)."""
    if agg == "token-mean":
        return metrics["valid_tokens"]
    rows = jnp.sum(jnp.any(mask, axis=-1), dtype=jnp.float32)
    return jnp.round(rows * (1.0 - metrics["dropped_row_frac"]))


def _combine(metrics, weights):
    """Combine per-micro-batch metric arrays [U] into scalars: sums, min/max, else weighted means."""
    total = jnp.maximum(jnp.sum(weights), 1.0)
    out = {}
    for key, v in metrics.items():
        if key in _SUM_KEYS:
            out[key] = jnp.sum(v)
        elif key.endswith("_min"):
            out[key] = jnp.min(v)
        elif key.endswith("_max"):
            out[key] = jnp.max(v)
        else:
            out[key] = jnp.sum(v * weights) / total
    return out


def _strided(x, m: int, u: int, k: int):
    """[N, ...] -> [K, U, m, ...] with row i = j U K + u K + k (module docstring)."""
    return jnp.moveaxis(x.reshape((m, u, k) + x.shape[1:]), (0, 1, 2), (2, 1, 0))


def train_step_fn(cfg: StepConfig, lr_schedule=None, param_shardings=None):
    """The pure function ``(state, batch) -> (state, metrics)`` of the module docstring (jit it, or use
    :class:`TrainStepRunner`). ``param_shardings`` (optional) constrains the gradient accumulators."""
    opts = cfg.loss_options
    kl_coef = float(opts.get("kl_coef", 0.0))
    agg = opts.get("agg", "token-mean")
    k, u, epochs = cfg.mini_batches, cfg.micro_batches, cfg.epochs

    def micro_loss(params, mb: TrainBatch):
        logp, _ = token_logprobs(params, mb.prompt_tokens, mb.prompt_mask, mb.tokens, mb.response_mask,
                                 config=cfg.model, chunk=cfg.logprob_chunk, temperature=cfg.temperature)
        loss, metrics = policy_loss(logp, mb.old_logp, mb.advantages, mb.loss_mask,
                                    ref_logp=mb.ref_logp if kl_coef else None, behavior_logp=mb.behavior_logp,
                                    **opts)
        norm = jax.lax.stop_gradient(_normaliser(metrics, mb.loss_mask, agg))
        metrics.pop("entropy", None)  # no entropy is passed to the loss (the sampler's is logged by the loop)
        return loss * norm, (metrics, norm)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def constrain(tree):
        if param_shardings is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, param_shardings)

    def mini_step(state: TrainState, mini):
        zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))

        def body(acc, mb):
            (_, (metrics, norm)), grads = grad_fn(state.params, mb)
            acc = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads))
            return acc, (metrics, norm)

        acc, (metrics, norms) = jax.lax.scan(body, zeros, mini)
        total = jnp.sum(norms)
        grads = jax.tree.map(lambda g, p: (g / jnp.maximum(total, 1.0)).astype(p.dtype), acc, state.params)
        grad_norm = optax.tree.norm(grads)
        metrics = _combine(metrics, norms)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        new = state.apply_gradients(grads)
        keep = lambda a, b: jnp.where(finite, a, b)  # noqa: E731
        new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                          opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                          step=jnp.where(finite, new.step, state.step))
        metrics["grad_norm"] = grad_norm
        metrics["update_skipped"] = (~finite).astype(jnp.float32)
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return new, metrics

    def train_step(state: TrainState, batch: TrainBatch):
        n = batch.num_rows
        if n % (k * u):
            raise ValueError(f"train batch has {n} rows, not a multiple of mini_batches x micro_batches = {k * u}")
        m = n // (k * u)
        shaped = jax.tree.map(lambda v: _strided(jnp.asarray(v), m, u, k), batch)

        def epoch_body(state, idx):
            mini = jax.tree.map(lambda v: v[idx % k], shaped)
            return mini_step(state, mini)

        state, metrics = jax.lax.scan(epoch_body, state, jnp.arange(epochs * k))
        out = {}
        for key, v in metrics.items():
            if key.endswith("_min"):
                out[key] = jnp.min(v)
            elif key.endswith("_max"):
                out[key] = jnp.max(v)
            elif key in ("update_skipped",) + _SUM_KEYS:
                out[key] = jnp.sum(v)
            else:
                out[key] = jnp.mean(v)
        return state, out

    return train_step


@dataclass
class TrainStepRunner:
    """A compiled train step bound to a mesh (or the default device when ``mesh`` is None)."""

    cfg: StepConfig
    mesh: Any = None
    lr_schedule: Any = None
    shardings: Any = None  # TrainState of NamedShardings (from init_train_state) when on a mesh
    _fn: Any = field(default=None, repr=False)

    def __post_init__(self):
        key = None
        if self.shardings is not None:
            leaves, treedef = jax.tree.flatten(self.shardings)
            key = (treedef, tuple(leaves))
        self._fn = _compiled_step(self.cfg, self.lr_schedule, key)

    def __call__(self, state: TrainState, batch: TrainBatch):
        """One update: ``batch`` rows placed over ``data x fsdp``, the compiled step run on the mesh."""
        placement = Placement(self.mesh)
        batch = placement.tree(batch)
        with placement.context():
            return self._fn(state, batch)


@functools.lru_cache(maxsize=32)
def _compiled_step(cfg: StepConfig, lr_schedule, shardings_key):
    """The jitted step for these static settings (cached: runners with equal settings share compilations);
    ``shardings_key`` = (treedef, leaves) of the state shardings, or None."""
    shardings = None if shardings_key is None else jax.tree.unflatten(shardings_key[0], shardings_key[1])
    p_sh = None if shardings is None else shardings.params
    out = None if shardings is None else (shardings, None)
    return jax.jit(train_step_fn(cfg, lr_schedule, p_sh), donate_argnums=0, out_shardings=out)


def state_shardings(state_shape: TrainState, param_shardings, mesh):
    """NamedShardings of a TrainState: params as given, AdamW moments like their params, the rest replicated."""
    repl = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(state_shape.tx, lambda _, s: s, state_shape.opt_state, param_shardings,
                                transform_non_params=lambda _: repl)
    return state_shape.replace(params=param_shardings, opt_state=opt, step=repl, rng=repl)


def init_train_state(params, tx, seed: int = 0, mesh=None, model_config: ModelConfig | None = None):
    """A TrainState at step 0 placed on ``mesh`` (params / moments sharded by the model's logical axes;
    ``model_config`` required with a mesh) or on the default device. Returns ``(state, shardings | None)``.
    The jitted initialiser is shared by equal optimizers and shardings (no compile per call)."""
    if mesh is None:  # jit: fresh buffers, so donating the state never deletes the caller's params
        return _state_initialiser(tx, None)(params, seed), None
    p_sh = model_param_shardings(model_config, mesh)
    shape = jax.eval_shape(lambda p: create_train_state(p, tx, seed), params)
    shardings = state_shardings(shape, p_sh, mesh)
    params = jax.device_put(params, p_sh)
    leaves, treedef = jax.tree.flatten(shardings)
    return _state_initialiser(tx, (treedef, tuple(leaves)))(params, seed), shardings


@functools.lru_cache(maxsize=32)
def _state_initialiser(tx, shardings_key):
    """Jitted ``(params, seed) -> create_train_state(params, tx, seed)`` with the state's out shardings
    (``shardings_key`` = (treedef, leaves)), or committed to the default device when None: a state restored from a
    checkpoint is committed too, and jit keys its compiled programs on that, so a resumed run reuses them."""
    if shardings_key is None:
        out = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        out = jax.tree.unflatten(shardings_key[0], shardings_key[1])
    return jax.jit(lambda p, seed: create_train_state(p, tx, seed), out_shardings=out)
