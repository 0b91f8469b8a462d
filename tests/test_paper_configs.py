"""The paper-table configs (experiments/paper/table{1,2,3,4}_*.py, appo_jax/training/paper_hyperparameters.py,
docs/paper_configs.md): every row of both hyperparameter sets validates, the sets differ exactly as the document
says, Table 3's budgets satisfy n = N (1 + B + ... + B^L), unknown rows are clear errors, and ``appo-jax plan
--config`` names a TPU slice for each row (shapes from the model presets; no weights are read)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from appo_jax.training.config import ConfigError, load_config, to_dict, validate
from appo_jax.rollout.strategies import budget_n
from appo_jax.training.paper_hyperparameters import SETS, differences, steps_for
from appo_jax.training.plan_commands import SLICES, config_model, plan_config, select_slices

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper"
TABLES = {"table1": "table1_reasoning.py", "table2": "table2_deep_search.py", "table3": "table3_budgets.py",
          "table4": "table4_ablations.py"}


def _module(table: str):
    spec = importlib.util.spec_from_file_location(f"paper_{table}", PAPER / TABLES[table])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _all_rows():
    return [(t, row, s) for t in TABLES for row in _module(t).ROWS for s in ("", ",official")]


def _load(table: str, row: str):
    return load_config(f"{PAPER / TABLES[table]}:{row}")


def _flat(cfg) -> dict:
    return {f"{sec}.{k}": v for sec, fields in to_dict(cfg).items() if isinstance(fields, dict)
            for k, v in fields.items()} | {"name": cfg.name, "workdir": cfg.workdir}


def test_every_row_of_both_sets_validates_and_is_its_own_run():
    names = set()
    rows = _all_rows()
    for table, row, hp_set in rows:
        cfg = _load(table, row + hp_set)
        validate(cfg, num_devices=8)
        assert cfg.name.endswith("-official") == (hp_set == ",official")
        names.add((cfg.name, cfg.workdir))
    assert len(names) == len(rows)
    assert len(rows) == 2 * (16 + 6 + 11 + 14)


def test_the_tables_have_the_published_rows():
    t1, t2, t3, t4 = (_module(t) for t in TABLES)
    assert set(t1.METHODS) == {"grpo", "reinforce_pp", "dapo", "gppo", "cispo", "gigpo", "arpo", "appo"}
    assert set(t1.BACKBONES) == set(t4.BACKBONES) == {"qwen2.5-7b", "llama3.1-8b"}
    assert set(t2.ROWS) == {f"{b},{m}" for b in ("qwen3-8b", "qwen3-14b") for m in ("grpo", "arpo", "appo")}
    assert set(t3.ROWS) == {"ARPO_M16", "N2_B1", "N1_B3", "N2_B3", "N4_B3", "N8_B1", "N2_B7", "N1_B2_L3",
                            "N1_B4_L2", "N3_B1_L2", "N4_B2_L2"}
    assert t4.PAPER_LABELS == {"APPO": "appo", "BS->Entropy": "entropy_only",
                               "w/o future-value advantage scaling": "no_future_kl",
                               "w/o dual-group": "no_dual_group"}
    for backbone in t4.BACKBONES:
        algos = {_load("table4", f"{backbone},{a}").algorithm.name for a in t4.PAPER_LABELS.values()}
        assert algos == {"appo", "appo_entropy_only", "appo_no_future_kl", "appo_no_dual_group"}


def test_existing_row_names_and_the_official_mode_keep_working():
    cfg = load_config(f"{ROOT}/experiments/paper/table1_reasoning.py:qwen2.5-7b,appo")
    assert (cfg.name, cfg.train.prompts_per_step, cfg.algorithm.n_init) == ("table1-qwen2.5-7b-appo", 128, 4)
    official = load_config(f"{ROOT}/experiments/official.py:qwen2.5-7b")
    assert official.name == "official-table1-qwen2.5-7b-appo"
    assert (official.train.prompts_per_step, official.algorithm.n_init, official.loss.kl_coef) == (96, 8, 0.001)
    assert official.algorithm.branching_parity == "official"


# the paper's set vs the official scripts' (docs/paper_configs.md, "The two sets")
EXPECTED = {  # row -> {key: (paper, official)}
    ("table1", "qwen2.5-7b,appo"): {
        "train.prompts_per_step": (128, 96), "algorithm.n_init": (4, 8), "rollout.max_response_len": (4096, 6144),
        "loss.fkl_weight": (0.5, 1.0), "loss.decay_rate": (32.0, 64.0), "loss.kl_coef": (0.0, 0.001),
        "algorithm.branch_selection": ("per_rollout", "per_group"), "train.steps": (156, 208),
        "sft.lr": (7e-6, 1e-4), "sft.batch_size": (128, 8), "sft.max_response_len": (4096, 128)},
    ("table2", "qwen3-8b,appo"): {
        "algorithm.n_init": (4, 8), "rollout.max_response_len": (8192, 10000), "loss.fkl_weight": (0.5, 1.0),
        "loss.decay_rate": (32.0, 64.0), "loss.kl_coef": (0.0, 0.001),
        "algorithm.branch_selection": ("per_rollout", "per_group"),
        "sft.lr": (7e-6, 1e-4), "sft.batch_size": (128, 8), "sft.max_response_len": (4096, 128)},
    ("table2", "qwen3-14b,appo"): {
        "train.prompts_per_step": (128, 64), "train.mini_batch_prompts": (16, 8), "algorithm.n": (16, 12),
        "algorithm.n_init": (4, 6), "rollout.max_response_len": (8192, 6192), "loss.fkl_weight": (0.5, 1.0),
        "loss.decay_rate": (32.0, 64.0), "loss.kl_coef": (0.0, 0.001), "train.steps": (40, 80),
        "algorithm.branch_selection": ("per_rollout", "per_group"),
        "sft.lr": (7e-6, 1e-4), "sft.batch_size": (128, 8), "sft.max_response_len": (4096, 128)},
    ("table1", "llama3.1-8b,grpo"): {  # a non-branching method: n_init / branch selection do not apply
        "train.prompts_per_step": (128, 96), "rollout.max_response_len": (4096, 6144), "loss.fkl_weight": (0.5, 1.0),
        "loss.decay_rate": (32.0, 64.0), "loss.kl_coef": (0.0, 0.001), "train.steps": (156, 208),
        "sft.lr": (7e-6, 1e-4), "sft.batch_size": (128, 8), "sft.max_response_len": (4096, 128)},
}


@pytest.mark.parametrize("table,row", list(EXPECTED))
def test_the_sets_differ_exactly_as_documented(table, row):
    paper, official = _flat(_load(table, row)), _flat(_load(table, row + ",official"))
    got = {k: (paper[k], official[k]) for k in paper if paper[k] != official[k] and k not in ("name", "workdir")}
    assert got == EXPECTED[(table, row)]
    assert official["name"] == paper["name"] + "-official"
    doc = (ROOT / "docs" / "paper_configs.md").read_text()
    for key in got:
        assert f"`{key}`" in doc, f"docs/paper_configs.md does not name {key}"


def test_the_documented_difference_table_matches_the_sets():
    """Every value of docs/paper_configs.md's difference table (``| `key` | paper | official |``, reasoning
    setup) is the set's value."""
    doc = (ROOT / "docs" / "paper_configs.md").read_text()
    diff = differences("reasoning")
    for key, (paper, official) in diff.items():
        if key == "epochs":
            continue
        line = next((x for x in doc.splitlines() if x.startswith(f"| `{key}` |")), None)
        assert line is not None, key
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert _same(cells[1], paper), (key, cells)
        assert official is None or _same(cells[2], official), (key, cells)
    assert steps_for("train_10k", 2, 128) == 156 and steps_for("hard_search_1k", 5, 64) == 80


def _same(cell: str, value) -> bool:
    """The first word of a table cell (backticks dropped) is ``value`` (numbers compared as numbers)."""
    word = cell.split()[0].strip("`")
    return float(word) == value if isinstance(value, (int, float)) else word == str(value)


def test_table3_budgets():
    t3 = _module("table3")
    for row, (n_init, branches, levels) in t3.BUDGETS.items():
        assert re.fullmatch(rf"N{n_init}_B{branches}(_L{levels})?", row)
        for hp_set in ("", ",official"):
            a = _load("table3", row + hp_set).algorithm
            assert (a.name, a.n_init, a.levels) == ("appo", n_init, levels)
            assert a.n == n_init * sum(branches ** k for k in range(levels + 1)) == budget_n(n_init, branches, levels)
            per_group = hp_set == ",official" and levels == 1
            assert a.branch_selection == ("per_group" if per_group else "per_rollout")
    assert {r: budget_n(*b) for r, b in t3.BUDGETS.items()} == {
        "N2_B1": 4, "N1_B3": 4, "N2_B3": 8, "N4_B3": 16, "N8_B1": 16, "N2_B7": 16, "N1_B2_L3": 15, "N1_B4_L2": 21,
        "N3_B1_L2": 9, "N4_B2_L2": 28}
    arpo = _load("table3", "ARPO_M16").algorithm
    assert (arpo.name, arpo.n) == ("arpo", 16)
    # N4_B3 is the paper's APPO setting: the Table 1 / Table 4 Qwen2.5-7B APPO row up to the eval benchmarks
    same = {k: v for k, v in _flat(_load("table3", "N4_B3")).items() if k not in ("name", "workdir")}
    t4 = {k: v for k, v in _flat(_load("table4", "qwen2.5-7b,appo")).items() if k not in ("name", "workdir")}
    assert same == t4


@pytest.mark.parametrize("table", list(TABLES))
def test_an_unknown_row_is_a_clear_error_listing_the_rows(table):
    rows = _module(table).ROWS
    for bad in ("nope", "nope,official", rows[0] + ",offical"):
        with pytest.raises(ConfigError, match=f"row '{re.escape(bad)}'") as err:
            _load(table, bad)
        assert all(r in str(err.value) for r in rows) and ",official" in str(err.value)


def test_sets_are_commented_with_their_source():
    source = (ROOT / "appo_jax" / "training" / "paper_hyperparameters.py").read_text()
    for set_values in SETS.values():
        for values in set_values.values():
            for key in values:
                assert f'"{key}"' in source
    for line in source.splitlines():
        if re.match(r'\s+"((train|algorithm|rollout|loss|sft)\.\w+|epochs)": ', line):
            assert "# the paper's text" in line or "# the official" in line, line


# ---------------------------------------------------------------------------------------------------- plan
def test_plan_names_a_slice_for_every_row():
    """Tables 1, 3, 4 (7B / 8B): a slice the trainer runs on today; Table 2: at least one once the sampler may
    span hosts (Qwen3-14B's fp32 train state does not fit the 4 chips of one v5p host: docs/paper_configs.md)."""
    names = {s.name for s in SLICES}
    for table, row, hp_set in _all_rows():
        out = plan_config(_load(table, row + hp_set))
        assert out["smallest_without_host_limit"] in names, (table, row, hp_set)
        if table != "table2":
            assert out["smallest"] in names, (table, row, hp_set)
            best = next(r for r in out["slices"] if r["slice"] == out["smallest"])
            assert best["fits"] and best["gib_per_device"]["total"] <= 0.9 * best["hbm_gib"] + 0.01
            assert best["overrides"] == out["smallest_overrides"]
            smaller = [r for r in out["slices"] if r["chips"] < best["chips"]]
            assert not any(r["fits"] for r in smaller)


def test_plan_cli_with_a_config(capsys):
    import argparse

    from appo_jax.training.plan_commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    config = f"{PAPER / 'table1_reasoning.py'}:qwen2.5-7b,appo"
    args = parser.parse_args(["plan", "--config", config, "--slices", "v5p,v4-8"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "qwen2.5-7b" and out["smallest"] == "v5p-8"
    assert [r["slice"] for r in out["slices"]] == ["v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256",
                                                   "v5p-512", "v4-8"]
    assert out["layout"]["seq_len"] == 2048 + 4096 and out["layout"]["mini_batch_rows"] == 16 * 4
    args = parser.parse_args(["plan", "--config", config, "--slices", "v5p-8", "--table", "--set",
                              "rollout.max_response_len=6144"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "smallest slice v5p-8" in text and "| v5p-8 | 4 x 95 GiB | yes |" in text
    args = parser.parse_args(["plan", "--config", config, "--slices", "v9-8"])
    assert args.func(args) == 2 and "unknown TPU slice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["plan", "--config", config, "--model", "tiny-llama"])


def test_plan_model_shapes_come_from_the_presets():
    cfg = _load("table2", "qwen3-14b,appo")
    assert not Path(cfg.model.name).exists()
    model, name = config_model(cfg)
    assert name == "qwen3-14b" and model.num_layers == 40 and model.dtype == "bfloat16"
    assert config_model(_load("table1", "llama3.1-8b,appo"))[1] == "llama3.1-8b"
    cfg.model.name = "/nowhere/Mystery-9B"
    with pytest.raises(ValueError, match="named like a preset"):
        config_model(cfg)
    assert [s.name for s in select_slices("v5e")] == [f"v5e-{n}" for n in (8, 16, 32, 64, 128, 256)]
    v5p = {s.name: s for s in SLICES}["v5p-64"]
    assert (v5p.chips, v5p.hosts, v5p.hbm_gib, v5p.accelerator_type) == (32, 8, 95, "v5p-64")
    assert dataclasses.astuple({s.name: s for s in SLICES}["v5e-8"])[1:] == ("v5litepod-8", 8, 8, 16)


def test_a_two_level_row_reaches_the_strategy_and_the_estimator_with_its_levels():
    """`table3_budgets.py:N3_B1_L2`: the rollout strategy branches two levels of one branch per rollout and the
    advantage estimator normalises two branch levels (the run itself: `appo-jax train --config
    experiments/paper/table3_budgets.py:N3_B1_L2` with tiny-model overrides; the two-level engine path is tested
    in test_rollout_engine.py)."""
    from appo_jax.training.config import algorithm_spec

    cfg = _load("table3", "N3_B1_L2")
    spec = algorithm_spec(cfg)
    strategy = spec.strategy(cfg.algorithm)
    assert (strategy.options.levels, strategy.options.branches, strategy.options.branch_selection) == (
        2, 1, "per_rollout")
    assert strategy.train_rows_per_prompt == 3 and strategy.rollouts_per_prompt == 3
    assert spec.advantage_options(cfg.algorithm).levels == 2
