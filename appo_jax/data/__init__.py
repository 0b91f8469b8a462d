"""Questions in, one prompt type out: benchmark and RL files (validated rows, TFDS builders without TensorFlow),
generated tasks, prompt templates and the prompt encoder. See docs/data.md.

The TFDS builders (`AppoData`, `load_split`, `prepared_builder`) are imported on first use: importing
tensorflow_datasets takes ~0.5 s, which every process that only trains on a generated task would otherwise pay."""
import importlib

from appo_jax.data.encoding import encode_prompt, encode_records, with_system_prompt
from appo_jax.data.loading import TASKS, dataset_names, get_task, load_dataset
from appo_jax.data.paths import resolve_data_dir, resolve_tfds_dir
from appo_jax.data.records import ABILITIES, DataFormatError, Record
from appo_jax.data.rows import DATASETS, DatasetSpec, get_spec, read_records
from appo_jax.data.tasks import Task
from appo_jax.data.templates import SYSTEM_PROMPT, apply_chat_template, fix_escape_bug, question_messages

__all__ = [
    "ABILITIES",
    "AppoData",
    "DATASETS",
    "DataFormatError",
    "DatasetSpec",
    "Record",
    "SYSTEM_PROMPT",
    "TASKS",
    "Task",
    "apply_chat_template",
    "dataset_names",
    "encode_prompt",
    "encode_records",
    "fix_escape_bug",
    "get_spec",
    "get_task",
    "load_dataset",
    "load_split",
    "prepared_builder",
    "question_messages",
    "read_records",
    "resolve_data_dir",
    "resolve_tfds_dir",
    "with_system_prompt",
]

_BUILDERS = ("AppoData", "load_split", "prepared_builder")


def __getattr__(name: str):
    if name in _BUILDERS:
        return getattr(importlib.import_module("appo_jax.data.builders"), name)
    raise AttributeError(f"module 'appo_jax.data' has no attribute {name!r}")
