"""The one dataset loader: benchmark and RL files (through TFDS) and generated tasks, by name."""
from __future__ import annotations

import os

from appo_jax.data.builders import load_split
from appo_jax.data.records import Record
from appo_jax.data.rows import DATASETS
from appo_jax.data.tasks import Task
from appo_jax.data.toy_arithmetic import TOY_ARITHMETIC

#: Generated tasks by name (`appo_jax.data.tasks.Task`).
TASKS: dict[str, Task] = {t.name: t for t in (TOY_ARITHMETIC,)}


def dataset_names() -> list[str]:
    """Every loadable name: the file datasets, then the generated tasks."""
    return list(DATASETS) + list(TASKS)


def get_task(name: str) -> Task | None:
    """The generated task called ``name`` (case-insensitive), or None for a file dataset / unknown name."""
    return TASKS.get(str(name).lower())


def load_dataset(name: str, split: str | None = None, *, limit: int | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, tfds_dir: str | os.PathLike | None = None
                 ) -> list[Record]:
    """The records of ``split`` of dataset ``name`` (default split: the file dataset's only split, a task's
    first). File datasets are read through their TFDS builder (`load_split`: the first ``limit`` records);
    generated tasks make ``limit`` records (their default count when None) from ``seed``. ``ValueError`` names
    every known dataset for an unknown name."""
    task = get_task(name)
    if task is not None:
        return task.records(split or task.splits[0], limit, seed)
    spec = DATASETS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return load_split(spec.name, split or spec.split, data_dir, limit, tfds_dir)
