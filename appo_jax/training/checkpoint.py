"""Orbax checkpoints of a training run: params, optimizer state, step, PRNG key, extra pytrees (e.g. the lagged
policy of the ``lagged`` Omega baseline) and a JSON ``meta`` record (RL iteration, data-iterator position,
config).

Layout: ``<directory>/<step>/{state,extra,meta}`` written by an ``orbax.checkpoint.CheckpointManager``
(asynchronous when ``async_save``; multi-host aware). Orbax writes each checkpoint into a temporary directory
and renames it only once every item is complete, so a crash or SIGKILL mid-save leaves the previous
checkpoints untouched and the partial one invisible (it is cleaned up at the next start). The last ``keep``
complete checkpoints are kept; older ones are deleted only after a newer one is complete.

A failed save (e.g. disk full) raises :class:`CheckpointError` naming the directory, the step, the cause and
the checkpoints that are still intact. Restoring onto a different mesh: pass a target whose leaves carry the
new shardings (``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` or arrays placed on the new mesh).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from appo_jax.training.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which, why, and what is still intact."""


def _state_tree(state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def _abstract(tree):
    """ShapeDtypeStructs (with shardings where the leaves have them) of a pytree of arrays / structs."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(leaf, tree)


_NO_SPACE_CODES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXT = ("No space left", "Disk quota exceeded", "File too large") + tuple(
    f"os_error_code='{code}'" for code in _NO_SPACE_CODES)


def _cause(err: BaseException) -> str:
    """A one-line reason; disk-full style failures (ENOSPC, EDQUOT, EFBIG, also when wrapped by TensorStore)
    are named as such."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_CODES:
            return f"no space left for the checkpoint ({seen.strerror or seen})"
        if any(text in str(seen) for text in _NO_SPACE_TEXT):
            return f"no space left for the checkpoint ({str(seen)[:300]})"
        seen = seen.__cause__ or seen.__context__
    return f"{type(err).__name__}: {str(err)[:300]}"


@contextlib.contextmanager
def _absl_errors_only():
    """orbax's absl warnings silenced for a moment (those that say nothing to a user: see the callers)."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_log.setLevel(level)


def _no_replica_slices_on_cpu() -> None:
    """On the CPU backend every replica of an array lies in host memory: orbax's replica-parallel save (its default
    outside GPUs: each replica writes a slice) compiles one slice program per device and array shape (1.7 s at the
    first save of a small model over 8 CPU devices) and writes nothing faster, so it is turned off there, as orbax
    does on GPUs. A checkpoint's layout and contents are the same either way."""
    if jax.default_backend() != "cpu":
        return
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_use_replica_parallel", False):
        with _absl_errors_only():  # orbax warns on every override of a type's handler: not news here
            ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
                use_replica_parallel=False, array_metadata_store=getattr(current, "_array_metadata_store", None)),
                override=True)


class Checkpointer:
    """Save / restore training checkpoints (module doc).

    ``save(step, state, meta, extra=None)`` starts a (possibly asynchronous) save of a complete checkpoint;
    errors of an asynchronous save surface at the next ``save`` / ``wait`` / ``close``. ``restore(target,
    step=None, extra_target=None)`` returns ``(state, meta, extra)`` placed like ``target``.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        _no_replica_slices_on_cpu()
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     enable_async_checkpointing=async_save,
                                                     cleanup_tmp_directories=True)
        try:
            self._manager = self._new_manager()
        except OSError as err:
            raise CheckpointError(f"cannot use checkpoint directory {str(self.directory)!r}: {_cause(err)}") from err
        self._pending: int | None = None

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "extra", "meta"))

    # -- queries --------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # -- saving ---------------------------------------------------------------------------------------------
    def _failed(self, step: int, err: BaseException) -> CheckpointError:
        # The manager's bookkeeping may already count the failed step in (and plan deletions); start a fresh
        # one that reads the directory again, so later saves never act on that stale view.
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 - the failure being reported is the one that matters
            pass
        self._remove_partial(step)
        self._manager = self._new_manager()
        intact = [s for s in self.all_steps() if s != step]
        return CheckpointError(
            f"saving checkpoint step {step} to {str(self.directory)!r} failed: {_cause(err)}. "
            f"Complete checkpoints still on disk: {intact or 'none'} (nothing was deleted).")

    def _remove_partial(self, step: int, settle_s: float = 0.5, limit_s: float = 15.0) -> None:
        """Delete the failed save's temporary directory (never a complete checkpoint). Writer threads of the
        failed save may still be finishing and re-create files in it, so it is removed again until it has stayed
        gone for ``settle_s`` (at most ``limit_s``); a later manager would otherwise trip over it."""
        deadline = time.monotonic() + limit_s
        pattern = f"{step}.orbax-checkpoint-tmp*"
        quiet_since = None
        while time.monotonic() < deadline:
            leftovers = list(self.directory.glob(pattern))
            if not leftovers:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle_s:
                    return
            else:
                quiet_since = None
                for path in leftovers:
                    shutil.rmtree(path, ignore_errors=True)
            time.sleep(0.05)

    def wait(self) -> None:
        """Block until the pending asynchronous save is complete (raises :class:`CheckpointError` if it failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure of the async writer is reported as one error
            step, self._pending = self._pending, None
            raise self._failed(step if step is not None else -1, err) from err
        self._pending = None

    def save(self, step: int, state: TrainState, meta: dict, extra: dict | None = None) -> None:
        """Save checkpoint ``step``: the state (params, opt_state, step, rng), ``extra`` pytrees and JSON ``meta``."""
        self.wait()
        items = dict(state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta))
        if extra:
            items["extra"] = ocp.args.StandardSave(extra)
        args = ocp.args.Composite(**items)
        self._pending = step
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as err:  # noqa: BLE001
            self._pending = None
            raise self._failed(step, err) from err

    # -- restoring ------------------------------------------------------------------------------------------
    def restore(self, target: TrainState, step: int | None = None,
                extra_target: dict | None = None) -> tuple[TrainState, dict, dict]:
        """Restore checkpoint ``step`` (default: the latest complete one) onto the shardings of ``target`` (a
        TrainState of arrays or ShapeDtypeStructs); ``extra_target`` likewise for the extra pytrees."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {str(self.directory)!r}")
        if step not in self.all_steps():
            raise CheckpointError(f"checkpoint step {step} not found in {str(self.directory)!r}; "
                                  f"available: {self.all_steps()}")
        items = dict(state=ocp.args.StandardRestore(_abstract(_state_tree(target))), meta=ocp.args.JsonRestore())
        if extra_target:
            items["extra"] = ocp.args.StandardRestore(_abstract(extra_target))
        args = ocp.args.Composite(**items)
        try:
            out = self._manager.restore(step, args=args)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"restoring checkpoint step {step} from {str(self.directory)!r} failed: "
                                  f"{type(err).__name__}: {err}") from err
        tree = out["state"]
        state = target.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"],
                               rng=tree["rng"])
        extra = dict(out["extra"]) if extra_target else {}
        return state, dict(out["meta"]), extra

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON meta of checkpoint ``step`` (default latest) without loading arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {str(self.directory)!r}")
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_checkpoint_params(directory: str | Path, step: int | None = None) -> tuple[dict, int]:
    """``(params, step)``: the parameters of checkpoint ``step`` (default: the latest complete one) under
    ``directory`` (``<workdir>/checkpoints``) as numpy arrays, on one process and any device count.
    :class:`CheckpointError` naming the directory and the steps it holds when there is none or ``step`` is absent."""
    import numpy as np

    directory = Path(directory).absolute()
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {str(directory)!r}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {str(directory)!r}; steps there: "
                              f"{', '.join(map(str, steps))}")
    path = directory / str(step) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # the step's own metadata file lies one level up: orbax warns that the item has none, which is expected
    with ocp.StandardCheckpointer() as ckpt, _absl_errors_only():
        tree = ckpt.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
                              is_leaf=lambda m: hasattr(m, "shape"))
        state = ckpt.restore(path, target)
    return jax.tree.map(np.asarray, state["params"]), step
