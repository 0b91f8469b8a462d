"""Writing a built table (`experiments/paper/tables_results.py`) as Markdown, CSV and LaTeX in the paper's layout.

Markdown / LaTeX: one line per published row, each cell ``ours / paper (ours - paper)`` in percent with one
decimal, ``—`` (LaTeX ``---``) where a number is missing (``— / 58.8``: no result of ours); under the table the
column mapping, then one provenance line per row (results directory, model_id, judge, runs, sampling), then the
paper's notes. CSV: the same rows, three columns per published column (``<col> ours``, ``<col> paper``,
``<col> diff``, empty when missing, 4 decimals), then ``results_dir``, ``model_id``, ``judge``, ``runs``,
``preset`` and ``provenance``.
"""
from __future__ import annotations

import csv
import io

from tables_results import BuiltTable, Cell

MISSING = "—"
LEGEND = ("Each cell: ours / paper (ours - paper), percent; — = no number (ours: no results directory, or no "
          "answers for that column; paper: not published).")


def _num(x: float | None, missing: str = MISSING) -> str:
    return missing if x is None else f"{x:.1f}"


def cell_text(cell: Cell, missing: str = MISSING) -> str:
    """``12.3 / 58.8 (-46.5)``; ``— / 58.8`` when ours is missing."""
    text = f"{_num(cell.ours, missing)} / {_num(cell.published, missing)}"
    return text if cell.diff is None else f"{text} ({cell.diff:+.1f})"


def _head(table: BuiltTable) -> list[str]:
    first = ["Model", "Method"] if any(r.group for r in table.spec.rows) else ["Setting"]
    return first + [c.name for c in table.spec.columns]


def _label(table: BuiltTable, built) -> list[str]:
    if len(_head(table)) - len(table.spec.columns) == 2:
        return [built.row.group or "", built.row.method]
    return [built.row.method]


def to_markdown(table: BuiltTable) -> str:
    head = _head(table)
    lines = [f"# {table.spec.name}: {table.spec.title}", "", LEGEND, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for built in table.rows:
        lines.append("| " + " | ".join(_label(table, built) + [cell_text(c) for c in built.cells]) + " |")
    lines += ["", "Columns (benchmark, breakdown, metric):", ""]
    lines += [f"- {c.describe()}" for c in table.spec.columns]
    lines += ["", "Rows (where each row's numbers come from):", ""]
    lines += [f"- {' '.join(_label(table, b)).strip()}: {b.provenance}" for b in table.rows]
    if table.spec.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in table.spec.notes]
    return "\n".join(lines) + "\n"


def _csv_num(x: float | None) -> str:
    return "" if x is None else repr(round(x, 4))


def to_csv(table: BuiltTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    label = _head(table)[:len(_head(table)) - len(table.spec.columns)]
    cols = [f"{c.name} {part}" for c in table.spec.columns for part in ("ours", "paper", "diff")]
    w.writerow([h.lower() for h in label] + cols + ["results_dir", "model_id", "judge", "runs", "preset",
                                                   "provenance"])
    for b in table.rows:
        nums = [_csv_num(x) for c in b.cells for x in (c.ours, c.published, c.diff)]
        info = [b.info.get(k) or "" for k in ("model_id", "judge", "runs", "preset")]
        w.writerow(_label(table, b) + nums + [b.rel or ""] + info + [b.provenance])
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"$<$", ">": r"$>$", "`": "",
        "—": "---"}


def tex_escape(text: str) -> str:
    text = text.replace("->", "\x00").replace("<=", "\x01")
    text = "".join(_TEX.get(ch, ch) for ch in text)
    return text.replace("\x00", r"$\rightarrow$").replace("\x01", r"$\le$")


def to_tex(table: BuiltTable) -> str:
    head = _head(table)
    lines = [f"% {table.spec.name}: {table.spec.title}. {LEGEND}", r"\begin{table}[ht]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(table.spec.title)}: ours / paper (ours $-$ paper), \%.}}",
             rf"\begin{{tabular}}{{{'l' * (len(head) - len(table.spec.columns))}{'c' * len(table.spec.columns)}}}",
             r"\toprule", " & ".join(tex_escape(h) for h in head) + r" \\", r"\midrule"]
    for b in table.rows:
        cells = [tex_escape(x) for x in _label(table, b)] + [tex_escape(cell_text(c, "---")) for c in b.cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip\footnotesize\raggedright"]
    lines += [tex_escape(c.describe()) + r"\\" for c in table.spec.columns]
    lines += [tex_escape(f"{' '.join(_label(table, b)).strip()}: {b.provenance}") + r"\\" for b in table.rows]
    lines += [tex_escape(n) + r"\\" for n in table.spec.notes]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: BuiltTable, out_dir) -> list:
    """``OUT/<name>.md``, ``.csv`` and ``.tex``; returns their paths."""
    paths = []
    for ext, render in (("md", to_markdown), ("csv", to_csv), ("tex", to_tex)):
        path = out_dir / f"{table.spec.name}.{ext}"
        path.write_text(render(table), encoding="utf-8")
        paths.append(path)
    return paths
