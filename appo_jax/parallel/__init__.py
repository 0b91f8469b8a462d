"""Device mesh (data, fsdp, tensor), logical-axis sharding rules, multi-host start-up."""
from appo_jax.parallel.mesh import MESH_AXES, make_mesh
from appo_jax.parallel.rules import (DEFAULT_RULES, activation_sharding, batch_sharding, cache_shardings,
                                     logical_to_sharding, logical_to_spec, param_shardings, shard_params)

__all__ = [
    "MESH_AXES", "make_mesh", "DEFAULT_RULES", "activation_sharding", "batch_sharding", "cache_shardings",
    "logical_to_sharding", "logical_to_spec", "param_shardings", "shard_params",
]
