"""`appo-jax train` / `appo-jax eval`: argument handling and clear errors; pass@1."""
import numpy as np
import pytest

from appo_jax.cli import main
from appo_jax.data.records import Record
from appo_jax.training.evaluation import _correct, pass_at_1


def test_pass_at_1():
    correct = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])  # 3 questions x 4 runs
    assert pass_at_1(correct) == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert pass_at_1(np.zeros((0, 5))) == 0.0


def test_eval_correctness_uses_the_rule_judge_on_the_last_boxed_answer():
    item = Record("0", "q", ["42"], "gsm8k", "gsm8k", "math", [])
    assert _correct(item, "<answer>The answer is \\boxed{42}.</answer>") == 1.0
    assert _correct(item, "<answer>\\boxed{41}</answer>") == 0.0
    assert _correct(item, "no boxed answer") == 0.0
    assert _correct(Record("0", "q", ["1/2"], "math500", "math500", "math", []), "\\boxed{0.5}") == 1.0


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "exp.py"
    cfg.write_text("from appo_jax.training.config import ExperimentConfig\n"
                   "def get_config():\n    return ExperimentConfig()\n")
    assert main(["train", "--config", str(tmp_path / "missing.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "optimizer.lrate=1"]) == 2
    assert "unknown config key 'optimizer.lrate'" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "algorithm.name=ppo"]) == 2
    assert "unknown algorithm 'ppo'" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "train.micro_batch_rows=3"]) == 2
    assert "micro_batch_rows=3" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--set", "model.name=nosuch",
                 "--set", "model.tokenizer=smollm2-135m-instruct"]) == 2
    assert "model spec 'nosuch'" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "w2"), "--set", "data.train=nosuch",
                 "--set", "model.name=tiny-llama", "--set", "model.tokenizer=smollm2-135m-instruct"]) == 2
    assert "unknown dataset 'nosuch'" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--benchmarks", "gsm8k,nosuch"]) == 2
    assert "unknown dataset 'nosuch'" in capsys.readouterr().err


def test_every_command_describes_itself_and_shows_its_defaults():
    import argparse

    from appo_jax.cli import build_parser, parsers

    root = build_parser()
    names = []
    for parser in parsers(root):
        names.append(parser.prog)
        assert parser.description, f"{parser.prog} has no description"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
    for prog in ("appo-jax train", "appo-jax eval", "appo-jax rollout", "appo-jax generate", "appo-jax bench sampler",
                 "appo-jax bench list", "appo-jax tool python", "appo-jax data show", "appo-jax plan", "appo-jax serve"):
        assert prog in names
    text = next(p for p in parsers(root) if p.prog == "appo-jax rollout").format_help()
    assert "--num-slots" in text and "(default: 32)" in text  # a default shown that the help itself does not name
    assert "--slots" not in text.replace("--num-slots", "")


def test_train_lists_every_registered_algorithm_with_one_line(capsys):
    from appo_jax.training.algorithms import ALGORITHMS

    assert main(["train", "--list-algorithms"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["algorithm", "rollout", "advantage", "loss"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert set(listed) == set(ALGORITHMS) and len(listed) >= 17
    for name, spec in ALGORITHMS.items():
        assert spec.description and spec.description in listed[name]
        assert listed[name].split()[1:4] == [spec.rollout_strategy, spec.advantage, spec.loss_mode]
    assert main(["train"]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_bench_lists_the_benchmark_scripts(capsys):
    import json
    from pathlib import Path

    from appo_jax.cli import BENCHMARKS_DIR

    assert main(["bench", "list"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} == {p.stem for p in Path(BENCHMARKS_DIR).glob("*.py")}
    assert {"sampler", "train_step", "core_ops", "multihost_cpu"} <= {r["name"] for r in rows}
    assert all(r["purpose"] and r["command"] == f"python benchmarks/{r['name']}.py" for r in rows)
