"""The paper's metrics from saved answer rows (`appo_jax.evaluation.answer_store`).

Per benchmark, over its questions q with n_q runs of which c_q were judged correct:

    pass@1 = mean_q c_q / n_q                                  (the paper's pass@1, averaged over runs)
    pass@k = mean_q [1 - C(n_q - c_q, k) / C(n_q, k)]          (Chen et al. 2021, unbiased; k <= n_q)
    F1, EM = mean over rows of the token F1 / exact match of the row's extracted answer against its golds
             (SQuAD normalisation, `appo_jax.rewards.qa_metrics`); the paper's metric on HotpotQA, 2Wiki,
             MuSiQue and Bamboogle (`F1_BENCHMARKS`); judge accuracy (pass@1) elsewhere.

Rows whose judge failed (``judge.failed``) are left out of pass@k and counted in ``judge_failed`` (a question
with no judged run drops out of pass@k; pass@k is given for k up to the fewest judged runs of a question); F1 / EM
need no judge and use every row. ``runs`` is the most runs any question has. A breakdown field (GAIA ``level``, WebWalker ``difficulty``, HLE ``category``;
`appo_jax.data.breakdowns`) gives the same numbers per value of that field.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import numpy as np

#: the four QA sets the paper scores with F1 instead of an LLM judge
F1_BENCHMARKS = ("hotpotqa", "2wiki", "musique", "bamboogle")


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)``: the chance that k of the n runs, drawn without replacement, hold at least one
    of the c correct ones (Chen et al. 2021). ``ValueError`` unless 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _scores(rows: list[dict]) -> dict:
    """pass@k for k = 1..min runs, F1, EM, counts of one set of rows (module doc)."""
    judged: dict[str, list[bool]] = defaultdict(list)
    failed = 0
    for row in rows:
        if row["judge"].get("failed"):
            failed += 1
        else:
            judged[row["question_id"]].append(bool(row["metrics"]["correct"]))
    out: dict = {"questions": len({r["question_id"] for r in rows}), "answers": len(rows), "judge_failed": failed,
                 "f1": float(np.mean([r["metrics"]["f1"] for r in rows])) if rows else None,
                 "em": float(np.mean([r["metrics"]["em"] for r in rows])) if rows else None}
    per_question: dict[str, int] = defaultdict(int)
    for row in rows:
        per_question[row["question_id"]] += 1
    out["runs"] = max(per_question.values(), default=0)
    kmax = min((len(v) for v in judged.values()), default=0)  # pass@k needs k judged runs of every question
    for k in range(1, kmax + 1):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in judged.values()]))
    if not kmax:
        out["pass@1"] = None
    return out


def summarize(rows: Iterable[dict], breakdowns: dict[str, dict[str, dict[str, str]]] | None = None) -> dict:
    """``{benchmark: scores}`` (module doc), each with ``metric`` (``"f1"`` for `F1_BENCHMARKS`, else
    ``"pass@1"``: the number the paper reports for it) and, when ``breakdowns[benchmark]`` maps question ids to
    fields, ``by_<field>: {value: scores}``."""
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_bench[row["benchmark"]].append(row)
    out = {}
    for bench, items in sorted(by_bench.items()):
        scores = _scores(items)
        scores["metric"] = "f1" if bench in F1_BENCHMARKS else "pass@1"
        fields = (breakdowns or {}).get(bench) or {}
        names = sorted({f for v in fields.values() for f in v})
        for name in names:
            groups: dict[str, list[dict]] = defaultdict(list)
            for row in items:
                groups[fields.get(row["question_id"], {}).get(name, "unknown")].append(row)
            scores[f"by_{name}"] = {value: _scores(g) for value, g in sorted(groups.items())}
        out[bench] = scores
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


def summary_table(summary: dict) -> str:
    """Markdown: one row per benchmark (questions, runs, the paper's metric, pass@1, pass@k for the largest k,
    F1, EM, failed judgements), then one row per breakdown value."""
    kmax = max((max((int(k[5:]) for k in s if k.startswith("pass@") and s[k] is not None), default=1)
                for s in summary.values()), default=1)
    head = ["benchmark", "questions", "runs", "paper metric", "pass@1 (%)"]
    head += [f"pass@{kmax} (%)"] if kmax > 1 else []
    head += ["F1 (%)", "EM (%)", "judge failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name, s):
        cells = [name, str(s["questions"]), str(s["runs"]), s.get("metric", ""), _pct(s.get("pass@1"))]
        cells += [_pct(s.get(f"pass@{kmax}"))] if kmax > 1 else []
        cells += [_pct(s["f1"]), _pct(s["em"]), str(s["judge_failed"])]
        lines.append("| " + " | ".join(cells) + " |")

    for bench, s in summary.items():
        line(bench, s)
        for key in sorted(k for k in s if k.startswith("by_")):
            for value, sub in s[key].items():
                line(f"{bench} {key[3:]}={value}", {**sub, "metric": ""})
    return "\n".join(lines)
