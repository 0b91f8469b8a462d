"""The one dataset loader: benchmark and RL files (through TFDS) and generated tasks, by name."""
from __future__ import annotations

import os
from typing import Any, Mapping

from appo_jax.data import arith_program, kb_multihop
from appo_jax.data.encoding import encode_records
from appo_jax.data.records import Record
from appo_jax.data.rows import DATASETS
from appo_jax.data.tasks import Task
from appo_jax.data.toy_arithmetic import TOY_ARITHMETIC

KB_MULTIHOP = Task(
    "kb_multihop", ("train", "heldout"), kb_multihop.kb_records,
    lambda records, tools, options, seed: kb_multihop.kb_traces(records, tools, options, seed),
    options_type=kb_multihop.KbOptions, decision_spans=kb_multihop.decision_spans, search_backend="kb")
ARITH_PROGRAM = Task(
    "arith_program", ("train", "heldout"), arith_program.arith_records,
    lambda records, tools, options, seed: arith_program.arith_traces(records, tools, options, seed),
    options_type=arith_program.ArithOptions, decision_spans=arith_program.decision_spans)

#: Generated tasks by name (`appo_jax.data.tasks.Task`).
TASKS: dict[str, Task] = {t.name: t for t in (TOY_ARITHMETIC, KB_MULTIHOP, ARITH_PROGRAM)}


def dataset_names() -> list[str]:
    """Every loadable name: the file datasets, then the generated tasks."""
    return list(DATASETS) + list(TASKS)


def split_name(name: str) -> tuple[str, str | None]:
    """``"kb_multihop:heldout"`` -> ``("kb_multihop", "heldout")``; a name without a split -> ``(name, None)``."""
    base, _, split = str(name).partition(":")
    return base, split or None


def get_task(name: str) -> Task | None:
    """The generated task called ``name`` (case-insensitive; a ``:SPLIT`` suffix is ignored), or None for a file
    dataset / unknown name."""
    return TASKS.get(split_name(name)[0].lower())


def load_dataset(name: str, split: str | None = None, *, limit: int | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, tfds_dir: str | os.PathLike | None = None,
                 task_options: Mapping[str, Any] | None = None) -> list[Record]:
    """The records of ``split`` of dataset ``name`` (``NAME:SPLIT`` also selects it; default split: the file
    dataset's only split, a task's first). File datasets are read through their TFDS builder (`load_split`: the
    first ``limit`` records); generated tasks make ``limit`` records (their default count when None) from ``seed``
    and ``task_options`` (their difficulty knobs). ``ValueError`` names every known dataset for an unknown name."""
    base, named_split = split_name(name)
    split = split or named_split
    task = get_task(base)
    if task is not None:
        return task.records(split or task.splits[0], limit, seed, task_options)
    spec = DATASETS.get(base.lower())
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    if task_options:
        raise ValueError(f"dataset {name!r} is a file dataset; task options apply to generated tasks only")
    # deferred: start-up (tensorflow_datasets is imported on first use; package doc)
    from appo_jax.data.builders import load_split

    return load_split(spec.name, split or spec.split, data_dir, limit, tfds_dir)


def benchmark_prompts(name: str, tokenizer, *, max_prompt_len: int, limit: int | None = None, seed: int = 0,
                      data_dir: str | os.PathLike | None = None, system_prompt: str = "",
                      task_options: Mapping[str, Any] | None = None, budget_name: str = "max_prompt_len"
                      ) -> tuple[list[Record], list[Record], list]:
    """``(records, prompts, too_long)`` of an evaluation benchmark: :func:`load_dataset` (``task_options`` only
    for a generated task), then `encode_records`; ``ValueError`` naming ``budget_name`` when no question fits
    ``max_prompt_len``."""
    records = load_dataset(name, limit=limit or None, seed=seed, data_dir=data_dir or None,
                           task_options=task_options if get_task(name) is not None else None)
    prompts, too_long = encode_records(records, tokenizer, max_prompt_len=max_prompt_len,
                                       system_prompt=system_prompt)
    if not prompts:
        raise ValueError(f"benchmark {name!r}: no question fits {budget_name}={max_prompt_len}")
    return records, prompts, too_long
