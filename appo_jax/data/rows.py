"""The datasets, and reading + validating their raw rows into one uniform `Record`.

Each benchmark file has its own fields (``question`` / ``problem`` / ``Question``; ``answer`` as a string, an
integer, a list of aliases, or a GSM8K worked solution ending in ``#### <number>``); each RL parquet row has a
chat-format ``prompt``, ``reward_model.ground_truth``, ``data_source``, ``ability`` and ``extra_info``. Every
row becomes a `Record` whose ``ground_truths`` is a clean ``list[str]`` (aliases kept as separate strings,
surrounding whitespace stripped, GSM8K reduced to its final number without thousands separators) and whose
``prompt`` is the chat messages to send (the RL row's own messages, or the ARPO system prompt + the question for a
benchmark), with the system prompt's ``\\x08oxed`` escape bug fixed.

A row that cannot be read (bad JSON, wrong types, missing fields, duplicate id) raises `DataFormatError` naming
the file and the line (JSONL, 1-based) or row (parquet, 0-based). A well-formed row whose ground truths are all
blank cannot be scored: it is skipped with a logged warning naming the file and row (one such row exists, in
``rl/train_10k.parquet``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from appo_jax.data.paths import resolve_data_dir
from appo_jax.data.records import ABILITIES, DataFormatError, Record
from appo_jax.data.templates import fix_escape_bug, question_messages

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's raw file lives (relative to the data dir) and how to read its rows.

    kind: ``"benchmark"`` (JSONL rows) or ``"rl"`` (parquet rows in the verl chat format).
    ability: fixed ability for benchmarks; None for RL sets (per-row ``ability`` column, ``"qa"`` when null).
    answer_kind: ``"text"`` (a string or integer), ``"list"`` (list of alias strings) or ``"gsm8k"``.
    id_field: field holding the row id, or None to use the 0-based row index.
    """

    name: str
    path: str
    split: str
    kind: str
    ability: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    answer_kind: str = "text"
    id_field: str | None = None


def _bench(name: str, ability: str, answer_kind: str, **kw: Any) -> DatasetSpec:
    path = kw.pop("path", f"benchmarks/{kw.pop('dirname', name)}/test.jsonl")
    return DatasetSpec(name, path, "test", "benchmark", ability, answer_kind=answer_kind, **kw)


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        _bench("aime24", "math", "text", id_field="id"),
        _bench("aime25", "math", "text", question_field="problem", id_field="id"),
        _bench("math500", "math", "text"),
        _bench("gsm8k", "math", "gsm8k", id_field="idx"),
        _bench("hotpotqa", "qa", "list"),
        _bench("2wiki", "qa", "list"),
        _bench("musique", "qa", "list"),
        _bench("bamboogle", "qa", "list"),
        _bench("webwalker", "qa", "text"),
        _bench("gaia", "qa", "text", question_field="Question", id_field="task_id"),
        _bench("xbench", "qa", "list"),
        _bench("simpleqa", "qa", "list", dirname="SimpleQA"),
        _bench("hle", "qa", "text", path="benchmarks/hle_top.json", id_field="id"),
        DatasetSpec("train_10k", "rl/train_10k.parquet", "train", "rl"),
        DatasetSpec("valid", "rl/valid.parquet", "valid", "rl"),
        DatasetSpec("hard_search_1k", "rl/hard_search_1k.parquet", "train", "rl"),
        DatasetSpec("gaia_test", "rl/gaia_test.parquet", "test", "rl"),
        DatasetSpec("hle_test", "rl/hle_test.parquet", "test", "rl"),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The registered dataset called `name` (case-insensitive); ``ValueError`` listing the known names otherwise."""
    spec = DATASETS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return spec


def _clean_answers(values: list[Any], where: str) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise DataFormatError(f"{where}: answer must be a string or integer, got {type(v).__name__} {v!r}")
        s = str(v).strip()
        if s:
            out.append(s)
    return out


def _benchmark_answers(spec: DatasetSpec, raw: Any, where: str) -> list[str]:
    if spec.answer_kind == "list":
        if not isinstance(raw, list):
            raise DataFormatError(f"{where}: field {spec.answer_field!r} must be a list of strings, got {raw!r}")
        return _clean_answers(raw, where)
    if spec.answer_kind == "gsm8k":
        if not isinstance(raw, str) or "####" not in raw:
            raise DataFormatError(f"{where}: GSM8K field {spec.answer_field!r} has no '#### <answer>' line: {raw!r}")
        return _clean_answers([raw.rsplit("####", 1)[1].replace(",", "")], where)
    return _clean_answers([raw], where)


def _field(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataFormatError(f"{where}: missing field {key!r} (fields: {sorted(row)})")
    return row[key]


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value


def _benchmark_record(spec: DatasetSpec, row: dict, index: int, where: str) -> Record | None:
    question = _text(_field(row, spec.question_field, where), f"field {spec.question_field!r}", where)
    answers = _benchmark_answers(spec, _field(row, spec.answer_field, where), where)
    if spec.id_field is None:
        rid = str(index)
    else:
        raw_id = _field(row, spec.id_field, where)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise DataFormatError(f"{where}: id field {spec.id_field!r} must be a string or integer, got {raw_id!r}")
        rid = str(raw_id)
    if not answers:
        return None
    return Record(rid, question, answers, spec.name, spec.name, spec.ability, question_messages(question))


def _rl_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(prompt, list) or not prompt:
        raise DataFormatError(f"{where}: 'prompt' must be a non-empty list of chat messages, got {prompt!r}")
    messages = []
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataFormatError(f"{where}: chat message must have string 'role' and 'content', got {m!r}")
        content = fix_escape_bug(m["content"]) if m["role"] == "system" else m["content"]
        messages.append({"role": m["role"], "content": content})
    if messages[-1]["role"] != "user":
        raise DataFormatError(f"{where}: the last prompt message must be the user's, got role {messages[-1]['role']!r}")
    return messages


def _rl_record(spec: DatasetSpec, row: dict, index: int, where: str) -> Record | None:
    messages = _rl_messages(_field(row, "prompt", where), where)
    question = _text(messages[-1]["content"], "the user message", where)
    reward_model = _field(row, "reward_model", where)
    if not isinstance(reward_model, dict) or not isinstance(reward_model.get("ground_truth"), str):
        raise DataFormatError(f"{where}: 'reward_model.ground_truth' must be a string, got {reward_model!r}")
    data_source = _text(_field(row, "data_source", where), "'data_source'", where)
    ability = row.get("ability") or "qa"
    if ability not in ABILITIES:
        raise DataFormatError(f"{where}: 'ability' must be one of {ABILITIES} or null, got {ability!r}")
    extra = row.get("extra_info")
    raw_id = extra.get("index") if isinstance(extra, dict) else None
    rid = str(index if raw_id is None else raw_id)
    answers = _clean_answers([reward_model["ground_truth"]], where)
    if not answers:
        return None
    return Record(rid, question, answers, data_source, spec.name, ability, messages)


def jsonl_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield lineno, where, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataFormatError(f"{path}: cannot read parquet file: {err}") from None
    for index, row in enumerate(rows):
        yield index, f"{path}: row {index}", row


def raw_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The raw file of dataset `name` under the resolved data dir (``FileNotFoundError`` if it is missing)."""
    spec = get_spec(name)
    path = resolve_data_dir(data_dir) / spec.path
    if not path.is_file():
        raise FileNotFoundError(f"dataset {spec.name!r}: raw file {str(path)!r} does not exist")
    return path


def read_records(name: str, data_dir: str | os.PathLike | None = None) -> list[Record]:
    """All records of dataset `name`, read and validated straight from its raw file, in file order.

    Raises `DataFormatError` (file + line/row) for malformed rows or duplicate ids; skips, with a warning, rows
    whose ground truths are all blank.
    """
    spec = get_spec(name)
    path = raw_path(name, data_dir)
    rows = jsonl_rows(path) if spec.kind == "benchmark" else _parquet_rows(path)
    build = _benchmark_record if spec.kind == "benchmark" else _rl_record
    records: list[Record] = []
    seen: dict[str, str] = {}
    for i, (_, where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFormatError(f"{where}: expected an object/struct row, got {type(row).__name__}")
        record = build(spec, row, i, where)
        if record is None:
            log.warning("%s: skipped: no non-blank ground truth", where)
            continue
        if record.id in seen:
            raise DataFormatError(f"{where}: duplicate id {record.id!r} (first at {seen[record.id]})")
        seen[record.id] = where
        records.append(record)
    return records
