"""Experiment configs: loading, --set overrides with type coercion, validation errors, algorithm resolution."""
import glob
import os

import numpy as np
import pytest

from appo_jax.training.config import (ALGORITHMS, ConfigError, ExperimentConfig, algorithm_spec, apply_overrides,
                                      from_dict, load_config, resolved_loss, to_dict, validate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small():
    cfg = ExperimentConfig()
    cfg.train.prompts_per_step, cfg.train.mini_batch_prompts = 4, 2
    cfg.algorithm.n, cfg.algorithm.n_init = 4, 2
    return cfg


def test_overrides_coerce_types_and_copy():
    cfg = _small()
    new = apply_overrides(cfg, ["optimizer.lr=2e-5", "train.steps=7", "loss.fkl_high_only=false",
                                "algorithm.dynamic_sampling=true", "loss.clip_high=none", "name=x", "train.steps=8.0"])
    assert new.optimizer.lr == 2e-5 and new.train.steps == 8 and new.loss.fkl_high_only is False
    assert new.algorithm.dynamic_sampling is True and new.loss.clip_high is None and new.name == "x"
    assert cfg.optimizer.lr == 1e-6 and cfg.train.steps == 100  # the original is untouched
    assert from_dict(to_dict(new)) == new


@pytest.mark.parametrize("item,match", [
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("optimizer=1", "is a section"),
    ("train.steps=abc", "expected an integer"),
    ("train.steps=1.5", "expected an integer"),
    ("loss.fkl_high_only=maybe", "expected a boolean"),
    ("optimizer.lr", "expected key=value"),
])
def test_bad_overrides_name_the_key(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(_small(), [item])


@pytest.mark.parametrize("item,match", [
    ("algorithm.name=ppo2", "unknown algorithm 'ppo2'; known algorithms: grpo, dapo"),
    ("algorithm.omega_baseline=oracle", "algorithm.omega_baseline='oracle'"),
    ("loss.agg=sum", "loss.agg='sum'"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0"),
    ("algorithm.n_init=4", "needs a branch budget"),
    ("train.mini_batch_prompts=3", "must be a multiple of train.mini_batch_prompts=3"),
    ("train.micro_batch_rows=3", "must divide the rows of a mini-batch"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("mesh.fsdp=3", "does not fit 8 devices"),
])
def test_validation_errors(item, match):
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(_small(), [item]), num_devices=8)


def test_batch_must_divide_the_mesh():
    cfg = apply_overrides(_small(), ["train.micro_batch_rows=2"])
    validate(cfg, num_devices=2)
    with pytest.raises(ConfigError, match="does not divide the mesh.*data x fsdp = 4 x 1 = 4 shards"):
        validate(cfg, num_devices=4)
    validate(apply_overrides(cfg, ["mesh.data=1", "mesh.tensor=4"]), num_devices=4)  # tensor does not split rows


# docs/algorithm.md §1.6-§1.7: (loss mode, clip_high) of each algorithm.
EXPECTED_LOSS = {"grpo": ("dual_clip", 0.2), "dapo": ("ppo", 0.28), "arpo": ("dual_clip", 0.2),
                 "aepo": ("aepo", 0.2), "tree_grpo": ("dual_clip", 0.2), "appo_no_future_kl": ("dual_clip", 0.28),
                 "reinforce_pp": ("ppo", 0.2), "reinforce_pp_baseline": ("ppo", 0.2), "gppo": ("gppo", 0.28),
                 "cispo": ("cispo", 0.28), "gigpo": ("dual_clip", 0.2)}


def test_algorithm_resolution_follows_the_design():
    assert set(ALGORITHMS) == {"grpo", "dapo", "arpo", "aepo", "tree_grpo", "appo", "appo_entropy_only",
                               "appo_omega_only", "appo_no_prefix_credit", "appo_no_dual_group", "appo_no_procedure_scaling",
                               "appo_no_future_kl", "appo_oracle", "reinforce_pp", "reinforce_pp_baseline", "gppo",
                               "cispo", "gigpo"}
    for name in ALGORITHMS:
        labelled = ["data.train=arith_program"] if ALGORITHMS[name].score == "oracle" else []  # needs decision labels
        cfg = apply_overrides(_small(), [f"algorithm.name={name}", *labelled])
        validate(cfg, num_devices=1)
        loss = resolved_loss(cfg)
        assert (loss["mode"], loss["clip_high"]) == EXPECTED_LOSS.get(name, ("future_kl", 0.28)), name
        assert loss["clip_low"] == 0.2 and loss["clip_ratio_c"] == 3.0 and loss["kl_coef"] == 0.001
    cfg = apply_overrides(_small(), ["algorithm.name=grpo", "loss.mode=ppo", "loss.clip_high=0.3",
                                     "algorithm.procedure_scaling=advantage"])
    spec = algorithm_spec(cfg)
    assert (spec.loss_mode, spec.clip_high, spec.procedure_scaling) == ("ppo", 0.3, "advantage")
    assert algorithm_spec(apply_overrides(_small(), ["algorithm.name=dapo"])).dynamic_sampling


def test_load_config_file_and_errors(tmp_path):
    good = tmp_path / "exp.py"
    good.write_text("from appo_jax.training.config import ExperimentConfig\n"
                    "def get_config():\n    c = ExperimentConfig(name='t')\n    c.train.steps = 3\n    return c\n")
    assert load_config(good).train.steps == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        load_config(bad)


def test_every_experiment_file_loads_and_validates():
    files = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
    assert files, "no experiment configs"
    for path in files:
        cfg = load_config(path)
        validate(cfg)


def test_adding_an_algorithm_as_the_docs_show(tmp_path):
    """docs/architecture.md, "Adding an algorithm": its code block, run as written, registers an estimator and an
    algorithm that an experiment config then selects by name and validates."""
    import re
    from pathlib import Path

    from appo_jax.core.advantages import compute_advantages
    from appo_jax.training.algorithms import ALGORITHMS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    block = re.search(r"```python\n# my_algorithms.py\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {}
    try:
        exec(compile(block, "my_algorithms.py", "exec"), namespace)
        cfg = apply_overrides(_small(), ["algorithm.name=appo_mean_centred"])
        validate(cfg)
        spec = algorithm_spec(cfg)
        assert (spec.rollout_strategy, spec.advantage, spec.procedure_scaling) == ("appo", "appo_mean_centred", "none")
        rewards = np.array([1.0, 0.0, 0.5, 0.5], np.float32)
        adv = compute_advantages("appo_mean_centred", rewards=rewards, group_ids=np.zeros(4, np.int32),
                                 is_branch=np.zeros(4, bool), parent=np.full(4, -1), branch_pos=np.full(4, -1),
                                 gen_mask=np.ones((4, 3), bool), num_groups=1)
        np.testing.assert_allclose(np.asarray(adv)[:, 0], rewards - rewards.mean(), atol=1e-6)
    finally:
        ALGORITHMS.pop("appo_mean_centred", None)
        from appo_jax.core.registry import ADVANTAGES
        ADVANTAGES._items.pop("appo_mean_centred", None)


def test_a_misspelt_option_key_is_a_config_error_naming_the_algorithm_and_the_known_keys():
    """The options of an algorithm's estimator and rollout strategy are typed: a key neither takes, in
    algorithm.options or set on the section by a Python config file, fails validation (nothing runs) naming the
    algorithm and the keys it knows; a correct key reaches the options dataclass."""
    from appo_jax.core.advantages import AepoAdvantageOptions

    cfg = apply_overrides(_small(), ["algorithm.name=aepo", 'algorithm.options={"entropy_scop": "rollout"}'])
    with pytest.raises(ConfigError, match="algorithm 'aepo' has no option 'entropy_scop' .*known keys: "
                                          "aepo_entropy_alpha, aepo_penalty, arpo_alpha, arpo_beam, arpo_beta, "
                                          "entropy_scope, n, n_init, norm_by_std"):
        validate(cfg)
    cfg = apply_overrides(_small(), ["algorithm.name=aepo", 'algorithm.options={"entropy_scope": "rollout"}'])
    validate(cfg)
    assert algorithm_spec(cfg).advantage_options(cfg.algorithm) == AepoAdvantageOptions(entropy_scope="rollout")
    with pytest.raises(ConfigError, match="algorithm.options\\['norm_by_std'\\].*set algorithm.norm_by_std"):
        validate(apply_overrides(_small(), ['algorithm.options={"norm_by_std": false}']))
    with pytest.raises(ConfigError, match="unknown entropy scope 'tokens'"):
        validate(apply_overrides(_small(), ["algorithm.name=aepo", 'algorithm.options={"entropy_scope": "tokens"}']))
    cfg = _small()  # a Python config file setting a misspelt attribute on the section
    cfg.algorithm.name, cfg.algorithm.gigpo_gama = "gigpo", 0.9
    with pytest.raises(ConfigError, match="unknown config key 'algorithm.gigpo_gama': algorithm 'gigpo' has no "
                                          "option 'gigpo_gama' .*known keys: gigpo_gamma, gigpo_step_weight, n, "
                                          "norm_by_std"):
        validate(cfg)
    cfg = _small()
    cfg.optimizer.lrr = 1e-5
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lrr': optimizer has lr, "):
        validate(cfg)


@pytest.mark.parametrize("knob,value", [("arpo_alpha", "0.7"), ("arpo_beta", "0.3"), ("arpo_beam", "3"),
                                        ("aepo_penalty", "0.1"), ("tree_rounds", "2")])
def test_the_rollout_schemes_knobs_moved_to_the_algorithm_section(knob, value):
    """ARPO / AEPO / Tree-GRPO's knobs are the algorithm's: rollout.<knob> (--set, a dict, or a Python config
    file) is an error naming the new key; algorithm.<knob> reaches the strategy's options."""
    moved = f"rollout.{knob} moved to algorithm.{knob}"
    with pytest.raises(ConfigError, match=moved):
        apply_overrides(_small(), [f"rollout.{knob}={value}"])
    d = to_dict(_small())
    d["rollout"][knob] = float(value)
    with pytest.raises(ConfigError, match=moved):
        from_dict(d)
    cfg = _small()
    setattr(cfg.rollout, knob, float(value))
    with pytest.raises(ConfigError, match=moved):
        validate(cfg)
    name = {"aepo_penalty": "aepo", "tree_rounds": "tree_grpo"}.get(knob, "arpo")
    cfg = apply_overrides(_small(), [f"algorithm.name={name}", f"algorithm.{knob}={value}"])
    validate(cfg)
    options = algorithm_spec(cfg).strategy(cfg.algorithm).options
    assert getattr(options, knob) == type(getattr(options, knob))(float(value))


@pytest.mark.parametrize("item,match", [("algorithm.arpo_beam=1", "algorithm.arpo_beam=1"),
                                        ("algorithm.tree_rounds=0", "algorithm.tree_rounds=0"),
                                        ("algorithm.aepo_penalty=-1", "algorithm.aepo_penalty=-1.0")])
def test_the_rollout_schemes_knobs_are_checked(item, match):
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(_small(), [item]))


def test_candidate_rule_control_and_eval_modes_are_checked():
    from appo_jax.training.config import candidate_rule, eval_modes
    cfg = _small()
    assert candidate_rule(cfg.algorithm) == "appo_jax"
    assert candidate_rule(apply_overrides(cfg, ["algorithm.branching_parity=official"]).algorithm) == "official"
    assert candidate_rule(apply_overrides(cfg, ["algorithm.candidate_rule=official"]).algorithm) == "official"
    assert eval_modes(apply_overrides(cfg, ["logging.eval_modes=greedy, train"]).logging) == ["greedy", "train"]
    for item, match in (("algorithm.candidate_rule=words", "algorithm.candidate_rule='words'.*'appo_jax', 'official'"),
                        ("algorithm.control=shuffle", "algorithm.control='shuffle'.*'permute_rewards'"),
                        ("logging.eval_modes=greedy,hot", "logging.eval_modes='hot'.*'greedy', 'train'"),
                        ("logging.eval_modes=,", "logging.eval_modes is empty"),
                        ("sft.eval_every=-1", "sft.eval_every")):
        with pytest.raises(ConfigError, match=match):
            validate(apply_overrides(cfg, [item]))
