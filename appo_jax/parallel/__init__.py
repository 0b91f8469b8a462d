"""Device mesh (data, fsdp, tensor), logical-axis sharding rules, placement of batches, multi-host start-up.

Nothing here knows about models: shardings come from logical axis names and shapes (`appo_jax.models.sharding`
applies them to a model's parameters and KV cache).
"""
from appo_jax.parallel.mesh import MESH_AXES, abstract_mesh, make_mesh
from appo_jax.parallel.placement import Placement
from appo_jax.parallel.rules import (DEFAULT_RULES, activation_sharding, batch_sharding, logical_to_sharding,
                                     logical_to_spec, sharded_bytes)

__all__ = [
    "MESH_AXES", "abstract_mesh", "make_mesh", "Placement", "DEFAULT_RULES", "activation_sharding",
    "batch_sharding", "logical_to_sharding", "logical_to_spec", "sharded_bytes",
]
