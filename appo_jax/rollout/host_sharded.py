"""Host data parallelism for rollouts: each process samples its block of the prompt groups, every process gets
the whole batch (docs/multihost.md).

:class:`HostShardedEngine` wraps the process-local :class:`~appo_jax.rollout.engine.RolloutEngine` (a sampler on
this host's devices, this host's tools and reward threads) and shards its one primitive, ``rollout(requests,
num_groups, rows_per_group, ...)``: a call with ``G`` prompt groups (the same requests on every process) runs the
requests of groups ``[p G / P, (p + 1) G / P)`` here (`RolloutEngine.rollout_block`) and returns the
concatenation of every process's rows in process order, i.e. exactly the batch one process would have built: the
requests carry global group indices, parent rows and sampling keys (``fold_in(fold_in(key, g), i)`` with the
global ``g``), and the tree ids are resolved on the gathered batch. Every rollout strategy runs unchanged on top
of it; a scheme that decides between calls (APPO's branch points, Tree-GRPO's node draws) decides on the gathered
batch with the same seed on every process, and ARPO / AEPO's in-loop draws are keyed by the global group and row
(which rollout of a group gets the group's last copies still follows the loop's scheduling, as on one process).

KV forks (``rollout.kv_fork``): the gathered batch keeps each row's ``slot`` in the sampler of the process that
ran it. A process builds branch requests only for its own groups, whose parents are its own rows, so the slots it
forks from are its own sampler's; ``kv_forked`` is the sum over the processes.

``set_params(global_params)`` copies the train state's parameters to this host's sampler (a gather where they
are sharded across hosts) and accumulates the seconds spent in ``param_copy_s``; ``params`` is that copy.
``gather_s`` accumulates the seconds spent exchanging rollout rows between hosts.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np

from appo_jax.parallel.multihost import gather_objects, gather_rows, to_host
from appo_jax.rollout.agent_loop import LoopHooks, RolloutRequest
from appo_jax.rollout.engine import RolloutBatch, RolloutEngine, resolve_tree_ids


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

    def __getattr__(self, name):  # pad_id, cfg, tokenizer, stats, request, branch_prefix, ...: the local engine's
        return getattr(self.local, name)

    def describe(self) -> str:
        """The local engine's description, on each host."""
        return f"{self.local.describe()} on each of {self.count} hosts"

    def close(self) -> None:
        """Close the local engine."""
        self.local.close()

    def set_params(self, params) -> None:
        """The train state's (global) parameters to this host's sampler; the seconds go to ``param_copy_s``."""
        t0 = time.perf_counter()
        local = self.place_params(to_host(params))
        jax.block_until_ready(local)
        self.local.set_params(local)
        self.params = local
        self.param_copy_s += time.perf_counter() - t0

    def own_groups(self, num_groups: int) -> range:
        """This process's block of ``num_groups`` prompt groups (an error when they do not split evenly)."""
        if num_groups % self.count:
            raise ValueError(f"{num_groups} prompt groups do not split over {self.count} processes; make "
                             "train.prompts_per_step a multiple of the process count")
        per = num_groups // self.count
        return range(self.index * per, (self.index + 1) * per)

    def rollout(self, requests: Sequence[RolloutRequest], num_groups: int, rows_per_group: int, *,
                hooks: LoopHooks | None = None, progress=None, parent_tree: np.ndarray | None = None) -> RolloutBatch:
        """`RolloutEngine.rollout` over every process: this process runs the requests of its block of groups,
        then the rows of all processes are gathered in process order (module doc)."""
        local = self.local.rollout_block(requests, self.own_groups(num_groups), rows_per_group, hooks=hooks,
                                         progress=progress)
        batch = self._gather(local)
        batch.tree_id = resolve_tree_ids(batch.traj.parent, batch.traj.row_valid, parent_tree)
        return batch

    def _gather(self, batch: RolloutBatch) -> RolloutBatch:
        """Every process's block ``batch`` (global group ids and parent rows already), concatenated in process
        order; the seconds go to ``gather_s``."""
        t0 = time.perf_counter()
        arrays = gather_rows({"traj": batch.traj, "accuracy": batch.accuracy, "format_ok": batch.format_ok,
                              "tree_id": batch.tree_id, "slot": batch.slot})
        texts, calls, forked = [], [], 0
        for p_texts, p_calls, p_forked in gather_objects((batch.texts, batch.tool_calls, batch.kv_forked)):
            texts += p_texts
            calls += p_calls
            forked += p_forked
        self.gather_s += time.perf_counter() - t0
        return RolloutBatch(arrays["traj"], texts, calls, arrays["accuracy"], arrays["tree_id"], arrays["format_ok"],
                            arrays["slot"], forked)
