"""Logical axis names -> mesh axes: the sharding of any array from its logical axes and shape.

This layer knows nothing about models: it maps tuples of logical axis names (declared by the model, the KV cache,
the batch) to ``PartitionSpec`` / ``NamedSharding`` on a mesh (`appo_jax.models.sharding` applies it to a
model's parameters and cache).

Rules are applied in order (flax semantics): each logical axis of an array takes its rule's mesh axes unless one
of them is already used by an earlier-assigned axis of the same array (then it stays unsharded). With `shape`
given, a mesh assignment that does not divide the dimension is dropped too (the dim is replicated), e.g. 3 kv
heads on a tensor axis of 2.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "cache_batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "cache_kv_heads": "tensor",
    "mlp": "tensor",
    "embed": "fsdp",
    "head_dim": None,
    "layers": None,
    "norm": None,
}


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(
    names: tuple, mesh: jax.sharding.Mesh, rules: Mapping = DEFAULT_RULES, shape: tuple | None = None
) -> PartitionSpec:
    """PartitionSpec for one array with logical axis `names` (None entries stay unsharded). Mesh axes of size 1
    are dropped from the spec; see the module docstring for the priority / divisibility rules."""
    assigned: list = [None] * len(names)
    used: set[str] = set()
    for logical, mesh_axes in rules.items():
        if logical not in names:
            continue
        pos = names.index(logical)
        axes = tuple(a for a in _as_tuple(mesh_axes) if mesh.shape[a] > 1)
        if not axes or used.intersection(axes):
            continue
        if shape is not None and shape[pos] % math.prod(mesh.shape[a] for a in axes):
            continue
        assigned[pos] = axes[0] if len(axes) == 1 else axes
        used.update(axes)
    return PartitionSpec(*assigned)


def is_logical_axes(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def logical_to_sharding(logical_axes_tree, mesh: jax.sharding.Mesh, rules: Mapping = DEFAULT_RULES, shapes=None):
    """Pytree of NamedSharding for a pytree whose leaves are tuples of logical axis names. `shapes` (optional):
    a matching pytree of arrays / ShapeDtypeStructs, used to replicate dims the mesh axes do not divide."""
    if shapes is None:
        return jax.tree.map(
            lambda names: NamedSharding(mesh, logical_to_spec(names, mesh, rules)),
            logical_axes_tree,
            is_leaf=is_logical_axes,
        )
    return jax.tree.map(
        lambda leaf, names: NamedSharding(mesh, logical_to_spec(names, mesh, rules, tuple(leaf.shape))),
        shapes,
        logical_axes_tree,
    )


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """NamedSharding splitting axis 0 of an ndim-array over ("data", "fsdp"), the other axes replicated."""
    if ndim < 1:
        raise ValueError(f"batch_sharding needs ndim >= 1, got {ndim}")
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def sharded_bytes(shapes, logical_axes, mesh, rules: Mapping = DEFAULT_RULES, dtype=None) -> int:
    """``sum_leaves prod(shard_shape) * itemsize``: bytes one device holds for a pytree of ShapeDtypeStructs
    laid out by ``logical_axes`` (dims a mesh axis does not divide are replicated, as `logical_to_spec` does).
    ``mesh`` may be an ``AbstractMesh`` (planning without devices); ``dtype`` overrides the leaves' dtype."""
    def leaf_bytes(names, shape_struct):
        spec = logical_to_spec(names, mesh, rules, tuple(shape_struct.shape))
        shard = list(shape_struct.shape)
        for dim, axes in enumerate(spec):
            if axes is not None:
                shard[dim] //= math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        return math.prod(shard) * np.dtype(dtype or shape_struct.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(leaf_bytes, logical_axes, shapes, is_leaf=is_logical_axes)))


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: Mapping = DEFAULT_RULES):
    """Context in which the decoder's nn.with_logical_constraint annotations (batch / heads / mlp / vocab of
    activations) become sharding constraints on `mesh`; trace (jit) the model inside it. Outside any such
    context the constraints are no-ops and GSPMD propagates the parameter / input shardings."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules.items())):
        yield
