"""Where host arrays go: rows (axis 0) over the mesh's ``data x fsdp`` axes, or the default device; and back.

One `Placement` per run (the trainer's mesh, or None for one device) places every batch-shaped array: rollouts
for the log-prob recomputation, advantages, train batches, SFT batches. ``context()`` is the scope in which a
jitted model call must be traced so that its logical-axis activation constraints apply to that mesh. In a
multi-process run every process places the same host arrays (each keeps its own devices' rows) and ``host``
brings results back to every process.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.parallel.multihost import to_host
from appo_jax.parallel.rules import activation_sharding, batch_sharding


class Placement:
    """Puts host arrays on ``mesh`` (rows split over ``data x fsdp``) or, without a mesh, on the default device."""

    def __init__(self, mesh: jax.sharding.Mesh | None = None):
        self.mesh = mesh

    def rows(self, x) -> jax.Array:
        """``x`` with axis 0 split over ``data x fsdp`` (other axes replicated)."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

    def tree(self, tree):
        """Every leaf of a pytree of batch-shaped arrays placed with :meth:`rows`."""
        return jax.tree_util.tree_map(self.rows, tree)

    @staticmethod
    def host(tree):
        """Numpy values of a pytree of results on every process (`appo_jax.parallel.multihost.to_host`: rows
        spread over several hosts are gathered)."""
        return to_host(tree)

    def context(self):
        """The scope for tracing model calls on this mesh (a no-op without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        return activation_sharding(self.mesh)
