"""Memory plan: exact param / cache bytes against directly counted shards on a real 8-device mesh, and the plan
against XLA's compiled memory analysis of the real train step."""
import math

import jax
import pytest

from appo_jax.models.decoder import init_params
from appo_jax.models.kv_cache import init_cache
from appo_jax.models.presets import get_config
from appo_jax.training.plan_commands import register
from appo_jax.training.compiled_memory import compare_with_xla
from appo_jax.models.memory_plan import plan_memory
from appo_jax.parallel.mesh import make_mesh
from appo_jax.models.sharding import cache_shardings, shard_params


def _device0_bytes(tree):
    dev = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == dev)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_param_and_cache_bytes_equal_real_shards(mesh_shape):
    data, fsdp, tensor = mesh_shape
    cfg = get_config("tiny-qwen2")
    devices = jax.devices()[: data * fsdp * tensor]
    mesh = make_mesh(data, fsdp, tensor, devices=devices)
    params = shard_params(init_params(cfg, jax.random.PRNGKey(0)), mesh, cfg)
    cache = init_cache(cfg, 8, 32)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    plan = plan_memory(cfg, data=data, fsdp=fsdp, tensor=tensor, batch=8, seq_len=32, kv_batch=8, kv_len=32)
    got = plan["bytes_per_device"]
    assert got["params"] == _device0_bytes(params)
    assert got["kv_cache"] == _device0_bytes(cache)
    assert got["optimizer"] == 2 * got["params"]  # float32 params, two AdamW moments
    assert plan["num_params"] == sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_plan_scales_with_mesh_and_rejects_bad_batch():
    cfg = get_config("qwen2.5-7b").replace(dtype="bfloat16", remat_policy="full")
    one = plan_memory(cfg, batch=16, seq_len=1024)["bytes_per_device"]
    eight = plan_memory(cfg, fsdp=8, batch=16, seq_len=1024)["bytes_per_device"]
    assert eight["params"] < one["params"] / 7  # fsdp shards every large weight
    assert eight["activations"] < one["activations"]
    assert plan_memory(cfg, batch=16, seq_len=1024)["num_params"] == cfg.num_params()
    with pytest.raises(ValueError, match="does not divide"):
        plan_memory(cfg, fsdp=8, batch=12, seq_len=1024)
    with pytest.raises(ValueError, match="positive int"):
        plan_memory(cfg, fsdp=0)


def test_plan_cli_prints_json(capsys):
    import argparse
    import json

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["plan", "--model", "qwen2.5-0.5b", "--mesh", "1,4,2", "--batch", "8",
                              "--seq-len", "2048", "--kv-batch", "16", "--kv-len", "4096"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert out["bytes_per_device"]["kv_cache"] > 0 and out["gib_per_device"]["total"] > 0
    with pytest.raises(SystemExit):
        parser.parse_args(["plan", "--model", "x", "--mesh", "1,2"])


# Float32 compute: XLA:CPU computes bfloat16 in float32, so only float32 checks the activation coefficients.
@pytest.mark.parametrize("remat, mesh_shape", [("full", (1, 1, 1)), ("none", (2, 2, 2))])
def test_plan_within_10_percent_of_xla_compiled_memory(remat, mesh_shape):
    data, fsdp, tensor = mesh_shape
    cfg = get_config("tiny-llama").replace(remat_policy=remat)
    out = compare_with_xla(cfg, data=data, fsdp=fsdp, tensor=tensor, batch=16, seq_len=256)
    xla, err = out["xla"], out["relative_error"]
    assert xla["argument_is_per_device"]  # the analysis is per device: arguments = the inputs' local shards
    assert xla["params"] == out["plan"]["params"]
    assert 0 <= xla["optimizer"] - out["plan"]["optimizer"] <= 16  # + the int32 step counts of AdamW and clip
    assert abs(err["activations"]) < 0.10, out
    assert abs(err["temp"]) < 0.10, out  # gradients + gathered weights + activations vs XLA's temp bytes


def test_plan_cli_compare_xla(capsys):
    import argparse
    import json

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    # The first config of the test above (its compilation is reused when both run in one session).
    args = parser.parse_args(["plan", "--model", "tiny-llama", "--batch", "16", "--seq-len", "256", "--dtype",
                              "float32", "--remat", "full", "--compare-xla"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["relative_error"]["params"] == 0 and out["xla"]["argument_is_per_device"]
    assert set(out["relative_error"]) == {"params", "optimizer", "activations", "temp"}
    args = parser.parse_args(["plan", "--model", "tiny-llama", "--mesh", "4,4,4", "--compare-xla"])
    assert args.func(args) == 2  # 64 devices are not there
    assert "xla_force_host_platform_device_count=64" in capsys.readouterr().err
