"""Multi-host start-up: one call before any other JAX use on every process of a TPU pod / multi-GPU job."""
from __future__ import annotations

import os

import jax

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    *,
    auto_detect: bool = False,
) -> bool:
    """Run jax.distributed.initialize when this is a multi-process job; return whether it ran.

    It runs when a coordinator address is given (argument or $JAX_COORDINATOR_ADDRESS) or when auto_detect=True
    (Cloud TPU pods, SLURM, ...: JAX detects the cluster itself). Otherwise (a single process: CPU, one GPU, one
    TPU VM) it does nothing. A second call is a no-op. After it, jax.devices() lists every host's devices and
    appo_jax.parallel.mesh.make_mesh builds a global mesh.
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
    jax.distributed.initialize(address, num_processes, process_id, local_device_ids)
    return True


def process_summary() -> str:
    """One line: process index / count and local / global device counts (for logs)."""
    return (f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} devices ({jax.devices()[0].platform})")
