"""Host data parallelism for rollouts: each process samples its block of the prompt groups, every process gets
the whole batch (docs/multihost.md).

:class:`HostShardedEngine` wraps the process-local :class:`~appo_jax.rollout.engine.RolloutEngine` (a sampler on
this host's devices, this host's tools and reward threads) behind the same batch methods, so every rollout
strategy runs unchanged on a pod: a call with ``G`` prompt groups (the same on every process) samples groups
``[p G / P, (p + 1) G / P)`` here, with the row keys those groups have in a one-process run
(``RolloutEngine.key_group_offset``), and returns the concatenation of every process's rows in process order,
i.e. exactly the batch one process would have built (group ids, parent rows and tree ids renumbered). For
APPO / GRPO / DAPO the sampled tokens are therefore those of a one-process run with the same seeds; ARPO / AEPO
and Tree-GRPO draw their branching decisions from one seed per host (``fold_in(key, p)``), so they are valid
but not bit-equal to one process.

``set_params(global_params)`` copies the train state's parameters to this host's sampler (a gather where they
are sharded across hosts) and accumulates the seconds spent in ``param_copy_s``; ``params`` is that copy.
``gather_s`` accumulates the seconds spent exchanging rollout rows between hosts.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np

from appo_jax.core.trajectory import Trajectory
from appo_jax.data.records import Record
from appo_jax.parallel.multihost import gather_objects, gather_rows, to_host
from appo_jax.rollout.engine import RolloutBatch, RolloutEngine


def _shift(ids: np.ndarray, by: int) -> np.ndarray:
    """``ids + by`` where ``ids >= 0`` (-1 = none stays -1)."""
    ids = np.asarray(ids)
    return np.where(ids >= 0, ids + by, ids).astype(ids.dtype)


class HostShardedEngine:
    """This process's share of every rollout batch (module doc). ``place_params(host_params)`` puts numpy
    parameters where the local sampler wants them."""

    def __init__(self, engine: RolloutEngine, process_index: int, process_count: int,
                 place_params: Callable, params):
        self.local, self.index, self.count = engine, int(process_index), int(process_count)
        self.place_params = place_params
        self.params = params  # this host's copy, as the local sampler uses it
        self.param_copy_s = 0.0
        self.gather_s = 0.0  # seconds spent exchanging rows between hosts

    def __getattr__(self, name):  # pad_id, cfg, tokenizer, stats, describe, ...: the local engine's
        return getattr(self.local, name)

    def describe(self) -> str:
        return f"{self.local.describe()} on each of {self.count} hosts"

    def close(self) -> None:
        self.local.close()

    def set_params(self, params) -> None:
        """The train state's (global) parameters to this host's sampler; the seconds go to ``param_copy_s``."""
        t0 = time.perf_counter()
        local = self.place_params(to_host(params))
        jax.block_until_ready(local)
        self.local.set_params(local)
        self.params = local
        self.param_copy_s += time.perf_counter() - t0

    # -- the block of groups of this process ------------------------------------------------------------------
    def _block(self, num_groups: int) -> slice:
        if num_groups % self.count:
            raise ValueError(f"{num_groups} prompt groups do not split over {self.count} processes; make "
                             "train.prompts_per_step a multiple of the process count")
        per = num_groups // self.count
        return slice(self.index * per, (self.index + 1) * per)

    def _gather(self, batch: RolloutBatch, group_shift: int, row_shift: int) -> RolloutBatch:
        """Every process's local ``batch`` with group ids shifted by ``group_shift`` and parent / tree rows by
        ``row_shift`` (this process's offsets), concatenated in process order."""
        t0 = time.perf_counter()
        t = batch.traj
        traj = t.replace(group_id=_shift(t.group_id, group_shift), parent=_shift(t.parent, row_shift))
        arrays = gather_rows({"traj": traj, "accuracy": batch.accuracy, "format_ok": batch.format_ok,
                              "tree_id": _shift(batch.tree_id, row_shift)})
        texts, calls = [], []
        for p_texts, p_calls in gather_objects((batch.texts, batch.tool_calls)):
            texts += p_texts
            calls += p_calls
        self.gather_s += time.perf_counter() - t0
        return RolloutBatch(arrays["traj"], texts, calls, arrays["accuracy"], arrays["tree_id"], arrays["format_ok"])

    # -- the engine's batch methods ----------------------------------------------------------------------------
    def initial_batch(self, prompts: Sequence[Record], n_init: int, key, progress=None) -> RolloutBatch:
        block = self._block(len(prompts))
        self.local.key_group_offset = block.start
        local = self.local.initial_batch(list(prompts[block]), n_init, key, progress)
        return self._gather(local, block.start, block.start * n_init)

    def branches_batch(self, parents: Trajectory, prompts: Sequence[Record], rows, positions, scores, valid,
                       key, progress=None) -> RolloutBatch:
        rows, valid = np.asarray(rows), np.asarray(valid, bool)
        block = self._block(rows.shape[0])
        if parents.num_rows % self.count:
            raise ValueError(f"{parents.num_rows} parent rows do not split over {self.count} processes")
        per_rows = parents.num_rows // self.count
        first = self.index * per_rows
        mine = rows[block]
        if np.any(valid[block] & ((mine < first) | (mine >= first + per_rows))):
            raise ValueError(f"process {self.index}: a branch of its groups {block.start}..{block.stop - 1} "
                             f"continues a row outside its parent rows {first}..{first + per_rows - 1}")
        local_parents = jax.tree.map(lambda x: np.asarray(x)[first:first + per_rows], parents)
        local_parents = local_parents.replace(group_id=_shift(local_parents.group_id, -block.start),
                                              parent=_shift(local_parents.parent, -first))
        self.local.key_group_offset = block.start
        local = self.local.branches_batch(local_parents, list(prompts[block]),
                                          np.where(valid[block], mine - first, 0), np.asarray(positions)[block],
                                          np.asarray(scores)[block], valid[block], key, progress)
        return self._gather(local, block.start, first)

    def arpo_batch(self, prompts: Sequence[Record], n: int, n_init: int, key, penalty: float = 0.0,
                   progress=None) -> RolloutBatch:
        block = self._block(len(prompts))
        self.local.key_group_offset = block.start
        local = self.local.arpo_batch(list(prompts[block]), n, n_init, jax.random.fold_in(key, self.index),
                                      penalty, progress)
        return self._gather(local, block.start, block.start * n)

    def tree_batch(self, prompts: Sequence[Record], n: int, n_init: int, key, progress=None) -> RolloutBatch:
        block = self._block(len(prompts))
        self.local.key_group_offset = block.start
        local = self.local.tree_batch(list(prompts[block]), n, n_init, jax.random.fold_in(key, self.index),
                                      progress)
        return self._gather(local, block.start, block.start * n)
