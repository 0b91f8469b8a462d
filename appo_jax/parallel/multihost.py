"""Multi-host start-up and the few host-level collectives of a multi-process run (docs/multihost.md).

``initialize_distributed`` is called once, before any other JAX use, on every process of a TPU pod / multi-GPU
job / several CPU processes. After it, the helpers below move host data between processes:

* ``gather_rows(tree)``: every process's host arrays (same shapes), concatenated along axis 0 in process order,
  on every process (``process_allgather(tiled=True)``);
* ``gather_objects(obj)``: a list of every process's picklable object, in process order;
* ``to_host(tree)``: numpy values of (possibly multi-host) ``jax.Array`` s on every process;
* ``reduce_timings(metrics)``: ``time/*`` entries become their maximum over processes.

With one process they are plain local operations (no collective).
"""
from __future__ import annotations

import os
import pickle

import jax
import numpy as np

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


class DistributedError(RuntimeError):
    """The processes of a multi-process job could not start together; the message says which and why."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    *,
    auto_detect: bool = False,
    heartbeat_timeout_s: int = 100,
    initialization_timeout_s: int = 300,
) -> bool:
    """Run jax.distributed.initialize when this is a multi-process job; return whether it ran.

    It runs when a coordinator address is given (argument or $JAX_COORDINATOR_ADDRESS) or when auto_detect=True
    (Cloud TPU pods, SLURM, ...: JAX detects the cluster itself). Otherwise (a single process: CPU, one GPU, one
    TPU VM) it does nothing. A second call is a no-op. After it, jax.devices() lists every host's devices and
    appo_jax.parallel.mesh.make_mesh builds a global mesh. CPU processes use gloo collectives.

    ``heartbeat_timeout_s``: a process that stops answering (killed, preempted, hung host) is declared dead after
    this long and every other process then aborts with JAX's "another task died" error instead of waiting forever
    in a collective. ``initialization_timeout_s``: how long to wait for the coordinator and every process to
    connect; past it a :class:`DistributedError` names the address and the process counts. Processes started
    with different ``num_processes`` all stop with one :class:`DistributedError` listing the counts.
    """
    if jax.distributed.is_initialized():
        return False
    address = coordinator_address or next((os.environ[k] for k in _ENV_HINTS if os.environ.get(k)), None)
    if address is None and not auto_detect:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(
                f"num_processes={num_processes} / process_id={process_id} given without a coordinator_address "
                "(or auto_detect=True)"
            )
        return False
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    if address is not None and process_id not in (None, 0):
        _wait_for_coordinator(address, initialization_timeout_s, process_id, num_processes)
    # only the CPU backend reads it; without it CPU processes cannot run cross-process collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(address, num_processes, process_id, local_device_ids,
                                   initialization_timeout=initialization_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except Exception as err:  # noqa: BLE001 - one clear line for every way the start-up can fail
        raise DistributedError(
            f"process {process_id} of {num_processes} could not join the job at coordinator {address!r} within "
            f"{initialization_timeout_s} s: {str(err).splitlines()[0][:300]}. Check that process 0 runs and "
            "listens at that address, that every process was given the same --num-processes, and that the "
            "process ids are distinct.") from err
    claimed = gather_objects(num_processes)
    if any(c is not None and c != jax.process_count() for c in claimed):
        raise DistributedError(
            f"the processes were started with different --num-processes {claimed} (listed by process id) but "
            f"{jax.process_count()} joined the job at {address}; start every process with the same count")
    return True


def _wait_for_coordinator(address: str, timeout_s: float, process_id, num_processes) -> None:
    """Block until ``address`` (HOST:PORT of process 0) accepts a TCP connection; a :class:`DistributedError`
    after ``timeout_s`` (JAX itself would abort the process without a word about the address)."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"process {process_id} of {num_processes}: the coordinator {address} did not answer within "
                    f"{timeout_s} s ({err.strerror or err}); start process 0 (it hosts the coordinator) with the "
                    "same --coordinator, or fix the address") from None
            time.sleep(0.5)


def process_summary() -> str:
    """One line: process index / count and local / global device counts (for logs)."""
    return (f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} devices ({jax.devices()[0].platform})")


def gather_rows(tree):
    """Every process's host arrays (equal shapes per leaf) concatenated along axis 0 in process order, on every
    process: ``concat_p tree_p``. One process: ``tree`` as numpy."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(jax.tree.map(np.asarray, tree), tiled=True))


def gather_objects(obj) -> list:
    """``[obj_0, ..., obj_{P-1}]``: every process's picklable ``obj`` on every process (pickled bytes padded to
    the longest and exchanged with :func:`gather_rows`)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = gather_rows(np.asarray([data.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everyone = gather_rows(padded[None])
    return [pickle.loads(everyone[p, :int(sizes[p])].tobytes()) for p in range(everyone.shape[0])]


def to_host(tree):
    """Numpy values of a pytree of arrays on every process. A ``jax.Array`` spread over several processes is
    gathered (a collective: every process must call it with the same tree); replicated and local arrays are
    read locally."""
    def leaf(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(leaf, tree)


def reduce_timings(metrics: dict) -> dict:
    """``metrics`` with every ``time/*`` entry replaced by its maximum over processes (the slowest host sets
    the pace of a synchronous step); other entries are computed from global data and already equal. Every
    process must call it with the same keys."""
    if jax.process_count() == 1:
        return metrics
    keys = sorted(k for k in metrics if k.startswith("time/"))
    if not keys:
        return metrics
    values = gather_rows(np.asarray([[float(metrics[k]) for k in keys]], np.float64))
    return {**metrics, **{k: float(v) for k, v in zip(keys, values.max(axis=0))}}
