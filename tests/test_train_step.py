"""The jitted train step: updates, zero gradient from branch rows, micro-batch exactness, sharded = single.

Gradient comparisons use plain SGD with lr 1 (``params - new_params = grad``); the compiled steps are shared
between tests (one optimizer object per kind) to keep compile time low.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from appo_jax.core.losses import policy_loss
from appo_jax.models.decoder import init_params
from appo_jax.models import decoder
from appo_jax.models.presets import get_config
from appo_jax.parallel.mesh import make_mesh
from appo_jax.training.config import OptimizerSection
from appo_jax.models.logprobs import model_inputs
from appo_jax.training.state import create_train_state, make_optimizer
from appo_jax.training.batch import TrainBatch
from appo_jax.training.train_step import StepConfig, TrainStepRunner, init_train_state, train_step_fn

CFG = get_config("tiny-llama")
N, P, L = 8, 4, 8
LOSS = dict(mode="future_kl", clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, agg="token-mean",
            kl_coef=0.001, kl_kind="low_var_kl")
SGD = optax.sgd(1.0)
forward = jax.jit(decoder.forward, static_argnames=("config",))
PARAMS = init_params(CFG, jax.random.PRNGKey(0))


@functools.cache
def _step(mini=1, micro=2, epochs=1, agg="token-mean"):
    cfg = StepConfig.make(CFG, {**LOSS, "agg": agg}, mini_batches=mini, micro_batches=micro, epochs=epochs,
                          logprob_chunk=4)
    return jax.jit(train_step_fn(cfg))


def _batch(seed=0, branch_rows=()):
    rng = np.random.default_rng(seed)
    pmask = np.ones((N, P), bool)
    pmask[1, :2] = False
    rmask = np.ones((N, L), bool)
    rmask[2, 5:] = False
    loss_mask = rmask.copy()
    loss_mask[3, 2:4] = False  # an observation run
    for r in branch_rows:
        loss_mask[r] = False
    return dict(
        prompt_tokens=rng.integers(3, 256, (N, P)).astype(np.int32), prompt_mask=pmask,
        tokens=rng.integers(3, 256, (N, L)).astype(np.int32), response_mask=rmask, loss_mask=loss_mask,
        old_logp=(-5.5 + 0.3 * rng.normal(size=(N, L))).astype(np.float32),
        ref_logp=(-5.5 + 0.3 * rng.normal(size=(N, L))).astype(np.float32),
        advantages=rng.normal(size=(N, L)).astype(np.float32))


def _run(batch, params=PARAMS, tx=SGD, **kw):
    state = create_train_state(jax.tree.map(jnp.array, params), tx)
    return _step(**kw)(state, TrainBatch(**{k: jnp.asarray(v) for k, v in batch.items()}))


def _grad(new_state, params=PARAMS):
    return [np.asarray(p - n) for p, n in zip(jax.tree.leaves(params), jax.tree.leaves(new_state.params))]


def _grads_close(ga, gb, rtol=1e-4):
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, atol=rtol * max(np.abs(a).max(), 1e-12), rtol=0)


def _reference_loss(batch, agg="token-mean"):
    """Independent reference: full-vocab logits, log_softmax, the core loss on the whole batch at once."""
    ids, mask, pos = model_inputs(batch["prompt_tokens"], batch["prompt_mask"], batch["tokens"],
                                  batch["response_mask"])
    logits, _ = forward(PARAMS, ids, pos, config=CFG, token_mask=mask)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, P - 1:-1]), batch["tokens"][..., None], -1)[..., 0]
    return policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"],
                       ref_logp=batch["ref_logp"], **{**LOSS, "agg": agg})


def test_one_step_changes_params_and_loss_matches_full_batch_reference():
    batch = _batch()
    state, metrics = _run(batch)
    assert int(state.step) == 1
    assert max(float(np.abs(g).max()) for g in _grad(state)) > 1e-4
    ref_loss, ref_metrics = _reference_loss(batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5, atol=1e-6)
    assert float(metrics["valid_tokens"]) == float(ref_metrics["valid_tokens"])
    assert float(metrics["update_skipped"]) == 0.0


def test_adamw_step_moves_params_by_about_lr():
    tx = make_optimizer(OptimizerSection(lr=1e-3, weight_decay=0.0, grad_clip=1.0), 10)
    state, metrics = _run(_batch(), tx=tx)
    # The first Adam update is lr * g / (|g| + eps): every coordinate with a real gradient moves by ~lr.
    biggest = max(float(np.abs(g).max()) for g in _grad(state))
    assert 0.9e-3 < biggest <= 1.0001e-3
    assert np.isfinite(float(metrics["grad_norm"]))


def test_branch_rows_contribute_exactly_zero_gradient():
    branch = (5, 6, 7)
    a = _batch(1, branch_rows=branch)
    b = {k: v.copy() for k, v in a.items()}
    rng = np.random.default_rng(9)
    for r in branch:  # perturb everything a branch row carries
        b["tokens"][r] = rng.integers(3, 256, L)
        b["prompt_tokens"][r] = rng.integers(3, 256, P)
        b["old_logp"][r] = rng.normal(size=L) * 3
        b["ref_logp"][r] = rng.normal(size=L) * 3
        b["advantages"][r] = rng.normal(size=L) * 10
    sa, ma = _run(a)
    sb, mb = _run(b)
    for x, y in zip(_grad(sa), _grad(sb)):
        assert np.array_equal(x, y)
    assert float(ma["loss"]) == float(mb["loss"])


def test_micro_batch_accumulation_equals_full_batch():
    batch = _batch(2)
    full, mf = _run(batch, micro=1)
    acc, ma = _run(batch, micro=2)
    _grads_close(_grad(full), _grad(acc))
    np.testing.assert_allclose(float(mf["loss"]), float(ma["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(mf["grad_norm"]), float(ma["grad_norm"]), rtol=1e-4)


def test_seq_mean_aggregation_over_micro_batches_equals_full_batch_loss():
    batch = _batch(5)
    _, metrics = _run(batch, micro=4, agg="seq-mean-token-mean")
    ref_loss, _ = _reference_loss(batch, agg="seq-mean-token-mean")
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5, atol=1e-6)


def test_mini_batches_and_epochs_count_updates():
    state, metrics = _run(_batch(3), mini=2, micro=1, epochs=2)
    assert int(state.step) == 4
    assert float(metrics["update_skipped"]) == 0.0


def test_non_finite_update_is_skipped():
    params = jax.tree.map(jnp.array, PARAMS)
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(jnp.inf)
    state, metrics = _run(_batch(), params=params)
    assert float(metrics["update_skipped"]) == 1.0 and int(state.step) == 0
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)


def test_sharded_step_on_8_devices_equals_single_device():
    assert jax.device_count() >= 8
    batch = _batch(4)
    single, m1 = _run(batch)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state, shardings = init_train_state(PARAMS, SGD, 0, mesh=mesh, model_config=CFG)
    cfg = StepConfig.make(CFG, LOSS, mini_batches=1, micro_batches=2, logprob_chunk=4)
    s8, m8 = TrainStepRunner(cfg, mesh=mesh, shardings=shardings)(state, TrainBatch(**batch))
    emb = s8.params["embed_tokens"]["embedding"]
    assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
    _grads_close(_grad(single), _grad(s8))
    for key in ("loss", "grad_norm", "clip_frac_high", "fkl_weight_mean", "kl"):
        np.testing.assert_allclose(float(m1[key]), float(m8[key]), rtol=1e-4, atol=1e-7)
