"""`experiments/paper/tables.py`: the paper's tables beside ours. Synthetic results directories (settings.json +
answers.jsonl written by hand): a cell is the metric recomputed from the answers (F1 on the QA sets, pass@1
elsewhere, breakdown values pooled), the difference is ours - paper, missing numbers are marked, a directory mixing
model_ids is refused, unknown rows / tables list the known ones; and the ``--smoke`` run end to end."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper"
sys.path.insert(0, str(PAPER))

import tables  # noqa: E402
from tables_mapping import (EVAL_ONLY, TABLES, TablesError, _config_rows, known_rows,  # noqa: E402
                            load_published, table_specs)
from tables_results import build_tables  # noqa: E402

SETTINGS = {"model_id": "ckpt-A", "preset": "paper", "judge": "rule", "max_response_len": 64, "seed": 0,
            "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.1}}


def answer(bench, qid, run, correct, f1=0.0, model_id="ckpt-A"):
    return {"model_id": model_id, "benchmark": bench, "question_id": str(qid), "run": run,
            "sampling": SETTINGS["sampling"], "judge": {"name": "rule", "failed": False},
            "metrics": {"correct": bool(correct), "f1": float(f1), "em": float(f1 == 1.0)}}


def write_row(root: Path, table: str, row: str, answers: list[dict], **settings) -> Path:
    d = root / table / row
    d.mkdir(parents=True)
    (d / "settings.json").write_text(json.dumps({**SETTINGS, **settings}))
    (d / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return d


def built_row(built, method, group=None):
    return next(b for b in built.rows if b.row.method == method and (group is None or b.row.group == group))


def cell(built, method, column, group=None):
    names = [c.name for c in built.spec.columns]
    return built_row(built, method, group).cells[names.index(column)]


def test_cells_are_the_metrics_recomputed_from_the_answers_and_the_difference_is_ours_minus_paper(tmp_path):
    rng = np.random.default_rng(0)
    answers, f1s, correct = [], {}, {}
    for bench in ("webwalker", "hotpotqa", "2wiki", "musique", "bamboogle"):
        for q in range(4):
            for r in range(3):
                f1, ok = float(rng.random()), bool(rng.random() < 0.5)
                answers.append(answer(bench, q, r, ok, f1))
                f1s.setdefault(bench, []).append(f1)
                correct.setdefault(bench, []).append(ok)
    res = tmp_path / "res"
    write_row(res, "table4", "qwen2.5-7b,appo", answers)
    built = build_tables(res)["table4"]
    ours = {"WebWalker": 100 * np.mean(correct["webwalker"]), "HotpotQA": 100 * np.mean(f1s["hotpotqa"]),
            "2Wiki": 100 * np.mean(f1s["2wiki"]), "MuSiQue": 100 * np.mean(f1s["musique"]),
            "Bamboogle": 100 * np.mean(f1s["bamboogle"])}
    ours["Avg"] = np.mean(list(ours.values()))
    published = load_published()["table4"]["rows"]["Qwen2.5-7B-Instruct"]["APPO"]
    for column, value in ours.items():
        c = cell(built, "APPO", column, "Qwen2.5-7B-Instruct")
        assert c.ours == pytest.approx(value) and c.published == published[column]
        assert c.diff == pytest.approx(value - published[column])
    assert cell(built, "APPO", "HotpotQA", "Qwen2.5-7B-Instruct").ours != pytest.approx(
        100 * np.mean(correct["hotpotqa"]))  # F1, not judge accuracy, on the QA sets
    out = tmp_path / "out"
    tables.write_tables(res, out)
    md = (out / "table4.md").read_text()
    hot = cell(built, "APPO", "HotpotQA", "Qwen2.5-7B-Instruct")
    assert f"{hot.ours:.1f} / 66.5 ({hot.diff:+.1f})" in md
    assert "ckpt-A" in md and "judge rule; 3 run(s)" in md
    rows = list(csv.DictReader(io.StringIO((out / "table4.csv").read_text())))
    appo = next(r for r in rows if r["model"] == "Qwen2.5-7B-Instruct" and r["method"] == "APPO")
    assert float(appo["HotpotQA ours"]) == pytest.approx(hot.ours, abs=1e-4)
    assert float(appo["HotpotQA diff"]) == pytest.approx(hot.diff, abs=1e-4)
    assert appo["model_id"] == "ckpt-A" and appo["judge"] == "rule" and appo["runs"] == "3"


def test_breakdown_columns_pool_the_questions_of_their_values(tmp_path):
    levels = {"g1": "1", "g2": "1", "g3": "2", "g4": "3"}
    cats = {"h1": "Math", "h2": "Physics", "h3": "Engineering", "h4": "Other"}
    fields = {"gaia": {q: {"level": v} for q, v in levels.items()},
              "hle": {q: {"category": v} for q, v in cats.items()}}
    answers = [answer("gaia", "g1", 0, True), answer("gaia", "g1", 1, False), answer("gaia", "g2", 0, True),
               answer("gaia", "g2", 1, True), answer("gaia", "g3", 0, False), answer("gaia", "g3", 1, False),
               answer("hle", "h1", 0, True), answer("hle", "h2", 0, False), answer("hle", "h3", 0, True),
               answer("hle", "h4", 0, False)]
    write_row(tmp_path, "table2", "qwen3-8b,appo", answers)
    built = build_tables(tmp_path, breakdowns=lambda b: fields.get(b, {}))["table2"]
    get = lambda col: cell(built, "APPO", col, "Qwen3-8B").ours
    assert get("GAIA Lv1") == pytest.approx(75.0)  # g1: 1/2, g2: 2/2
    assert get("GAIA Lv2") == pytest.approx(0.0)
    assert get("GAIA Lv3") is None  # g4 has no answers: missing, not 0
    assert get("GAIA Avg") == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert get("HLE NS") == pytest.approx(50.0) and get("HLE CE") == pytest.approx(100.0)
    assert get("HLE SF") == pytest.approx(0.0) and get("HLE Avg") == pytest.approx(50.0)
    assert get("Xbench") is None and get("WebWalkerQA Avg") is None


def test_missing_rows_and_benchmarks_are_marked_and_every_published_row_is_present(tmp_path):
    res, out = tmp_path / "res", tmp_path / "out"
    write_row(res, "table1", "qwen2.5-7b,appo", [answer("hotpotqa", 0, 0, True, 0.5)])
    assert tables.main(["--results", str(res), "--out", str(out)]) == 0
    md = (out / "table1.md").read_text()
    assert "| Qwen2.5-7B-Instruct | APPO | — / 36.7 |" in md  # AIME24 absent from the answers
    assert "50.0 / 66.5 (-16.5)" in md
    assert "| Llama3.1-8B-Instruct | GRPO | — / 13.3 | — / 13.3 |" in md  # no directory at all
    assert "`table1/llama3.1-8b,grpo`: no results" in md
    appo = table_specs()["table1"]
    built = build_tables(res)["table1"]
    assert cell(built, "APPO", "Avg", "Qwen2.5-7B-Instruct").ours is None  # not every column present
    assert cell(built, "APPO", "MATH", "Qwen2.5-7B-Instruct").ours is None  # no data set here
    assert [b.row.method for b in built.rows] == [r.method for r in appo.rows]
    t4 = (out / "table4.md").read_text()
    assert "| Qwen2.5-7B-Instruct | w/o dual-group | — / 33.0 |" in t4
    assert "`table4/qwen2.5-7b,no_dual_group`: no results" in t4


def test_a_directory_mixing_model_ids_is_refused_naming_it_and_the_ids(tmp_path, capsys):
    res = tmp_path / "res"
    d = write_row(res, "table4", "qwen2.5-7b,appo",
                  [answer("hotpotqa", 0, 0, True, 1.0), answer("hotpotqa", 1, 0, True, 1.0, model_id="ckpt-B")])
    with pytest.raises(TablesError, match="more than one model_id") as err:
        build_tables(res)
    assert str(d) in str(err.value) and "ckpt-A" in str(err.value) and "ckpt-B" in str(err.value)
    assert tables.main(["--results", str(res), "--out", str(tmp_path / "out")]) == 2
    assert "more than one model_id" in capsys.readouterr().err


def test_other_judge_than_settings_or_a_twice_answered_question_is_refused(tmp_path):
    a = answer("hotpotqa", 0, 0, True, 1.0)
    write_row(tmp_path / "j", "table4", "qwen2.5-7b,appo", [a], judge="llm:qwen2.5-72b")
    with pytest.raises(TablesError, match="more than one judge"):
        build_tables(tmp_path / "j")
    write_row(tmp_path / "d", "table4", "qwen2.5-7b,appo", [a, a])
    with pytest.raises(TablesError, match="appears 2 times"):
        build_tables(tmp_path / "d")


def test_unknown_row_table_or_eval_dir_is_refused_listing_what_is_known(tmp_path):
    write_row(tmp_path / "r", "table1", "qwen2.5-7b,ppo", [])
    with pytest.raises(TablesError, match="unknown row 'qwen2.5-7b,ppo' of table1; known rows: ") as err:
        build_tables(tmp_path / "r")
    assert "qwen2.5-7b,appo" in str(err.value) and "llama3.1-8b,zero_shot" in str(err.value)
    write_row(tmp_path / "t", "table9", "qwen2.5-7b,appo", [])
    with pytest.raises(TablesError, match="unknown table directory 'table9'; expected one of table1, table2"):
        build_tables(tmp_path / "t")
    (tmp_path / "e" / "table3" / "N4_B3").mkdir(parents=True)
    with pytest.raises(TablesError, match="not an `appo-jax eval --out` directory"):
        build_tables(tmp_path / "e")


def test_rows_not_in_the_paper_are_appended_without_published_numbers(tmp_path):
    write_row(tmp_path, "table4", "qwen2.5-7b,omega_only", [answer("webwalker", 0, 0, True)])
    write_row(tmp_path, "table4", "qwen2.5-7b,appo,official", [answer("webwalker", 0, 0, False)])
    built = build_tables(tmp_path)["table4"]
    extra = built_row(built, "qwen2.5-7b,omega_only")
    assert extra.cells[0].ours == 100.0 and extra.cells[0].published is None and extra.cells[0].diff is None
    official = built_row(built, "qwen2.5-7b,appo,official")  # the official scripts' set: not the paper's row
    assert official.cells[0].ours == 0.0 and official.cells[0].published is None
    assert cell(built, "APPO", "WebWalker", "Qwen2.5-7B-Instruct").ours is None


def test_row_keys_are_those_of_the_config_files():
    for table in TABLES:
        config = set(_config_rows(table))
        if not config:  # the config file is not there (yet)
            continue
        eval_only = {k for k in known_rows(table) if k.split(",")[-1] in EVAL_ONLY.get(table, ())}
        for spec in table_specs().values():
            for row in spec.rows:
                if row.source and row.source[0] == table:
                    assert row.source[1] in config | eval_only, (spec.name, row.method, row.source)


def test_published_json_names_its_source_and_holds_every_method_row():
    pub = load_published()
    assert "APPO paper" in pub["source"] and "arXiv" in pub["source"] and "as published" in pub["source"]
    methods = {m for t in ("table1", "table2", "table4") for g in pub[t]["rows"].values() for m in g}
    assert {"GRPO", "Reinforce++", "DAPO", "GPPO", "CISPO", "GIGPO", "ARPO", "APPO", "BS->Entropy",
            "w/o dual-group", "w/o future-value advantage scaling"} <= methods


def _published_cells(spec):
    return [(r, c.name, r.published[c.name]) for r in spec.rows for c in spec.columns if c.name in r.published]


def test_smoke_builds_the_four_tables_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(PAPER / "tables.py"), "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    specs = table_specs()
    for name in TABLES:
        md, tex = (out / f"{name}.md").read_text(), (out / f"{name}.tex").read_text()
        rows = list(csv.DictReader(io.StringIO((out / f"{name}.csv").read_text())))
        spec = specs[name]
        assert [r["method"] if "method" in r else r["setting"] for r in rows] == [r.method for r in spec.rows]
        for row, column, value in _published_cells(spec):
            line = next(r for r in rows if (r.get("method") or r.get("setting")) == row.method
                        and r.get("model", "") == (row.group or ""))
            assert float(line[f"{column} paper"]) == value
            assert f"/ {value:.1f}" in md and f"/ {value:.1f}" in tex
        smoke_row = tables.SMOKE_ROWS[name]
        filled = next(r for r in rows if r["results_dir"] == f"{name}/{smoke_row}")
        assert "tiny-llama" in filled["model_id"] and filled["judge"] == "rule" and filled["runs"] == "1"
        assert any(filled[f"{c.name} ours"] != "" for c in spec.columns)
        assert (out / "smoke_results" / name / smoke_row / "answers.jsonl").is_file()
        assert "— / " in md and "--- / " in tex  # the other rows: missing, marked
