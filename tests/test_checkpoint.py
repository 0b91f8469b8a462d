"""Orbax checkpoints: round trip, restore onto another mesh, keep-K, failures leave earlier checkpoints intact."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from appo_jax.models.decoder import init_params
from appo_jax.models.presets import get_config
from appo_jax.parallel.mesh import make_mesh
from appo_jax.training.checkpoint import Checkpointer, CheckpointError, load_checkpoint_params
from appo_jax.training.config import OptimizerSection
from appo_jax.training.state import make_optimizer
from appo_jax.training.train_step import init_train_state

CFG = get_config("tiny-llama")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_state(mesh=None, seed=3):
    """A state with non-trivial optimizer moments (one AdamW update with gradient = params, jitted)."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    tx = make_optimizer(OptimizerSection(lr=1e-2), 10)
    state, shardings = init_train_state(params, tx, seed, mesh=mesh, model_config=CFG)
    return jax.jit(lambda s: s.apply_gradients(s.params), out_shardings=shardings)(state), shardings


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_params_opt_state_step_rng_and_meta(tmp_path):
    state, _ = _trained_state()
    meta = {"iteration": 5, "data": {"epoch": 1, "index": 7}}
    lagged = {"0": jax.tree.map(lambda x: x * 2, state.params)}
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        ck.save(5, state, meta, extra={"lagged": lagged})
        ck.wait()
        assert ck.all_steps() == [5]
    fresh, _ = _trained_state(seed=0)
    fresh = fresh.replace(step=jnp.zeros((), jnp.int32))
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        restored, rmeta, extra = ck.restore(fresh, extra_target={"lagged": {"0": fresh.params}})
    assert rmeta == meta
    assert int(restored.step) == 1 and np.array_equal(np.asarray(restored.rng), np.asarray(state.rng))
    _assert_same(restored.params, state.params)
    _assert_same(restored.opt_state, state.opt_state)
    _assert_same(extra["lagged"], lagged)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)


def test_restore_onto_a_different_mesh(tmp_path):
    assert jax.device_count() >= 8
    mesh_a = make_mesh(data=1, fsdp=8, tensor=1)
    state, _ = _trained_state(mesh_a)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, state, {"iteration": 1})
    mesh_b = make_mesh(data=2, fsdp=2, tensor=2)
    target, shardings = _trained_state(mesh_b, seed=9)
    with Checkpointer(tmp_path / "ck") as ck:
        restored, _, _ = ck.restore(target)
    _assert_same(restored.params, state.params)
    _assert_same(restored.opt_state, state.opt_state)
    for leaf, sh in zip(jax.tree.leaves(restored.params), jax.tree.leaves(shardings.params)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    single, _ = _trained_state(None, seed=9)  # and onto one device
    with Checkpointer(tmp_path / "ck") as ck:
        restored1, _, _ = ck.restore(single)
    _assert_same(restored1.params, state.params)


def test_saving_arrays_replicated_over_cpu_devices_compiles_nothing(tmp_path, caplog):
    """On CPU a replicated array is written whole by its first replica (no per-device slice programs: see
    `checkpoint._no_replica_slices_on_cpu`), and it restores exactly; `load_checkpoint_params` reads it quietly."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = make_mesh(data=8, fsdp=1, tensor=1)
    repl = NamedSharding(mesh, PartitionSpec())
    tree = {"w": jax.device_put(np.arange(40 * 5, dtype=np.float32).reshape(40, 5), repl),
            "b": jax.device_put(np.arange(24, dtype=np.float32), repl)}
    state, _ = _trained_state()
    ck = Checkpointer(tmp_path / "ck", keep=1, async_save=False)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        ck.save(1, state, {"iteration": 1}, extra=tree)
        ck.wait()
    assert not [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), tree)
    _, _, extra = ck.restore(state, extra_target=target)
    ck.close()
    _assert_same(extra, tree)
    caplog.clear()  # reading the params of one checkpoint (eval / serve of a workdir) warns about nothing
    params, step = load_checkpoint_params(tmp_path / "ck")
    assert step == 1 and not [r for r in caplog.records if r.levelname == "WARNING"]
    _assert_same(params, state.params)


def test_keep_last_k_and_missing_checkpoint_errors(tmp_path):
    state, _ = _trained_state()
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        for s in (1, 2, 3, 4):
            ck.save(s, state, {"iteration": s})
        ck.wait()
        assert ck.all_steps() == [3, 4]
        assert sorted(os.listdir(tmp_path / "ck")) == ["3", "4"]
        assert ck.read_meta() == {"iteration": 4}
        with pytest.raises(CheckpointError, match="step 7 not found"):
            ck.restore(state, step=7)
    with Checkpointer(tmp_path / "empty") as ck, pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.restore(state)


FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys
    import jax
    from appo_jax.models.decoder import init_params
    from appo_jax.models.presets import get_config
    from appo_jax.training.checkpoint import Checkpointer, CheckpointError, load_checkpoint_params
    from appo_jax.training.config import OptimizerSection
    from appo_jax.training.state import make_optimizer
    from appo_jax.training.train_step import init_train_state

    cfg = get_config("tiny-llama")
    state, _ = init_train_state(init_params(cfg, jax.random.PRNGKey(0)), make_optimizer(OptimizerSection(), 1), 0)
    directory = sys.argv[1]
    ck = Checkpointer(directory, keep=2)
    for s in (1, 2):
        ck.save(s, state, {"iteration": s})
    ck.wait()
    # Files may now grow to 4 kB at most: the next checkpoint cannot be written (EFBIG, like a full disk).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    message = None
    try:
        ck.save(3, state, {"iteration": 3})
        ck.wait()
    except CheckpointError as err:
        message = str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    steps_after_failure = ck.all_steps()
    restored, meta, _ = ck.restore(state)
    ck.save(4, state, {"iteration": 4})  # the run can go on once there is space again
    ck.close()
    print("RESULT", json.dumps({"message": message, "after_failure": steps_after_failure, "meta": meta,
                                "final": sorted(os.listdir(directory))}))
""")


def test_full_disk_gives_a_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "ck")], capture_output=True,
                          text=True, env=env, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["message"] is not None and "no space left" in out["message"]
    assert "Complete checkpoints still on disk: [1, 2]" in out["message"]
    assert out["after_failure"] == [1, 2] and out["meta"] == {"iteration": 2}
    assert out["final"] == ["2", "4"]
