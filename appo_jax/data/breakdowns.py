"""The fields a benchmark's results are broken down by (the paper's Table 2): GAIA's ``level``, WebWalker's
``difficulty`` and HLE's ``category``, read from the benchmark's own raw rows.

``record_breakdowns(name)`` maps each record id (the same id `appo_jax.data.rows.read_records` gives it: the
row's id field, else its 0-based row index) to ``{field: value}``; a benchmark without breakdown fields maps to
``{}``. A row that lacks the field gets the value ``"unknown"``, so no answer silently drops out of a breakdown.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from appo_jax.data.rows import jsonl_rows, get_spec, raw_path

#: benchmark -> (field name in the results, how to read it from a raw row)
BREAKDOWNS: dict[str, tuple[str, Callable[[dict], Any]]] = {
    "gaia": ("level", lambda row: row.get("Level")),
    "webwalker": ("difficulty", lambda row: (row.get("info") or {}).get("difficulty_level")),
    "hle": ("category", lambda row: row.get("category")),
}


def record_breakdowns(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """``{record id: {field: value}}`` for benchmark ``name`` (module doc)."""
    spec = get_spec(name)
    if spec.name not in BREAKDOWNS or spec.kind != "benchmark":
        return {}
    field, read = BREAKDOWNS[spec.name]
    out = {}
    for index, (_, _, row) in enumerate(jsonl_rows(raw_path(name, data_dir))):
        rid = str(index) if spec.id_field is None else str(row.get(spec.id_field, index))
        value = read(row) if isinstance(row, dict) else None
        out[rid] = {field: "unknown" if value is None or value == "" else str(value)}
    return out
