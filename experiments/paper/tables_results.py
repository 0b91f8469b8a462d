"""Reading a results directory ``DIR/<table>/<row>/`` (each an ``appo-jax eval --out`` directory) and computing the
cells of the paper's tables from its answers (mapping: `experiments/paper/tables_mapping.py`; docs/paper_tables.md).

A cell is recomputed from the saved answer rows with `appo_jax.evaluation.metrics.summarize` (never read from
``summary.json``): the answers of the column's benchmark, restricted to the questions whose breakdown value is one
of the column's values, scored with the column's metric, in percent. A cell with no answers is missing (None),
never invented.

Refused with :class:`~tables_mapping.TablesError` naming the directory: a ``<table>`` directory that is not
``table1`` .. ``table4``; a ``<row>`` that is not a known row of its table (the message lists them); a row
directory without ``settings.json`` or ``answers.jsonl``, or with a damaged row; answers from more than one
model_id, judge or sampling (also against ``settings.json``), or the same (benchmark, question, run) twice. One
row directory holds one checkpoint's answers: evaluate each checkpoint into its own directory.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tables_mapping import TABLES, Column, Row, TablesError, TableSpec, known_rows, table_specs

from appo_jax.data.breakdowns import record_breakdowns
from appo_jax.evaluation.metrics import summarize

SETTINGS_FILE, ANSWERS_FILE = "settings.json", "answers.jsonl"


@dataclasses.dataclass
class RowResults:
    """One row directory: ``rel`` = ``<table>/<row>``, its settings and answer rows."""

    path: Path
    rel: str
    settings: dict
    answers: list[dict]


def _read_answers(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # a row cut short by a kill: the eval would sample it again
                break
            raise TablesError(f"{path}:{i + 1}: not a JSON answer row") from None
    return rows


def _one_value(path: Path, what: str, settings_value, values: list) -> None:
    """Refuse ``path`` when ``values`` (one per answer) and ``settings_value`` are not all the same."""
    counts = Counter(json.dumps(v, sort_keys=True) for v in values)
    counts[json.dumps(settings_value, sort_keys=True)] += 0
    if len(counts) > 1:
        listed = "; ".join(f"{v} ({n} answer(s))" for v, n in counts.most_common())
        raise TablesError(f"{path}: answers from more than one {what}: {listed} ({SETTINGS_FILE} says "
                          f"{json.dumps(settings_value, sort_keys=True)}); one row directory holds one checkpoint's "
                          "answers made with one setting: evaluate each into its own directory")


def read_row_dir(path: Path, rel: str) -> RowResults:
    """The settings and answers of one row directory, checked to come from one model, judge and sampling."""
    if not (path / SETTINGS_FILE).is_file() or not (path / ANSWERS_FILE).is_file():
        raise TablesError(f"{path}: not an `appo-jax eval --out` directory (needs {SETTINGS_FILE} and "
                          f"{ANSWERS_FILE})")
    settings = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
    answers = _read_answers(path / ANSWERS_FILE)
    _one_value(path, "model_id", settings.get("model_id"), [a.get("model_id") for a in answers])
    _one_value(path, "judge", settings.get("judge"), [(a.get("judge") or {}).get("name") for a in answers])
    if "sampling" in settings:
        _one_value(path, "sampling", settings["sampling"], [a.get("sampling", settings["sampling"]) for a in answers])
    keys = Counter((a["benchmark"], str(a["question_id"]), int(a["run"])) for a in answers)
    twice = [k for k, n in keys.items() if n > 1]
    if twice:
        raise TablesError(f"{path}: answer {twice[0]} appears {keys[twice[0]]} times; the directory mixes two "
                          "evaluations")
    return RowResults(path, rel, settings, answers)


def load_results(results_dir: str | Path) -> dict[tuple[str, str], RowResults]:
    """Every row directory under ``results_dir``, keyed by (table, row); bad directories refused (module doc)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise TablesError(f"{root}: no such results directory")
    out = {}
    for table_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if table_dir.name not in TABLES:
            raise TablesError(f"{table_dir}: unknown table directory {table_dir.name!r}; expected one of "
                              f"{', '.join(TABLES)}")
        known = known_rows(table_dir.name)
        for row_dir in sorted(p for p in table_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if row_dir.name not in known:
                raise TablesError(f"{row_dir}: unknown row {row_dir.name!r} of {table_dir.name}; known rows: "
                                  f"{', '.join(known)}")
            out[(table_dir.name, row_dir.name)] = read_row_dir(row_dir, f"{table_dir.name}/{row_dir.name}")
    return out


@functools.cache
def shipped_breakdowns(benchmark: str) -> dict:
    """``{question id: {field: value}}`` of a benchmark (`appo_jax.data.breakdowns`; the data dir of
    ``$APPO_DATA_DIR``, else the shipped data)."""
    return record_breakdowns(benchmark)


def column_value(col: Column, answers: list[dict], breakdowns: Callable[[str], dict]) -> float | None:
    """The cell of ``col`` from ``answers`` in percent (module doc); None when no answer or no metric value."""
    if col.benchmark is None or col.avg:
        return None
    rows = [a for a in answers if a["benchmark"] == col.benchmark]
    if col.field:
        fields = breakdowns(col.benchmark)
        rows = [a for a in rows if fields.get(str(a["question_id"]), {}).get(col.field) in col.values]
    if not rows:
        return None
    scores = summarize(rows)[col.benchmark]
    value = scores.get(col.metric or scores["metric"])
    return None if value is None else 100.0 * value


@dataclasses.dataclass
class Cell:
    ours: float | None
    published: float | None

    @property
    def diff(self) -> float | None:
        return None if self.ours is None or self.published is None else self.ours - self.published


@dataclasses.dataclass
class BuiltRow:
    """A row of a written table: the published row, its cells, where its results came from (``rel``, None
    without a row directory), the provenance line and its parts (``info``: model_id, judge, runs, preset)."""

    row: Row
    cells: list[Cell]
    rel: str | None
    provenance: str
    info: dict


@dataclasses.dataclass
class BuiltTable:
    spec: TableSpec
    rows: list[BuiltRow]


def _average(spec: TableSpec, values: list[float | None]) -> float | None:
    have = [v for c, v in zip(spec.columns, values) if c.benchmark and not c.avg]
    return sum(have) / len(have) if have and all(v is not None for v in have) else None


def _runs(summary: dict) -> str:
    runs = sorted({s["runs"] for s in summary.values()})
    return str(runs[0]) if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"


def _provenance(spec: TableSpec, res: RowResults) -> tuple[str, dict]:
    answers = [a for a in res.answers if a["benchmark"] in spec.benchmarks()]
    summary = summarize(answers)
    s = res.settings
    info = {"model_id": s.get("model_id"), "judge": s.get("judge"), "preset": s.get("preset"),
            "runs": _runs(summary) if summary else ""}
    if not summary:
        return f"`{res.rel}`: no answers for this table's benchmarks (model `{info['model_id']}`)", info
    samp = s.get("sampling") or {}
    failed = sum(x["judge_failed"] for x in summary.values())
    line = (f"`{res.rel}`: model `{info['model_id']}`; judge {info['judge']}; {info['runs']} run(s) per question; "
            f"preset {info['preset']} (temperature {samp.get('temperature')}, top_p {samp.get('top_p')}); responses "
            f"<= {s.get('max_response_len')} tokens; {len(answers)} answers over {', '.join(sorted(summary))}"
            + (f"; {failed} failed judgement(s) left out of pass@k" if failed else ""))
    return line, info


def build_row(spec: TableSpec, row: Row, results: dict, breakdowns: Callable[[str], dict]) -> BuiltRow:
    res = results.get(row.source) if row.source else None
    answers = res.answers if res else []
    values = [column_value(c, answers, breakdowns) for c in spec.columns]
    values = [_average(spec, values) if c.avg else v for c, v in zip(spec.columns, values)]
    cells = [Cell(v, row.published.get(c.name)) for c, v in zip(spec.columns, values)]
    rel = "/".join(row.source) if row.source else None
    if res is not None:
        line, info = _provenance(spec, res)
    elif row.source:
        line, info = f"`{rel}`: no results (directory absent)", {}
    else:
        line, info = row.note or "no results directory", {}
    if row.source and row.note:
        line += f" ({row.note})"
    return BuiltRow(row, cells, rel, line, info)


def build_table(spec: TableSpec, results: dict, breakdowns: Callable[[str], dict] = shipped_breakdowns) -> BuiltTable:
    """Every published row of ``spec`` (present or not), then the rows of the results that no published row
    reads (``spec.name`` tables only), without published numbers."""
    rows = [build_row(spec, r, results, breakdowns) for r in spec.rows]
    read = {r.source for r in spec.rows}
    for table, key in sorted(k for k in results if k[0] == spec.name and k not in read):
        extra = Row(None, key, (table, key), {}, "not in the paper's table")
        rows.append(build_row(spec, extra, results, breakdowns))
    return BuiltTable(spec, rows)


def build_tables(results_dir: str | Path, breakdowns: Callable[[str], dict] = shipped_breakdowns) -> dict:
    """``{name: BuiltTable}`` for Tables 1-4 and ``table2_passk`` from ``results_dir`` (module doc)."""
    results = load_results(results_dir)
    return {name: build_table(spec, results, breakdowns) for name, spec in table_specs().items()}
