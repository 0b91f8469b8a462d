"""Mesh construction, logical-axis rules and sharded model execution on 8 fake CPU devices (conftest)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from appo_jax.models import forward, get_config, init_cache, init_params
from appo_jax.models.hf_io import export_hf, load_hf
from appo_jax.models.loading import load_model
from appo_jax.parallel.mesh import make_mesh
from appo_jax.models.sharding import cache_shardings, param_shardings, shard_params
from appo_jax.parallel.rules import (DEFAULT_RULES, activation_sharding, batch_sharding, logical_to_sharding,
                                     logical_to_spec)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices, see tests/conftest.py")
MESHES = [(1, 2, 4), (2, 2, 2)]


def test_make_mesh_shapes_and_fill():
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(1, -1, 4).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    one = make_mesh(devices=jax.devices()[:1])
    assert one.devices.shape == (1, 1, 1) and one.axis_names == ("data", "fsdp", "tensor")
    two = make_mesh(1, 2, 1, devices=jax.devices()[2:4])
    assert list(two.devices.flat) == jax.devices()[2:4]


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="8 are available"):
        make_mesh(3, 1, 1)
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh(-1, 3, 1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="positive"):
        make_mesh(0, 8, 1)


def test_logical_to_spec_priority_divisibility_and_size_one_axes():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_spec(("batch", "length", "embed"), mesh) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), mesh, shape=(2, 8, 3, 4)) == P(
        None, "fsdp", None, None)  # 3 kv heads do not split over tensor=2: replicated
    assert logical_to_spec(("vocab", "embed"), make_mesh(8, 1, 1)) == P(None, None)  # size-1 axes dropped
    custom = {"batch": "data", "embed": ("fsdp", "tensor")}
    assert logical_to_spec(("batch", "embed"), mesh, custom) == P("data", ("fsdp", "tensor"))
    tree = {"a": ("batch", None), "b": {"c": ("mlp",)}}
    shardings = logical_to_sharding(tree, mesh)
    assert shardings["a"].spec == P(("data", "fsdp"), None) and shardings["b"]["c"].spec == P("tensor")
    assert batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    assert set(DEFAULT_RULES) >= {"batch", "embed", "heads", "kv_heads", "mlp", "vocab", "layers"}


def test_param_shardings_follow_the_rules():
    config = get_config("tiny-qwen2")
    s = param_shardings(config, make_mesh(1, 2, 4))
    assert s["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert s["layers"]["self_attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", None, None)  # 2 kv heads, tensor 4
    assert s["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert s["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    assert s["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny-qwen2")
    return config, init_params(config, jax.random.PRNGKey(3))


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_equals_unsharded(tiny, shape):
    config, params = tiny
    mesh = make_mesh(*shape)
    fwd = jax.jit(forward, static_argnames=("config", "return_hidden"))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 6), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(6), (8, 6))
    ref, _ = fwd(params, tokens, positions, config=config)
    cache = init_cache(config, 8, 8)
    ref_cached, ref_cache = fwd(params, tokens, positions, config=config, cache=cache)

    sharded = shard_params(params, mesh, config)
    assert sharded["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    tokens_s = jax.device_put(tokens, batch_sharding(mesh, 2))
    positions_s = jax.device_put(positions, batch_sharding(mesh, 2))
    cache_s = jax.device_put(cache, cache_shardings(cache, mesh))
    with activation_sharding(mesh):
        out, _ = fwd(sharded, tokens_s, positions_s, config=config)
        out_cached, new_cache = fwd(sharded, tokens_s, positions_s, config=config, cache=cache_s)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(out_cached, ref_cached, atol=1e-5)
    np.testing.assert_allclose(new_cache.k, ref_cache.k, atol=1e-5)
    np.testing.assert_array_equal(new_cache.end, ref_cache.end)


def test_hf_import_places_sharded_arrays(tiny, tmp_path):
    config, params = tiny
    export_hf(params, config, str(tmp_path))
    mesh = make_mesh(1, 2, 4)
    config2, sharded = load_hf(str(tmp_path), mesh=mesh)
    assert config2 == config
    expected = param_shardings(config, mesh)
    jax.tree.map(lambda leaf, s: leaf.sharding.is_equivalent_to(s, leaf.ndim) or pytest.fail(str(s)),
                 sharded, expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, params)


def test_load_preset_sharded_init_equals_unsharded():
    mesh = make_mesh(2, 2, 2)
    config, sharded, tokenizer = load_model("tiny-qwen3", mesh=mesh, rng=jax.random.PRNGKey(1))
    _, plain, _ = load_model("tiny-qwen3", rng=jax.random.PRNGKey(1))
    assert tokenizer is None
    assert sharded["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, plain)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    from appo_jax.parallel.multihost import initialize_distributed, process_summary

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("COORDINATOR_ADDRESS", raising=False)
    assert initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="without a coordinator_address"):
        initialize_distributed(num_processes=4, process_id=1)
    assert process_summary().startswith("process 0/1: 8 local of 8 devices")
