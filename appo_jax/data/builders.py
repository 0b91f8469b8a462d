"""TFDS builder for every benchmark and RL set, writing ``array_record`` files and read back without TensorFlow.

One `tfds.core.GeneratorBasedBuilder` (``appo_data``) with one `BuilderConfig` per dataset in
`appo_jax.data.rows.DATASETS` (``appo_data/gsm8k``, ``appo_data/train_10k``, ...), each with the dataset's single
split (``test`` for benchmarks; ``train`` / ``valid`` / ``test`` for the RL sets). Examples are the validated
`Record` fields, written in raw-file order (shuffling disabled) so row ``i`` of the prepared split is record ``i``
of `read_records`. Reading uses ``builder.as_data_source`` (random access into the array_record shards with
numpy-decoded features), which needs no TensorFlow.

Prepared data is cached under ``<tfds_dir>/<dataset>-<sha256 of the raw file, 16 hex>/``, so editing or
swapping the raw file (or pointing at another data dir) never serves stale examples.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from typing import Any

import tensorflow_datasets as tfds

from appo_jax.data.paths import resolve_data_dir, resolve_tfds_dir
from appo_jax.data.rows import DATASETS, Record, get_spec, raw_path, read_records

log = logging.getLogger(__name__)

FEATURES = tfds.features.FeaturesDict(
    {
        "id": tfds.features.Text(),
        "question": tfds.features.Text(),
        "ground_truths": tfds.features.Sequence(tfds.features.Text()),
        "data_source": tfds.features.Text(),
        "ability": tfds.features.Text(),
        "prompt": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
    }
)


def encode_record(record: Record) -> dict[str, Any]:
    """A `Record` as a TFDS example of `FEATURES` (the ``dataset`` field is the builder config's name)."""
    return {
        "id": record.id,
        "question": record.question,
        "ground_truths": list(record.ground_truths),
        "data_source": record.data_source,
        "ability": record.ability,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in record.prompt],
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(example: dict[str, Any], dataset: str) -> Record:
    """Inverse of `encode_record` for an example read back by ``as_data_source`` (Text features come as bytes)."""
    prompt = example["prompt"]
    return Record(
        id=_text(example["id"]),
        question=_text(example["question"]),
        ground_truths=[_text(g) for g in example["ground_truths"]],
        data_source=_text(example["data_source"]),
        dataset=dataset,
        ability=_text(example["ability"]),
        prompt=[{"role": _text(r), "content": _text(c)} for r, c in zip(prompt["role"], prompt["content"])],
    )


class AppoData(tfds.core.GeneratorBasedBuilder):
    """The appo-jax datasets as TFDS; pick one with ``config=<name>`` and pass ``raw_data_dir`` (the data dir)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records: id, question, ground_truths, data_source, ability, prompt."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"{spec.kind} set read from <data dir>/{spec.path}")
        for name, spec in DATASETS.items()
    ]

    def __init__(self, *, raw_data_dir: str | os.PathLike | None = None, **kwargs: Any):
        self._raw_data_dir = raw_data_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="appo-jax benchmark / RL records (question, ground truths, chat prompt).",
            features=FEATURES,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        spec = get_spec(self.builder_config.name)
        return {spec.split: self._generate_examples(spec.name)}

    def _generate_examples(self, name: str):
        for index, record in enumerate(read_records(name, self._raw_data_dir)):
            yield index, encode_record(record)


def prepared_builder(
    name: str, data_dir: str | os.PathLike | None = None, tfds_dir: str | os.PathLike | None = None
) -> AppoData:
    """The `AppoData` builder for dataset `name`, prepared (array_record) on first use and cached after.

    Before a first preparation every raw row is validated (`read_records`), so a malformed file fails with one
    `DataFormatError` naming file and line before TFDS starts; TFDS's own progress output is silenced (one log
    line says what is prepared where).
    """
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    path = raw_path(spec.name, root)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    builder = AppoData(
        config=spec.name,
        data_dir=os.fspath(resolve_tfds_dir(tfds_dir) / f"{spec.name}-{digest}"),
        file_format="array_record",
        raw_data_dir=root,
    )
    if not builder.is_prepared():
        count = len(read_records(spec.name, root))
        log.info("preparing %s (%d records from %s) into %s", spec.name, count, path, builder.data_dir)
        tfds.display_progress_bar(False)
        with contextlib.redirect_stdout(sys.stderr), _quiet_absl():
            builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _quiet_absl():
    """Silence TFDS's absl INFO lines ("Downloading and preparing dataset ...") for the duration."""
    from absl import logging as absl_logging
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    tfds_dir: str | os.PathLike | None = None,
) -> list[Record]:
    """The first `limit` (default: all) records of `split` of dataset `name`, read through the TFDS builder.

    The dataset is prepared into the TFDS cache (`resolve_tfds_dir`) on first use, then read with
    ``as_data_source``; the result equals ``read_records(name, data_dir)[:limit]``. Raises ``ValueError`` for an
    unknown dataset, a split it does not have, or a negative limit.
    """
    spec = get_spec(name)
    if split != spec.split:
        raise ValueError(f"dataset {spec.name!r} has only the split {spec.split!r}, got split {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    source = prepared_builder(spec.name, data_dir, tfds_dir).as_data_source(split=spec.split)
    count = len(source) if limit is None else min(limit, len(source))
    if count == 0:
        return []
    return [decode_record(example, spec.name) for example in source.__getitems__(range(count))]
