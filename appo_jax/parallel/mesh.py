"""Device mesh with axes ("data", "fsdp", "tensor")."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 replaced by num_devices / (product of the others); ValueError
    naming the sizes when they do not multiply to num_devices."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill), got {sizes}")
    bad = {name: size for name, size in sizes.items() if size != -1 and (not isinstance(size, int) or size < 1)}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive ints or -1, got {bad}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"cannot fill mesh axis {fill[0]!r}: {num_devices} devices are not divisible by the product "
                f"{known} of the other axes {sizes}"
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh {sizes} has {known} devices but {num_devices} are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A Mesh of shape (data, fsdp, tensor) over `devices` (default: all of jax.devices(), every host), axis
    names MESH_AXES; -1 = fill with the remaining devices. With devices=None the order comes from
    mesh_utils.create_device_mesh (topology-aware on TPU); explicit `devices` are laid out row-major as given
    (tensor fastest)."""
    if devices is None:
        devices = jax.devices()
        grid = mesh_utils.create_device_mesh(
            resolve_mesh_shape(len(devices), data, fsdp, tensor), devices, allow_split_physical_axes=True
        )
    else:
        devices = list(devices)
        grid = np.asarray(devices, dtype=object).reshape(resolve_mesh_shape(len(devices), data, fsdp, tensor))
    return jax.sharding.Mesh(grid, MESH_AXES)


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    """A device-free mesh of shape (data, fsdp, tensor) for planning (shardings and per-device bytes)."""
    for name, size in zip(MESH_AXES, (data, fsdp, tensor)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name!r} must be a positive int for planning, got {size!r}")
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)
