"""RL that learns, and controls that do not: the guard against silent wiring bugs (masks, alignment, a stale
sampler, a sign).

A random tiny policy (the mini-tasks tokenizer, 512 ids) emits a digit in about 1% of its characters; the reward
is the share of digits in the response, a behaviour it shows sometimes. GRPO through the real trainer (jitted
sampler, rewards, advantages, loss, AdamW, new weights to the sampler) must raise it far beyond its seed-to-seed
noise in 16 iterations, for every seed (measured: +0.30 to +0.74 over seeds 1-3); the same runs with the rewards permuted inside each prompt group
(``algorithm.control = permute_rewards``: the advantages of GRPO permuted within groups) or negated must not.

The 7 runs (112 iterations) run in a child process (``python tests/test_learning.py WORKDIR OUT``) at XLA's default
optimisation level: unlike the rest of the suite they spend their time executing, not compiling, and the suite's
level 0 (``conftest.py``) makes that about 1.6x slower.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appo_jax.core.registry import CONTROLS
from appo_jax.rewards.arpo import RewardOutput
from appo_jax.rewards.registry import register_reward
from appo_jax.training.config import ExperimentConfig
from appo_jax.training.learning_signals import heldout_changes, kl_to_reference, run_warnings, signal_warnings
from appo_jax.training.significance import accuracy_change, difference_interval, wilson_interval

STEPS, SEEDS = 16, (1, 2, 3)


def digit_share(response, ground_truths):
    s = sum(c.isdigit() for c in response) / max(len(response), 1)
    return RewardOutput(s, s, None, True, "", {})


register_reward("test_digit_share", digit_share)


def learning_config(workdir, seed: int, control: str = "none") -> ExperimentConfig:
    c = ExperimentConfig(name=f"learning-{control}-{seed}", workdir=str(workdir))
    c.model.name, c.model.tokenizer, c.model.init_seed = "tiny-llama", "mini-tasks", seed
    d = c.data
    d.train, d.limit, d.reward, d.system_prompt, d.seed = "toy_arithmetic", 64, "test_digit_share", "Answer.", seed
    r = c.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit, r.decode_chunk, r.tool_workers = 64, 16, 0, 16, 1
    c.algorithm.name, c.algorithm.n, c.algorithm.control = "grpo", 8, control
    t = c.train
    t.steps, t.prompts_per_step, t.mini_batch_prompts, t.seed = STEPS, 4, 4, seed
    c.optimizer.lr, c.optimizer.weight_decay = 1e-2, 0.0
    c.loss.kl_coef = 0.0
    c.mesh.data = 1
    c.checkpoint.every = 0
    c.logging.progress, c.logging.tensorboard = False, False
    return c


def _reward_curve(tmp_path, seed, control):
    from appo_jax.training.trainer import Trainer
    trainer = Trainer(learning_config(tmp_path / f"{control}-{seed}", seed, control), log=lambda _: None)
    try:
        metrics = [trainer.train_iteration() for _ in range(STEPS)]
    finally:
        trainer.close()
    return metrics


def _gain(metrics) -> float:
    """Mean reward of the last 4 iterations minus that of the first 4."""
    rewards = [m["reward/mean"] for m in metrics]
    return float(np.mean(rewards[-4:]) - np.mean(rewards[:4]))


RUNS = [(control, seed)
        for control, seeds in (("none", SEEDS), ("permute_rewards", SEEDS), ("negate_rewards", SEEDS[:1]))
        for seed in seeds]


def _optimised_env() -> dict:
    """This process's environment with XLA's optimisation level left at its default (module doc)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
    return dict(os.environ, XLA_FLAGS=" ".join(flags))


def test_grpo_learns_and_the_controls_do_not(tmp_path):
    out = tmp_path / "curves.json"
    child = subprocess.run([sys.executable, __file__, str(tmp_path), str(out)], env=_optimised_env(),
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    curves = json.loads(out.read_text())
    runs = {(control, seed): curves[f"{control}/{seed}"] for control, seed in RUNS}
    gains = {k: _gain(m) for k, m in runs.items()}
    real = [gains[k] for k in gains if k[0] == "none"]
    controls = [gains[k] for k in gains if k[0] != "none"]
    noise = max(float(np.std([gains["permute_rewards", s] for s in SEEDS])), 0.01)
    # the start: about 1% digits in every run; a learning run's gain is >= 10x the controls' seed-to-seed noise
    assert all(np.mean([m["reward/mean"] for m in r[:4]]) < 0.05 for r in runs.values())
    assert min(real) > 0.15 and min(real) > max(controls) + 10 * noise, gains
    assert max(controls) < 0.05, gains
    # the learning signals of a learning run: groups with variance, the KL to the start grows, entropy falls
    m = runs["none", 1]
    assert all(0 <= x["reward/groups_with_variance"] <= 1 for x in m) and m[0]["reward/groups_with_variance"] > 0.5
    assert m[-1]["kl/to_start"] > 10 * max(m[0]["kl/to_start"], 1e-4)
    assert m[-1]["entropy/mean"] < m[0]["entropy/mean"]
    assert all(x["reward/format_ok"] == 1.0 for x in m)  # this reward has no format check


def test_the_controls_take_the_signal_out():
    import jax
    rewards = np.arange(12, dtype=np.float32)
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, -1, -1], np.int32)
    kind = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], np.int32)
    seen = set()
    for k in range(20):
        out = np.asarray(CONTROLS.get("permute_rewards")(rewards, groups, kind, jax.random.PRNGKey(k)))
        for seg in ((groups == 0) & (kind == 0), groups == 1, kind == 1, groups == -1):
            assert sorted(out[seg]) == sorted(rewards[seg])  # a permutation inside each (group, kind) segment
        seen.add(tuple(out))
    assert len(seen) > 5  # fresh permutations
    np.testing.assert_array_equal(CONTROLS.get("negate_rewards")(rewards, groups, kind, None), -rewards)
    np.testing.assert_array_equal(CONTROLS.get("none")(rewards, groups, kind, None), rewards)


def test_binomial_intervals_match_published_values():
    # Newcombe (1998), Stat. Med. 17: Wilson 81/263 = [0.2553, 0.3662]; 56/70 - 48/80 = 0.2, method 10 [0.0524, 0.3339]
    np.testing.assert_allclose(wilson_interval(81 / 263, 263), (0.2553, 0.3662), atol=1e-4)
    np.testing.assert_allclose(difference_interval(48 / 80, 80, 56 / 70, 70), (0.0524, 0.3339), atol=1e-4)
    assert wilson_interval(0.0, 0) == (0.0, 1.0)
    assert accuracy_change(0.25, 0.45, 256)["verdict"] == "rose"
    assert accuracy_change(0.25, 0.28, 64)["verdict"] == "within noise"
    assert accuracy_change(0.5, 0.1, 64)["verdict"] == "fell"


def test_kl_to_reference_is_the_k3_estimate():
    rng = np.random.default_rng(0)
    lp, ref = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    mask = rng.random((3, 5)) > 0.3
    d = (ref - lp)[mask]
    assert kl_to_reference(lp, ref, mask) == pytest.approx(float(np.mean(np.exp(d) - 1 - d)))
    assert kl_to_reference(lp, lp, mask) == 0.0 and kl_to_reference(lp, ref, np.zeros_like(mask)) == 0.0


def test_the_summary_says_when_a_run_collapsed():
    records = [{"step": 0, "eval/t:heldout/greedy": 0.5}]
    records += [{"step": i, "reward/format_ok": f, "reward/groups_with_variance": 0.5}
                for i, f in enumerate((0.9, 0.8, 0.9, 0.5, 0.0, 0.0, 0.01), start=1)]
    records.append({"step": 8, "eval/t:heldout/greedy": 0.05})
    heldout = heldout_changes(records, {"t:heldout": 128}, runs=1)
    change = heldout["eval/t:heldout/greedy"]
    assert change["verdict"] == "fell" and change["n"] == 128 and (change["first_step"], change["last_step"]) == (0, 8)
    warnings = run_warnings(records, heldout)
    assert any(w.startswith("collapse:") for w in warnings)
    assert any("fell beyond noise" in w for w in warnings)
    flat = [{"step": i, "reward/groups_with_variance": 0.0} for i in range(1, 4)]
    assert any("no prompt group had reward variance" in w for w in run_warnings(flat, {}))


def test_a_config_without_signal_warns_at_start(tmp_path):
    from appo_jax.training.trainer import Trainer
    register_reward("test_constant", lambda response, ground_truths: 0.5)
    cfg = learning_config(tmp_path / "const", 1)
    cfg.data.reward, cfg.algorithm.n = "test_constant", 1
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    trainer.close()
    text = "\n".join(lines)
    assert "each prompt group has 1 rollout" in text and "gives the same score (0.5)" in text


def test_the_start_probe_asks_the_reward_about_a_right_a_wrong_and_an_empty_answer():
    from types import SimpleNamespace

    from appo_jax.rewards.registry import get_reward_fn

    cfg = ExperimentConfig(name="probe", workdir="unused")
    math = get_reward_fn("arpo_math")
    for truth, wrong in (("12", "13"), ("-4", "-3"), ("\\frac{1}{2}", "\\frac{1}{2}x0")):
        asked = []

        def reward(rec, text):
            asked.append(text)
            return math(text, rec.ground_truths)

        rec = SimpleNamespace(id="r0", ground_truths=[truth])
        assert signal_warnings(cfg, 4, [rec], reward) == []  # the math reward separates the three
        assert asked == ["", f"<answer>\\boxed{{{truth}}}</answer>", f"<answer>\\boxed{{{wrong}}}</answer>"]


if __name__ == "__main__":  # the child of test_grpo_learns_and_the_controls_do_not: WORKDIR OUT
    workdir, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.write_text(json.dumps({f"{control}/{seed}": _reward_curve(workdir, seed, control) for control, seed in RUNS},
                              default=float))
