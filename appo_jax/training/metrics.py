"""Per-step metrics: ``<workdir>/metrics.jsonl`` (one JSON object per logged step), TensorBoard event files
under ``<workdir>/tensorboard`` (tensorboardX) and a tqdm progress bar.

Every record has ``"step"`` (the RL iteration, 1-based) and flat ``"group/name"`` float keys. On resume the
JSONL file is cut back to the steps ``<= start_step`` (a killed run may have logged steps after its last
checkpoint), so the file always describes one consistent run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

PROGRESS_KEYS = ("reward/mean", "train/loss", "branch/count", "throughput/rollout_tokens_per_s", "time/step_s")


def _scalar(value: Any) -> float | None:
    try:
        v = float(np.asarray(value))
    except (TypeError, ValueError):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (missing file -> [])."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without torch when torch is not loaded yet: ``tensorboardX.writer``
    imports torch, if it is installed, only to widen a type annotation, and that import costs a training process
    ~4 s of start-up. We log Python floats, which never touch torch; while tensorboardX loads, ``import torch``
    raises ImportError (the path tensorboardX takes when torch is absent)."""
    if "tensorboardX.writer" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
        try:
            import tensorboardX.writer  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter
    return SummaryWriter


class MetricsWriter:
    """Writes metrics (module doc). ``start_step``: last completed step of a resumed run (0 for a new one);
    ``primary=False`` (a process other than 0 of a multi-host run) writes nothing and shows no progress bar."""

    def __init__(self, workdir: str | Path, *, total_steps: int | None = None, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, primary: bool = True):
        self.workdir = Path(workdir)
        self.primary = primary
        self._file = self._tb = self._bar = None
        if not primary:  # another process of a multi-host run: process 0 writes the (global) metrics
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            self._tb = summary_writer_class()(str(self.workdir / "tensorboard"), purge_step=start_step + 1)
        self._bar = None
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="iteration", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any], advance: bool = True) -> dict[str, float]:
        """Log the scalar entries of ``metrics`` at ``step``; non-finite values are written as null (JSON) and
        skipped in TensorBoard; the progress bar moves one step when ``advance``. Returns the record written."""
        record: dict[str, Any] = {"step": int(step)}
        for key in sorted(metrics):
            v = _scalar(metrics[key])
            if v is None:
                continue
            record[key] = v if math.isfinite(v) else None
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(key, v, int(step))
        if not self.primary:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._bar is not None and advance:
            names = {"reward/mean": "reward", "throughput/rollout_tokens_per_s": "rollout tok/s"}
            shown = {names.get(k, k.split("/")[-1]): f"{record[k]:.3g}" for k in PROGRESS_KEYS
                     if record.get(k) is not None}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        return record

    def log_text(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def summarize(records: Iterable[dict], keys: Iterable[str]) -> dict[str, dict[str, float | None]]:
    """``{key: {"first": v0, "last": v_end, "mean": mean}}`` over the records that have the key."""
    records = list(records)
    out = {}
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            out[key] = {"first": values[0], "last": values[-1], "mean": float(np.mean(values))}
    return out
