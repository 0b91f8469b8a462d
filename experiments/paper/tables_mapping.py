"""Where each number of the paper's Tables 1-4 comes from in our results: the mapping from each published row to
a results directory and from each published column to a benchmark, breakdown and metric (docs/paper_tables.md;
`experiments/paper/tables_results.py` reads the directories, `experiments/paper/tables.py` writes the tables).

Results directory: ``DIR/<table>/<row>/``, each an ``appo-jax eval --out`` directory (``settings.json`` +
``answers.jsonl``), ``<table>`` one of ``table1`` .. ``table4`` and ``<row>`` a row key of that table's config file
(``ROWS`` of ``experiments/paper/table1_reasoning.py`` etc.: the paper's hyperparameters; ``<row>,official`` for
the official scripts' set) or one of the evaluate-only rows below. The published rows read the paper's set;
``,official`` rows and config rows the paper does not report (``omega_only`` ...) are appended to their table
without published numbers.

Rows (published name -> results directory):

* Table 1: ``<backbone>,<method>`` with backbone ``llama3.1-8b`` (Llama3.1-8B-Instruct) / ``qwen2.5-7b``
  (Qwen2.5-7B-Instruct) and method GRPO ``grpo``, Reinforce++ ``reinforce_pp``, DAPO ``dapo``, GPPO ``gppo``,
  CISPO ``cispo``, GIGPO ``gigpo``, ARPO ``arpo``, APPO ``appo``; the untrained backbone's rows are
  evaluate-only: Zero-shot ``zero_shot``, TIR Prompting ``tir_prompting``.
* Table 2: ``qwen3-8b`` / ``qwen3-14b`` with ``base`` (evaluate-only: the untrained backbone), ``grpo``, ``arpo``,
  ``appo``. The pass@k numbers of the paper's text (GAIA / WebWalkerQA, Qwen3-14B ARPO and APPO) are a separate
  table ``table2_passk`` read from the same directories.
* Table 3: "ARPO (M=16)" -> ``ARPO_M16``; "M=4 N2B1" -> ``N2_B1`` (N initial, B branches, L levels:
  ``N<n>_B<b>[_L<l>]``, also for the appendix's Avg-only rows "N1B2L3" -> ``N1_B2_L3``).
* Table 4: ``<backbone>,<ablation>`` with the config file's ``PAPER_LABELS``: APPO ``appo``, "BS->Entropy"
  ``entropy_only``, "w/o future-value advantage scaling" ``no_future_kl``, "w/o dual-group" ``no_dual_group``.

Columns (published name -> benchmark [breakdown], metric): the metric is the paper's: F1 on hotpotqa, 2wiki,
musique, bamboogle, judge accuracy (pass@1 over the runs) elsewhere (`appo_jax.evaluation.metrics.summarize`).
Table 2's GAIA levels, WebWalkerQA difficulties and HLE groups pool the answers whose question has that
breakdown value (`appo_jax.data.breakdowns.record_breakdowns`); HLE NS = Math + Physics + Chemistry +
Biology/Medicine, CE = Computer Science/AI + Engineering, SF = Humanities/Social Science + Other (the grouping
under which the paper's HLE Avg is the question-weighted mean of NS / CE / SF in 7 of its 8 rows; docs/paper_tables.md
§Columns). Table 1's
MATH has no data set here (always missing). "Avg" of Tables 1, 3, 4 is the mean of the row's other columns that
have a data set here, given only when all of them are present; "GAIA Avg" etc. are the whole benchmark.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path

from appo_jax.evaluation.metrics import F1_BENCHMARKS

HERE = Path(__file__).resolve().parent
PUBLISHED_JSON = HERE / "published.json"
TABLES = ("table1", "table2", "table3", "table4")
CONFIG_FILES = {"table1": "table1_reasoning.py", "table2": "table2_deep_search.py", "table3": "table3_budgets.py",
                "table4": "table4_ablations.py"}
#: rows evaluated from the untrained backbone (no config row trains them)
EVAL_ONLY = {"table1": ("zero_shot", "tir_prompting"), "table2": ("base",)}

BACKBONES = {"Llama3.1-8B-Instruct": "llama3.1-8b", "Qwen2.5-7B-Instruct": "qwen2.5-7b", "Qwen3-8B": "qwen3-8b",
             "Qwen3-14B": "qwen3-14b"}
METHODS = {"Zero-shot": "zero_shot", "TIR Prompting": "tir_prompting", "base": "base", "GRPO": "grpo",
           "Reinforce++": "reinforce_pp", "DAPO": "dapo", "GPPO": "gppo", "CISPO": "cispo", "GIGPO": "gigpo",
           "ARPO": "arpo", "APPO": "appo"}
#: Table 4's labels -> ablation; the config file's ``PAPER_LABELS`` when it has them
ABLATIONS = {"APPO": "appo", "BS->Entropy": "entropy_only", "w/o future-value advantage scaling": "no_future_kl",
             "w/o dual-group": "no_dual_group"}
HLE_GROUPS = {"NS": ("Math", "Physics", "Chemistry", "Biology/Medicine"),
              "CE": ("Computer Science/AI", "Engineering"), "SF": ("Humanities/Social Science", "Other")}
SIMPLE_COLUMNS = {"AIME24": "aime24", "AIME25": "aime25", "MATH500": "math500", "GSM8K": "gsm8k", "MATH": None,
                  "WebWalker": "webwalker", "HotpotQA": "hotpotqa", "2Wiki": "2wiki", "MuSiQue": "musique",
                  "Bamboogle": "bamboogle", "Xbench": "xbench", "GAIA Avg": "gaia", "WebWalkerQA Avg": "webwalker",
                  "HLE Avg": "hle"}


class TablesError(ValueError):
    """A results directory the tables cannot use (module doc)."""


@dataclasses.dataclass(frozen=True)
class Column:
    """A published column: ``benchmark`` (None: no data set here), the breakdown ``field`` and the ``values``
    pooled into it, the ``metric`` ("" = the paper's metric of the benchmark), or ``avg`` (mean of the others)."""

    name: str
    benchmark: str | None = None
    field: str | None = None
    values: tuple[str, ...] = ()
    metric: str = ""
    avg: bool = False

    def describe(self) -> str:
        if self.avg:
            return f"{self.name} = mean of the row's columns that have a data set here (all of them present)"
        if self.benchmark is None:
            return f"{self.name} = no data set here (always missing)"
        metric = self.metric or ("F1" if self.benchmark in F1_BENCHMARKS else "pass@1 (judge accuracy)")
        where = f" {self.field} in {{{', '.join(self.values)}}}" if self.field else ""
        return f"{self.name} = {self.benchmark}{where}, {metric}"



@dataclasses.dataclass(frozen=True)
class Row:
    """A published row: its ``group`` (backbone; None in Table 3), ``method`` name as published, the results it
    reads (``source`` = (table dir, row key); None: no config row), ``published`` {column: number}, ``note``."""

    group: str | None
    method: str
    source: tuple[str, str] | None
    published: dict
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.group} {self.method}" if self.group else self.method


@dataclasses.dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()

    def benchmarks(self) -> list[str]:
        return sorted({c.benchmark for c in self.columns if c.benchmark})


def load_published(path: Path = PUBLISHED_JSON) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def column_spec(name: str) -> Column:
    """The mapping of the published column ``name`` (module doc)."""
    if name == "Avg":
        return Column(name, avg=True)
    if name in SIMPLE_COLUMNS:
        return Column(name, SIMPLE_COLUMNS[name])
    if name.startswith("GAIA Lv"):
        return Column(name, "gaia", "level", (name[len("GAIA Lv"):],))
    if name.startswith("WebWalkerQA "):
        return Column(name, "webwalker", "difficulty", (name.split()[1].lower(),))
    if name.startswith("HLE ") and name[4:] in HLE_GROUPS:
        return Column(name, "hle", "category", HLE_GROUPS[name[4:]])
    raise KeyError(f"published column {name!r} has no mapping")


def budget_key(name: str) -> str:
    """Table 3's published row name -> its config row: "M=16 N4B3" -> ``N4_B3``, "N1B2L3" -> ``N1_B2_L3``."""
    m = re.search(r"N(\d+)B(\d+)(?:L(\d+))?$", name)
    if m is None:
        raise KeyError(f"Table 3 row {name!r} has no mapping")
    n, b, levels = m.groups()
    return f"N{n}_B{b}" + (f"_L{levels}" if levels else "")


def _grouped_rows(table: str, rows: dict, methods: dict) -> list[Row]:
    out = []
    for group, by_method in rows.items():
        for method, cells in by_method.items():
            key = methods[method]
            note = "" if key else "no config row (not implemented here)"
            source = (table, f"{BACKBONES[group]},{key}") if key else None
            out.append(Row(group, method, source, dict(cells), note))
    return out


def _table3_rows(spec: dict) -> list[Row]:
    out = []
    for name, cells in spec["rows"].items():
        key = "ARPO_M16" if name.startswith("ARPO") else budget_key(name)
        out.append(Row(None, name, ("table3", key), dict(cells)))
    for name, avg in spec.get("appendix_avg_only", {}).items():
        out.append(Row(None, name, ("table3", budget_key(name)), {"Avg": avg}, "appendix: only Avg published"))
    return out


def table_specs(published: dict | None = None) -> dict[str, TableSpec]:
    """Tables 1-4 and ``table2_passk`` (the pass@k numbers of the paper's text) with their mappings."""
    pub = published or load_published()
    specs = {}
    for name in TABLES:
        t = pub[name]
        if name == "table3":
            rows = _table3_rows(t)
        else:
            labels = getattr(_config_module("table4"), "PAPER_LABELS", ABLATIONS) if name == "table4" else METHODS
            rows = _grouped_rows(name, t["rows"], labels)
        columns = tuple(column_spec(c) for c in t["columns"])
        specs[name] = TableSpec(name, t["title"], columns, tuple(rows), tuple(t.get("notes", ())) + _avg_note(columns))
    specs["table2_passk"] = _passk_spec(pub["pass_at_k_text"])
    return specs


def _avg_note(columns: tuple[Column, ...]) -> tuple[str, ...]:
    data = [c.name for c in columns if c.benchmark]
    none = [c.name for c in columns if not c.benchmark and not c.avg]
    if not none or not any(c.avg for c in columns):
        return ()
    note = (f"Our Avg is the mean over the {len(data)} columns with a data set here ({', '.join(none)} has none); "
            f"the paper's is over all {len(data) + len(none)}.")
    return (note,)


def _passk_spec(text: dict) -> TableSpec:
    columns, cells = [], defaultdict(dict)
    for what, by_method in text.items():
        bench_name, _, group = what.partition(" ")
        bench = {"GAIA": "gaia", "WebWalkerQA": "webwalker"}[bench_name]
        for method, scores in by_method.items():
            for metric, value in scores.items():
                col = f"{bench_name} {metric}"
                if col not in [c.name for c in columns]:
                    columns.append(Column(col, bench, metric=metric))
                cells[(group, method)][col] = value
    rows = tuple(Row(g, m, ("table2", f"{BACKBONES[g]},{METHODS[m]}"), c) for (g, m), c in cells.items())
    return TableSpec("table2_passk", "pass@k in the paper's text (deep search)", tuple(columns), rows,
                     ("pass@k needs at least k runs per question (appo-jax eval --runs k).",))


@functools.cache
def _config_module(table: str):
    """The config file of ``table`` as a module (None while it does not exist)."""
    path = HERE / CONFIG_FILES[table]
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"paper_{table}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_rows(table: str) -> tuple[str, ...]:
    """The config file's ``ROWS`` and, where it selects a hyperparameter set (``select_row``), ``<row>,official``."""
    module = _config_module(table)
    rows = tuple(getattr(module, "ROWS", ()))
    if hasattr(module, "select_row"):
        rows += tuple(f"{r},official" for r in rows)
    return rows


@functools.cache
def known_rows(table: str) -> tuple[str, ...]:
    """The row keys a results directory of ``table`` may hold: its config file's ``ROWS``, the evaluate-only rows
    and the keys the published rows read."""
    keys = set(_config_rows(table))
    keys |= {f"{b},{m}" for m in EVAL_ONLY.get(table, ()) for b in _backbones(table)}
    keys |= {r.source[1] for s in table_specs().values() for r in s.rows if r.source and r.source[0] == table}
    return tuple(sorted(keys))


#: small backbones whose evaluate-only rows may be tabulated beside the paper's (the README's example row)
EXAMPLE_BACKBONES = ("smollm2-135m",)


def _backbones(table: str) -> tuple[str, ...]:
    own = ("qwen3-8b", "qwen3-14b") if table == "table2" else ("llama3.1-8b", "qwen2.5-7b")
    return own + EXAMPLE_BACKBONES
