"""Benchmark and RL data: raw-row validation, TFDS builders (array_record, no TensorFlow), prompt templates."""
from appo_jax.data.builders import AppoData, load_split, prepared_builder
from appo_jax.data.paths import resolve_data_dir, resolve_tfds_dir
from appo_jax.data.rows import DATASETS, DataFormatError, DatasetSpec, Record, get_spec, read_records
from appo_jax.data.templates import SYSTEM_PROMPT, apply_chat_template, fix_escape_bug, question_messages

__all__ = [
    "AppoData",
    "DATASETS",
    "DataFormatError",
    "DatasetSpec",
    "Record",
    "SYSTEM_PROMPT",
    "apply_chat_template",
    "fix_escape_bug",
    "get_spec",
    "load_split",
    "prepared_builder",
    "question_messages",
    "read_records",
    "resolve_data_dir",
    "resolve_tfds_dir",
]
