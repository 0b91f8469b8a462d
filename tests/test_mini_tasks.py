"""The mini reproduction's tasks (kb_multihop, arith_program): splits, traces, tools, decision-token labels, the
shipped tokenizer, the oracle branch-point selection and the report's statistics."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from appo_jax.core.branch_points import choose_branch_points
from appo_jax.core.trajectory import TrajectoryBuilder
from appo_jax.data import get_task, load_dataset
from appo_jax.data import arith_program, kb_multihop
from appo_jax.models.loading import load_tokenizer
from appo_jax.rewards.registry import RecordReward
from appo_jax.rollout.decision_labels import DecisionLabeller, label_tokens
from appo_jax.tools import build_registry
from appo_jax.training.config import ConfigError, ExperimentConfig, apply_overrides, validate

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kb_tools(options=None):
    task = get_task("kb_multihop")
    return build_registry(("python", "search"), search={"backend": "kb", "backend_kwargs": task.backend_kwargs(options)})


@pytest.mark.parametrize("name", ["kb_multihop", "arith_program"])
def test_splits_are_disjoint_and_deterministic(name):
    train = load_dataset(f"{name}:train", limit=300, seed=3)
    held = load_dataset(f"{name}:heldout", limit=60, seed=3)
    assert {r.question for r in train}.isdisjoint({r.question for r in held})
    again = load_dataset(name, split="train", limit=300, seed=3)
    assert [r.question for r in again] == [r.question for r in train]
    assert [r.question for r in load_dataset(f"{name}:train", limit=20, seed=4)] != [r.question for r in train[:20]]


def test_kb_answers_follow_the_world():
    opts = kb_multihop.KbOptions(hops=(3, 4))
    world = kb_multihop.make_world(opts)
    for rec in load_dataset("kb_multihop", limit=50, task_options={"hops": [3, 4]}):
        start, chain = kb_multihop.parse_question(world, rec.question)
        assert 3 <= len(chain) <= 4
        e = start
        for r in chain:  # independent loop over the world's table
            e = int(world.target[e, r])
        assert rec.ground_truths == [world.names[e]]
    assert all(world.target[e, r] != e for e in range(opts.entities) for r in range(opts.relations))


def test_kb_search_backend_pages():
    with _kb_tools({"distractors": 3}) as tools:
        world = kb_multihop.make_world(kb_multihop.KbOptions(distractors=3))
        text = tools.call("search", f"{world.relations[1]} of {world.names[5]}").text
        pages = [line for line in text.splitlines() if line.startswith("Page")]
        assert len(pages) == 4
        assert sum(world.fact(5, 1) in p for p in pages) == 1
        assert tools.call("search", f"{world.relations[1]} of {world.names[5]}").text == text  # deterministic
        assert "No search results" in tools.call("search", "zzz qqq").text


def test_traces_are_right_or_take_one_wrong_decision():
    records = load_dataset("kb_multihop", limit=40, seed=1)
    task = get_task("kb_multihop")
    reward = RecordReward("auto")
    with _kb_tools() as tools:
        right = task.traces(records, tools, {"wrong_fraction": 0.0})
        wrong = task.traces(records, tools, {"wrong_fraction": 1.0})
    for rec, ex in zip(records, right):
        text = "".join(s["text"] for s in ex["segments"])
        assert reward(rec, text).accuracy == 1.0
    wrong_acc = [reward(rec, "".join(s["text"] for s in ex["segments"])).accuracy for rec, ex in zip(records, wrong)]
    assert np.mean(wrong_acc) < 0.3  # a wrong relation almost always changes the answer


def test_arith_traces_run_the_real_python_tool():
    records = load_dataset("arith_program", limit=6, seed=2)
    task = get_task("arith_program")
    reward = RecordReward("auto")
    with build_registry(("python",)) as tools:
        right = task.traces(records, tools, {"wrong_fraction": 0.0})
    for rec, ex in zip(records, right):
        program = arith_program.parse_question(rec.question)
        assert eval(arith_program.expression(program)) == int(rec.ground_truths[0])  # noqa: S307 - our own text
        assert ex["segments"][1]["text"].strip() == f"<result>\n{rec.ground_truths[0]}\n</result>"
        assert reward(rec, "".join(s["text"] for s in ex["segments"])).accuracy == 1.0


def test_order_confusion_is_the_teachers_systematic_error():
    """A confused arith trace writes every "subtract it from y" as x - y (plan and code agree, the observation is
    the real output); a confused kb trace resolves the relations outermost first, through the real search results.
    A confusion share of 1 confuses every trace; 0 none."""
    reward = RecordReward("auto")
    arith = get_task("arith_program")
    records = [r for r in load_dataset("arith_program", limit=80, seed=5) if "from" in r.question][:8]
    with build_registry(("python",)) as tools:
        confused = arith.traces(records, tools, {"wrong_fraction": 0.0, "order_confusion": 1.0})
        clean = arith.traces(records, tools, {"wrong_fraction": 0.0, "order_confusion": 0.0})
    for rec, bad, good in zip(records, confused, clean):
        text = bad["segments"][0]["text"]
        assert "subtract from" not in text and "subtract" in text
        program = arith_program.parse_question(rec.question)
        wrong = (program[0], tuple(("subtract" if o == "from" else o, y) for o, y in program[1]))
        assert bad["segments"][1]["text"].strip() == f"<result>\n{arith_program.evaluate(wrong)}\n</result>"
        assert reward(rec, "".join(x["text"] for x in good["segments"])).accuracy == 1.0
        assert reward(rec, "".join(x["text"] for x in bad["segments"])).accuracy == 0.0  # -6 is not 6
    kb = get_task("kb_multihop")
    records = load_dataset("kb_multihop", limit=20, seed=5, task_options={"hops": [2, 2]})
    world = kb_multihop.make_world(kb_multihop.KbOptions())
    with _kb_tools() as tools:
        confused = kb.traces(records, tools, {"wrong_fraction": 0.0, "order_confusion": 1.0})
    for rec, ex in zip(records, confused):
        start, chain = kb_multihop.parse_question(world, rec.question)
        first_query = ex["segments"][0]["text"].split("<search>")[1].split("</search>")[0]
        assert first_query == f"{world.relations[chain[-1]]} of {world.names[start]}"  # outermost first
    wrong = [reward(rec, "".join(x["text"] for x in ex["segments"])).accuracy for rec, ex in zip(records, confused)]
    assert np.mean(wrong) < 0.3


def test_decision_spans_follow_the_rule():
    text = ("<think>Plan: friend, then boss.</think>\n<search>friend of Rilo</search><result>\nPage 1: The boss of "
            "Kesa is Mori.\n</result>\n<search>boss of Kesa</search><result>\nx\n</result>\n<answer>\\boxed{Mori}"
            "</answer>")
    got = [text[a:b] for a, b in kb_multihop.decision_spans(None, text)]
    assert got == ["friend", "boss", "friend", "Rilo", "boss", "Kesa", "Mori"]  # never inside the observation
    text = "<think>Plan: add, subtract from.</think>\n<python>print(50 - (7 + 5))</python><result>\n38\n</result>"
    got = [text[a:b] for a, b in arith_program.decision_spans(None, text)]
    assert got == ["add", "subtract", "from", "50", "-", "7", "+", "5"]


def test_shipped_tokenizer_round_trips_and_labels_tokens():
    tok = load_tokenizer("mini-tasks")
    # every digit is its own token, the same in the question and in the code (copying an operand is a copy)
    q, code = tok.encode("Start with 7. Add 15.", add_special_tokens=False), tok.encode(
        "print((7 + 15))", add_special_tokens=False)
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    assert [t for t in q if t in digits] == [t for t in code if t in digits] == [digits[7], digits[1], digits[5]]
    assert len(tok) == 512 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    with _kb_tools() as tools:
        records = load_dataset("kb_multihop", limit=10)
        ex = get_task("kb_multihop").traces(records, tools)
    for rec, e in zip(records, ex):
        text = "".join(s["text"] for s in e["segments"])
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        labels = label_tokens(tok, ids, kb_multihop.decision_spans(rec, text))
        # slow reference: a token is a decision token iff one of its characters lies in a span
        spans = kb_multihop.decision_spans(rec, text)
        pos = 0
        for i, t in enumerate(ids):
            piece = tok.decode([t])
            inside = any(a < pos + len(piece) and pos < b for a, b in spans)
            assert labels[i] == inside
            pos += len(piece)
        assert labels.any()


def test_tokenizer_build_is_deterministic(tmp_path):
    build = _module(ROOT / "experiments" / "mini" / "build_tokenizer.py")
    a = build.build(tmp_path / "a", count=8)
    b = build.build(tmp_path / "b", count=8)
    assert a.get_vocab() == b.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def _traj(tokens, gen, entropy):
    n, length = tokens.shape
    b = TrajectoryBuilder(n, length, 2)
    for r in range(n):
        b.set_row(r, prompt_ids=[1, 1], tokens=tokens[r], gen_mask=gen[r], obs_mask=np.zeros(length, bool),
                  behavior_logp=np.full(length, -1.0), entropy=entropy[r], reward=float(r), group=0, kind=0)
    return b.build()


def test_oracle_branches_before_the_labelled_decisions():
    rng = np.random.default_rng(0)
    n, length = 4, 12
    tokens = rng.integers(10, 60, (n, length)).astype(np.int32)
    gen = np.ones((n, length), bool)
    entropy = rng.random((n, length)).astype(np.float32)
    decisions = np.zeros((n, length), bool)
    decisions[0, [3, 7]] = True
    decisions[2, 5] = True
    traj = _traj(tokens, gen, entropy)
    lp = jnp.zeros((n, length))
    pts = choose_branch_points(traj, lp, lp, jnp.ones(64, bool), num_groups=1, budget=3, score="oracle",
                               decisions=jnp.asarray(decisions))
    chosen = {(int(r), int(t)) for r, t in zip(pts.rows[0], pts.positions[0])}
    assert chosen == {(0, 2), (0, 6), (2, 4)}  # t = decision - 1: the branch resamples the decision token
    with pytest.raises(ValueError, match="decision-token labels"):
        choose_branch_points(traj, lp, lp, jnp.ones(64, bool), num_groups=1, budget=3, score="oracle")


def test_labeller_marks_generated_tokens_only():
    tok = load_tokenizer("mini-tasks")
    rec = load_dataset("kb_multihop", limit=1)[0]
    gen_text, obs_text = "<think>Plan: friend, then boss.</think>\n<search>friend of Rilo</search>", \
        "<result>\nPage 1: The friend of Rilo is Mori.\n</result>"
    g, o = tok.encode(gen_text, add_special_tokens=False), tok.encode(obs_text, add_special_tokens=False)
    ids = np.array(g + o + [0] * 4, np.int32)
    gen = np.array([True] * len(g) + [False] * (len(o) + 4))
    obs = np.array([False] * len(g) + [True] * len(o) + [False] * 4)
    labels = DecisionLabeller(get_task("kb_multihop"), tok).row(rec, ids, gen | obs, gen)
    assert labels.any() and not labels[~gen].any()
    picked = [tok.decode([int(t)]).strip() for t in ids[labels]]
    assert "friend" in picked and "boss" in picked


def test_task_options_are_validated():
    c = ExperimentConfig()
    c.data.train, c.data.task_options = "kb_multihop:train", {"hops": [2, 9]}
    with pytest.raises(ConfigError, match="hops"):
        validate(c)
    c.data.task_options = {"nope": 1}
    with pytest.raises(ConfigError, match="nope"):
        validate(c)
    c = apply_overrides(ExperimentConfig(), ["data.train=arith_program", 'data.task_options={"steps": [3, 4]}'])
    assert c.data.task_options == {"steps": [3, 4]}
    c.data.train = "gsm8k"
    with pytest.raises(ConfigError, match="not a generated task"):
        validate(c)


def test_mini_config_rows_and_bad_names():
    cfg = _module(ROOT / "experiments" / "mini" / "config.py")
    for method in cfg.METHODS:
        for task in cfg.TASKS:
            c = cfg.get_config(f"{method},{task},2")
            validate(c, 1)
            assert c.train.seed == 2 and c.algorithm.n == 8
    with pytest.raises(ConfigError, match="METHOD,TASK,SEED"):
        cfg.get_config("nope,kb_multihop,1")
    c = cfg.get_config("appo_oracle,kb_multihop,1")
    c.data.train, c.data.task_options = "gsm8k", {}
    with pytest.raises(ConfigError, match="labelled decision tokens"):
        validate(c, 1)


def test_report_statistics_against_formulas():
    report = _module(ROOT / "experiments" / "mini" / "report.py")
    x = [0.2, 0.4, 0.3, 0.5]
    s = report.mean_ci(x)
    half = 3.182 * np.std(x, ddof=1) / math.sqrt(4)
    assert s["mean"] == pytest.approx(0.35) and s["ci95"] == pytest.approx([0.35 - half, 0.35 + half])
    assert report.mean_ci([0.3])["ci95"] is None
    d = report.diff_ci([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])
    assert d["diff"] == pytest.approx(0.4) and d["ci95"][0] > 0 and report.verdict(d) == "reproduced"
    assert report.verdict(report.diff_ci([0.1, 0.5], [0.2, 0.4])) == "inconclusive"
    assert report.verdict(None).startswith("inconclusive")


def test_report_paired_seed_interval_cancels_the_seed():
    """`paired_seed_ci`: seeds of very different difficulty, APPO 0.05 +- 0.01 above the other method on each: the
    paired interval (Student-t over the per-seed differences) excludes 0 where Welch's, which keeps the seeds' spread,
    does not; only common seeds count; fewer than 2: None."""
    report = _module(ROOT / "experiments" / "mini" / "report.py")
    base = {1: 0.40, 2: 0.90, 3: 0.65, 4: 0.55}
    appo = {s: v + d for (s, v), d in zip(base.items(), (0.05, 0.06, 0.04, 0.05))}
    appo[9] = 0.99  # a seed the other method lacks: left out
    d = report.paired_seed_ci(appo, base)
    diffs = [0.05, 0.06, 0.04, 0.05]
    half = 3.182 * np.std(diffs, ddof=1) / math.sqrt(4)
    assert d["seeds"] == [1, 2, 3, 4] and d["diff"] == pytest.approx(0.05)
    assert d["ci95"] == pytest.approx([0.05 - half, 0.05 + half])
    assert report.verdict(d) == "reproduced"
    assert report.verdict(report.diff_ci([appo[s] for s in base], list(base.values()))) == "inconclusive"
    assert report.paired_seed_ci({1: 0.5, 2: 0.6}, {2: 0.4, 3: 0.1}) is None


def test_report_curve_statistics_and_learning_check():
    report = _module(ROOT / "experiments" / "mini" / "report.py")
    key = "eval/arith_program:heldout/greedy"

    def run(seed, curve):  # held-out accuracy at steps 0, 5, 10
        return {"seed": seed, "records": [{"step": 5 * i, key: v} for i, v in enumerate(curve)]}

    grpo = [run(1, [0.5, 0.7, 0.8]), run(2, [0.5, 0.6, 0.9]), run(3, [0.5, 0.8, 0.7])]
    control = [run(1, [0.5, 0.5, 0.49]), run(2, [0.5, 0.52, 0.5]), run(3, [0.5, 0.48, 0.51])]
    table = {"grpo": report.summarize_method(grpo, "arith_program", ["greedy"]),
             "grpo_permuted": report.summarize_method(control, "arith_program", ["greedy"])}
    st = table["grpo"]["modes"]["greedy"]
    assert st["mean_during_rl"]["per_seed"] == pytest.approx([0.75, 0.75, 0.75])
    assert st["gain"]["per_seed"] == pytest.approx([0.3, 0.4, 0.2])
    assert st["best"]["per_seed"] == pytest.approx([0.8, 0.9, 0.8])
    lines = report.learning_check(table, ["greedy"])
    assert any(line.startswith("- grpo, greedy") and "**rose**" in line for line in lines)
    assert any(line.startswith("- grpo_permuted, greedy") and "**within noise**" in line for line in lines)


def test_the_pilots_paired_interval_sees_what_two_separate_intervals_cannot():
    """`paired_diff_ci`: prompts of very different difficulty, rule A one more decisive point than rule B in every
    prompt. The separate bootstrap intervals overlap; the paired one (both rules on the same resample of prompts)
    lies above 0. Identical rules give exactly 0."""
    pilot = _module(ROOT / "experiments" / "mini" / "pilot.py")
    rng = np.random.default_rng(0)
    prompts, points = 16, 4
    base = rng.integers(0, 4, prompts)  # decisive points of rule B per prompt: 0..3 of 4
    b = np.arange(points)[None, :] < base[:, None]
    a = np.arange(points)[None, :] < (base + 1)[:, None]
    ok = np.ones((prompts, points), bool)
    ci_a, ci_b = pilot.share_ci(a, ok), pilot.share_ci(b, ok)
    assert ci_a[0] <= ci_b[1]  # the separate intervals overlap
    paired = pilot.paired_diff_ci(a, ok, b, ok)
    assert paired["diff"] == pytest.approx(0.25) and paired["ci95"][0] > 0
    same = pilot.paired_diff_ci(b, ok, b, ok)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0]}
    assert pilot.paired_diff_ci(a, np.zeros_like(ok), b, ok) is None


def test_report_regenerates_exactly_the_runs_present(tmp_path):
    """One run_grid line per (tasks, seeds) set of methods; a method with other seeds on another task gets a line
    per task, never a seed it does not have."""
    report = _module(ROOT / "experiments" / "mini" / "report.py")
    (tmp_path / "grid.json").write_text(json.dumps({"overrides": ["train.steps=30"]}))
    runs = [{"method": m, "task": t, "seed": s} for m, t, s in [
        ("grpo", "kb", 1), ("grpo", "kb", 2), ("grpo", "arith", 1), ("appo", "kb", 1), ("appo", "kb", 2),
        ("dapo", "arith", 1)]]
    lines = report.regenerate_command(tmp_path, runs).splitlines()
    base = "python experiments/mini/run_grid.py --methods"
    assert lines == [f"{base} grpo,dapo --seeds 1 --tasks arith --out {tmp_path} --set train.steps=30",
                     f"{base} grpo,appo --seeds 1,2 --tasks kb --out {tmp_path} --set train.steps=30"]


def _write_run(root, method, seed, n, final, task="kb_multihop"):
    """A finished run_grid run (result.json + metrics.jsonl): held-out 0.5 before RL, ``final`` after 5 steps."""
    key = f"eval/{task}:heldout/greedy"
    d = root / task / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"task": task, "method": method, "seed": seed, "seconds": 60.0,
                                               "summary": {}, "config": {"algorithm": {"n": n}}}))
    records = ({"step": 0, key: 0.5}, {"step": 5, key: final, "time/step_s": 2.0, "rollout/generated_tokens": 100.0})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def test_report_compares_appo_with_grpo_at_each_budget(tmp_path):
    """``--budget``: a second grid at another algorithm.n; per budget the final accuracies and APPO - GRPO (Welch)."""
    report = _module(ROOT / "experiments" / "mini" / "report.py")
    write = _write_run

    for seed, (g8, a8, g16, a16) in enumerate([(0.6, 0.7, 0.6, 0.9), (0.62, 0.69, 0.61, 0.92),
                                               (0.58, 0.72, 0.63, 0.91)], start=1):
        write(tmp_path / "n8", "grpo", seed, 8, g8)
        write(tmp_path / "n8", "appo", seed, 8, a8)
        write(tmp_path / "n16", "grpo", seed, 16, g16)
        write(tmp_path / "n16", "appo", seed, 16, a16)
    report.main([str(tmp_path / "n8"), "--budget", str(tmp_path / "n16")])
    budget = json.loads((tmp_path / "n8" / "results.json").read_text())["budget"]["kb_multihop"]
    assert set(budget) == {"8", "16"}
    assert budget["8"]["appo - grpo"]["diff"] == pytest.approx(0.1033, abs=1e-3)
    assert budget["16"]["appo - grpo"]["diff"] == pytest.approx(0.2967, abs=1e-3)
    paired = json.loads((tmp_path / "n8" / "results.json").read_text())["tasks"]["kb_multihop"]["comparisons_paired"]
    assert paired["appo - grpo"]["greedy final"]["diff"] == pytest.approx(0.1033, abs=1e-3)
    assert paired["appo - grpo"]["greedy final"]["seeds"] == [1, 2, 3]
    text = (tmp_path / "n8" / "RESULTS.md").read_text()
    assert "| kb_multihop | 16 | greedy |" in text and "reproduced" in text
    assert f"report.py {tmp_path / 'n8'} --budget {tmp_path / 'n16'}" in text
    with pytest.raises(SystemExit, match="no finished runs"):
        report.main([str(tmp_path / "n8"), "--budget", str(tmp_path)])
    # --rerun: the n16 grid stands in for new seeds; APPO's gains (+0.2 / +0.41 mean) agree in sign but not in
    # interval, GRPO's (+0.1 / +0.113) overlap
    report.main([str(tmp_path / "n8"), "--rerun", str(tmp_path / "n16")])
    rerun = json.loads((tmp_path / "n8" / "results.json").read_text())["rerun"]["kb_multihop"]
    assert rerun["appo"]["same_sign"] and not rerun["appo"]["intervals_overlap"]
    assert rerun["grpo"]["same_sign"] and rerun["grpo"]["intervals_overlap"]
    assert "| kb_multihop | appo | greedy |" in (tmp_path / "n8" / "RESULTS.md").read_text()


def test_report_rebuilds_from_its_records_and_merges_new_runs(tmp_path):
    """runs.jsonl: the report of the records alone (run directories gone) equals the report of the runs; new runs
    merge with old records (a run directory wins over a record of the same run); the budget grid survives in the
    records; a malformed record is an error naming its line."""
    report = _module(ROOT / "experiments" / "mini" / "report.py")
    finals = {"grpo": [0.6, 0.62, 0.58], "appo": [0.7, 0.69, 0.72]}
    for method, values in finals.items():
        for seed, v in enumerate(values, 1):
            _write_run(tmp_path / "grid", method, seed, 8, v)
            _write_run(tmp_path / "n16", method, seed, 16, v + 0.1)
    report.main([str(tmp_path / "grid"), "--budget", str(tmp_path / "n16")])
    first = json.loads((tmp_path / "grid" / "results.json").read_text())
    records = [json.loads(x) for x in (tmp_path / "grid" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["grid"], r["method"], r["seed"]) for r in records) == sorted(
        (g, m, s) for g in ("main", "budget") for m in finals for s in (1, 2, 3))
    assert all(r["curves"]["greedy"]["accuracy"][0] == 0.5 for r in records)
    text = (tmp_path / "grid" / "RESULTS.md").read_text()
    # the run directories are gone: the records alone rebuild the same tables, the budget section included
    shutil.rmtree(tmp_path / "n16")
    for method in finals:
        shutil.rmtree(tmp_path / "grid" / "kb_multihop" / method)
    report.main([str(tmp_path / "grid")])
    again = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert again["tasks"] == first["tasks"] and again["budget"] == first["budget"]
    assert (tmp_path / "grid" / "RESULTS.md").read_text().split("## kb_multihop")[1] == text.split("## kb_multihop")[1]
    assert "6 runs, 6.0 minutes" in text  # the main grid's 6 runs x 60 s
    # a new grid: seed 4 of each and a new seed 1 of GRPO (its directory wins over the old record)
    _write_run(tmp_path / "new", "grpo", 4, 8, 0.64)
    _write_run(tmp_path / "new", "appo", 4, 8, 0.71)
    _write_run(tmp_path / "new", "grpo", 1, 8, 0.9)
    report.main([str(tmp_path / "new"), "--records", str(tmp_path / "grid" / "runs.jsonl")])
    merged = json.loads((tmp_path / "new" / "results.json").read_text())["tasks"]["kb_multihop"]["methods"]
    assert merged["grpo"]["seeds"] == [1, 2, 3, 4] and merged["appo"]["seeds"] == [1, 2, 3, 4]
    assert merged["grpo"]["final_heldout_accuracy"]["per_seed"] == pytest.approx([0.9, 0.62, 0.58, 0.64])
    regen = (tmp_path / "new" / "RESULTS.md").read_text()
    assert f"--out {tmp_path / 'grid'}" in regen and f"--out {tmp_path / 'new'}" in regen
    # a record recovered without curves counts in the tables, not in the plots
    bare = dict(records[0], curves=None, seconds=None, origin="a test", seed=9,
                modes={"greedy": {"final": 0.3}})
    (tmp_path / "bare.jsonl").write_text(json.dumps(bare) + "\n")
    report.main([str(tmp_path / "new"), "--records", str(tmp_path / "bare.jsonl")])
    text = (tmp_path / "new" / "RESULTS.md").read_text()
    assert "leave out 1 run(s)" in text and "the other 1 are records recovered without one" in text
    # an explicit --records file beats the directory's own runs.jsonl (a re-run seed replaces its old record)
    redo = dict(bare, seed=1, method="appo", modes={"greedy": {"final": 0.1}})
    (tmp_path / "redo.jsonl").write_text(json.dumps(redo) + "\n")
    report.main([str(tmp_path / "grid"), "--records", str(tmp_path / "redo.jsonl")])
    appo = json.loads((tmp_path / "grid" / "results.json").read_text())["tasks"]["kb_multihop"]["methods"]["appo"]
    assert appo["final_heldout_accuracy"]["per_seed"] == pytest.approx([0.1, 0.69, 0.72])
    for i, bad in enumerate((json.dumps({"grid": "main"}), "42", "{not json"), 1):
        (tmp_path / f"bad{i}.jsonl").write_text(bad + "\n")
        with pytest.raises(SystemExit, match=f"bad{i}.jsonl:1 is not"):
            report.main([str(tmp_path / "new"), "--records", str(tmp_path / f"bad{i}.jsonl")])


@pytest.mark.heavy(order=1)
def test_grid_smoke(tmp_path, capsys):
    """The CI smoke of the grid: 1 seed, 2 steps, APPO and the oracle on arith_program (GRPO trains in
    tests/test_learning.py and tests/test_train_rl.py), then the report."""
    out = tmp_path / "grid"
    sets = ["--set", "train.steps=2", "--set", "sft.steps=8", "--set", "sft.examples=32", "--set",
            "logging.eval_limit=8", "--set", "logging.eval_every=2", "--set", "train.prompts_per_step=4",
            "--set", "train.mini_batch_prompts=4", "--set", "logging.progress=false"]
    cmd = [sys.executable, str(ROOT / "experiments" / "mini" / "run_grid.py"), "--methods", "appo,appo_oracle", "--seeds",
           "1", "--tasks", "arith_program", "--out", str(out), *sets]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "arith_program" / "appo" / "seed1" / "result.json").is_file()
    assert len(list((out / "sft").glob("sft-*.npz"))) == 1  # one SFT policy, shared by the two methods
    # the same grid again, another one into its directory, an unknown method: in this process (no start-up)
    run_grid = _module(ROOT / "experiments" / "mini" / "run_grid.py")
    capsys.readouterr()
    run_grid.main(cmd[2:])
    assert capsys.readouterr().out.count("done before") == 2  # resumable, nothing overwritten
    with pytest.raises(SystemExit, match="another grid"):
        run_grid.main(cmd[2:-2])
    with pytest.raises(SystemExit, match="nope"):
        run_grid.main(cmd[2:3] + ["appo,nope"] + cmd[4:])
    rep = subprocess.run([sys.executable, str(ROOT / "experiments" / "mini" / "report.py"), str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert rep.returncode == 0, rep.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    final = results["tasks"]["arith_program"]["methods"]["appo"]["final_heldout_accuracy"]
    assert set(final) == {"mean", "ci95", "per_seed"} and len(final["per_seed"]) == 1
    assert (out / "RESULTS.md").read_text().startswith("# Mini reproduction")
    assert (out / "arith_program_vs_tokens.png").stat().st_size > 1000
    pilot = subprocess.run([sys.executable, str(ROOT / "experiments" / "mini" / "pilot.py"), "--task", "arith_program",
                            "--grid", str(out), "--rl-steps", "0", "--prompts", "2", "--k", "2"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert pilot.returncode == 0, pilot.stderr[-3000:]
    result = json.loads(pilot.stdout.strip().splitlines()[-1])
    assert set(result["rules"]) >= {"branching_score_lagged", "entropy_only", "oracle", "arpo_after_tool_call", "random"}
    random = result["rules"]["random"]
    assert set(random["minus_branching_score_lagged"] or {"diff": 0, "ci95": 0}) == {"diff", "ci95"}
    assert sum(random["per_prompt_points"]) == random["points"] and len(random["per_prompt_decisive"]) == 2
    assert set(result["omega_std_per_baseline"]) == {"lagged", "sampler", "reference"}
    shares = result["decision_tokens_that_are_candidates"]
    assert set(shares) == {"appo_jax", "official"}
    if shares["official"] is not None:  # the official rule excludes only whitespace: a superset of candidates
        assert 0.0 <= shares["appo_jax"] <= shares["official"] <= 1.0
