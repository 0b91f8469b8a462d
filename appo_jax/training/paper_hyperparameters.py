"""The APPO paper's experiments in one place: the hyperparameters of the paper's text and of the official scripts
(AMAP-ML/APPO), and the builder of a paper-table row's config from them (docs/paper_configs.md).

Two hyperparameter sets, ``paper`` (the paper's text, the default of every table row) and ``official`` (the
official training scripts; ``ROW,official`` selects it), each per setup: ``reasoning`` (Tables 1, 3 and 4:
Qwen2.5-7B-Instruct / Llama-3.1-8B-Instruct on the 10k math + QA RL set), ``deep_search_8b`` and
``deep_search_14b`` (Table 2: Qwen3-8B / Qwen3-14B on the 1k hard-search set). Every number is commented with its
source; a value neither source states is the config default or this project's choice and says so.

* :data:`SETS` -- set -> setup -> ``{"section.field": value}`` plus ``"epochs"`` (training epochs over the data,
  turned into ``train.steps`` by :func:`steps_for`).
* :data:`SETUPS` -- what a setup fixes whatever the set (data, tool-call limit, prompt length, logging cadence).
* :func:`select_row` -- parses ``ROW[,official]`` against a table's rows (a clear error listing them otherwise).
* :func:`paper_config` -- the row's :class:`ExperimentConfig`.

The table files ``experiments/paper/table*.py`` hold only their rows and what a row changes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from appo_jax.rollout.strategies import budget_n
from appo_jax.training.config import ConfigError, ExperimentConfig, rows_per_mini_batch

#: The hyperparameter sets: ``paper`` (the default) and ``official`` (``ROW,official``).
SET_NAMES = ("paper", "official")

#: Training prompts per dataset (the row counts of ``rl/train_10k.parquet`` and ``rl/hard_search_1k.parquet``):
#: one epoch is ``records // prompts_per_step`` steps (verl's loader drops the last partial batch).
DATASET_RECORDS = {"train_10k": 10000, "hard_search_1k": 1071}

# The paper's text: its hyperparameter paragraph (Qwen2.5-7B / Llama3.1-8B reasoning runs).
_PAPER_REASONING = {
    "train.prompts_per_step": 128,               # the paper's text: batch size 128
    "train.mini_batch_prompts": 16,              # the paper's text: PPO mini-batch 16
    "algorithm.n": 16,                           # the paper's text: 16 rollouts per prompt
    "algorithm.n_init": 4,                       # the paper's text: 4 initial rollouts (N = 4, B = 3, L = 1)
    "algorithm.branch_selection": "per_rollout",  # the paper's text: B branches per initial rollout (§1.10)
    "rollout.max_response_len": 4096,            # the paper's text: maximum response length 4096
    "loss.fkl_weight": 0.5,                      # the paper's text: future-KL weight b = 0.5
    "loss.decay_rate": 32.0,                     # the paper's text: gamma = 2^(-1/32)
    "loss.kl_coef": 0.0,                         # the paper's text: KL coefficient beta = 0
    "sft.lr": 7e-6,                              # the paper's text: cold-start SFT lr 7e-6 (inert: sft.steps = 0)
    "sft.batch_size": 128,                       # the paper's text: SFT batch 128 (inert: sft.steps = 0)
    "sft.max_response_len": 4096,                # the paper's text: SFT maximum length 4096 (inert: sft.steps = 0)
    "epochs": 2,                                 # the paper's text: 2 training epochs
}

# The official scripts: the 7B reasoning script (Tables 1, 3, 4).
_OFFICIAL_REASONING = {
    "train.prompts_per_step": 96,                # the official scripts: train batch 96 prompts
    "train.mini_batch_prompts": 16,              # the official scripts: PPO mini-batch 16
    "algorithm.n": 16,                           # the official scripts: n = 16
    "algorithm.n_init": 8,                       # the official scripts: 8 initial rollouts
    "algorithm.branch_selection": "per_group",   # the official code: top n - n_init Branching Scores of the group
    "rollout.max_response_len": 6144,            # the official scripts: max response length 6144
    "loss.fkl_weight": 1.0,                      # the official scripts: future-KL weight b = 1.0
    "loss.decay_rate": 64.0,                     # the official scripts: future-KL decay rate 64 (2^(-1/64))
    "loss.kl_coef": 0.001,                       # the official scripts: low_var_kl coefficient 0.001
    "epochs": 2,                                 # the official scripts: total_epochs 2
}

# The paper's text on deep search (Table 2): 5 epochs on the 1K set, responses up to 8192 tokens; the rest as above.
_PAPER_DEEP_SEARCH = {
    **_PAPER_REASONING,
    "rollout.max_response_len": 8192,            # the paper's text: 8192 (stated for the 8B, none other for 14B)
    "epochs": 5,                                 # the paper's text: 5 epochs on the 1K deep-search set
}

# The official scripts' deep-search runs: their batch, lengths, n and epochs; loss and optimizer as for reasoning.
_OFFICIAL_DEEP_SEARCH_8B = {
    **_OFFICIAL_REASONING,
    "train.prompts_per_step": 128,               # the official scripts (Qwen3-8B): train batch 128
    "train.mini_batch_prompts": 16,              # the official scripts (Qwen3-8B): PPO mini-batch 16
    "rollout.max_response_len": 10000,           # the official scripts (Qwen3-8B): max response length 10000
    "algorithm.n": 16,                           # the official scripts (Qwen3-8B): n = 16
    "algorithm.n_init": 8,                       # the official scripts (Qwen3-8B): 8 initial rollouts
    "epochs": 5,                                 # the official scripts (Qwen3-8B): total_epochs 5
}
_OFFICIAL_DEEP_SEARCH_14B = {
    **_OFFICIAL_REASONING,
    "train.prompts_per_step": 64,                # the official scripts (Qwen3-14B): train batch 64
    "train.mini_batch_prompts": 8,               # the official scripts (Qwen3-14B): PPO mini-batch 8
    "rollout.max_response_len": 6192,            # the official scripts (Qwen3-14B): max response length 6192
    "algorithm.n": 12,                           # the official scripts (Qwen3-14B): n = 12
    "algorithm.n_init": 6,                       # the official scripts (Qwen3-14B): 6 initial rollouts
    "epochs": 5,                                 # the official scripts (Qwen3-14B): total_epochs 5
}

SETS: dict[str, dict[str, dict]] = {
    "paper": {"reasoning": _PAPER_REASONING, "deep_search_8b": _PAPER_DEEP_SEARCH,
              "deep_search_14b": _PAPER_DEEP_SEARCH},
    "official": {"reasoning": _OFFICIAL_REASONING, "deep_search_8b": _OFFICIAL_DEEP_SEARCH_8B,
                 "deep_search_14b": _OFFICIAL_DEEP_SEARCH_14B},
}


@dataclass(frozen=True)
class Setup:
    """What a setup fixes in both sets. prompt_len: the official scripts' (the paper's text gives none);
    tool_calls: the official scripts' tool-call limit; micro_rows: the largest micro-batch (rows) this project
    runs, a memory knob (cut to divide the mini-batch); every / eval_every: checkpoint + rollout dump / eval
    cadence (this project's choice)."""

    data: str
    prompt_len: int
    tool_calls: int
    micro_rows: int
    every: int
    eval_every: int
    eval_benchmarks: str


SETUPS = {
    "reasoning": Setup("train_10k", 2048, 3, 64, 20, 50, "aime24,math500,gsm8k,hotpotqa"),
    "deep_search_8b": Setup("hard_search_1k", 2000, 6, 16, 10, 20, "gaia,webwalker,hle,xbench"),
    "deep_search_14b": Setup("hard_search_1k", 2000, 6, 16, 10, 20, "gaia,webwalker,hle,xbench"),
}


def steps_for(dataset: str, epochs: int, prompts_per_step: int) -> int:
    """``train.steps`` of ``epochs`` passes over ``dataset`` at ``prompts_per_step`` prompts per step."""
    return epochs * (DATASET_RECORDS[dataset] // prompts_per_step)


def select_row(arg: str, rows: tuple[str, ...], table: str) -> tuple[str, str]:
    """``(row, set)`` of ``ROW`` (the paper's set) or ``ROW,official`` / ``ROW,paper``; :class:`ConfigError`
    naming the known rows otherwise."""
    row, hp_set = arg, "paper"
    head, _, last = arg.rpartition(",")
    if head and last in SET_NAMES:
        row, hp_set = head, last
    if row not in rows:
        raise ConfigError(f"{table} row {arg!r} is not a row of this table; known rows: {', '.join(rows)} "
                          f"(the paper's hyperparameters; append ',official' for the official scripts')")
    return row, hp_set


def _set(cfg: ExperimentConfig, key: str, value) -> None:
    section, name = key.split(".")
    obj = getattr(cfg, section)
    if not hasattr(obj, name):
        raise ConfigError(f"paper hyperparameter {key!r} is not a config key")
    setattr(obj, name, value)


def _base(setup: Setup, model_repo: str) -> ExperimentConfig:
    """The values both sets share (sources in the comments)."""
    c = ExperimentConfig()
    # The policy from $APPO_MODELS/<HF repo name> (default ~/models); bf16 compute, fp32 master weights, full remat
    # (this project's choice: the official runs are FSDP with bf16 compute).
    c.model.name = os.path.join(os.path.expanduser(os.environ.get("APPO_MODELS", "~/models")), model_repo)
    c.model.dtype, c.model.param_dtype, c.model.remat_policy = "bfloat16", "float32", "full"
    c.data.train, c.data.reward, c.data.shuffle = setup.data, "auto", True
    r = c.rollout
    r.max_prompt_len, r.tool_call_limit = setup.prompt_len, setup.tool_calls  # the official scripts
    r.temperature, r.top_p, r.top_k = 1.0, 1.0, 0                             # the official scripts: plain sampling
    r.num_slots, r.decode_chunk, r.tool_workers, r.tool_timeout_s = 256, 64, 32, 30.0  # this project's engine
    a = c.algorithm
    a.levels = 1                                   # both: one branching level (Table 3 rows set their own)
    a.arpo_alpha, a.arpo_beta = 0.5, 0.2           # the paper's text: threshold 0.5, entropy coefficient 0.2 (ARPO)
    a.omega_baseline, a.omega_gamma, a.omega_clip = "sampler", 1.0, 0.2  # the official code: engine log-probs
    a.reward_scale_discount = 0.9                  # the official scripts: reward-scale discount 0.9
    loss = c.loss
    loss.kl_kind, loss.agg, loss.clip_low = "low_var_kl", "token-mean", 0.2  # the official scripts
    # the paper's text: future-value clip [1.0, 1.2]; the official scripts: fkl_clip 0.2, high-only (the same)
    loss.fkl_clip, loss.fkl_high_only = 0.2, True
    # the official scripts: AdamW lr 1e-6 constant (the paper's text gives no RL learning rate), wd 0.01, clip 1.0
    o = c.optimizer
    o.lr, o.schedule, o.weight_decay, o.grad_clip = 1e-6, "constant", 0.01, 1.0
    c.train.ppo_epochs, c.train.logprob_chunk = 1, 1024  # verl's default: 1 PPO epoch per batch
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every, c.checkpoint.keep = setup.every, 3
    lg = c.logging
    lg.dump_rollouts_every, lg.eval_every, lg.eval_runs = setup.every, setup.eval_every, 5  # pass@1 over 5 runs
    lg.eval_benchmarks = setup.eval_benchmarks
    return c


def _fit_micro_batch(cfg: ExperimentConfig, cap: int) -> None:
    """``train.micro_batch_rows``: the largest divisor of the mini-batch's rows that is at most ``cap``."""
    rows = rows_per_mini_batch(cfg)
    cfg.train.micro_batch_rows = max(d for d in range(1, min(cap, rows) + 1) if rows % d == 0)


def paper_config(setup: str, hp_set: str, *, model: str, algorithm: str, name: str, workdir: str,
                 budget: tuple[int, int, int] | None = None) -> ExperimentConfig:
    """The config of one paper-table row: ``setup`` (a key of :data:`SETUPS`), ``hp_set`` (``paper`` or
    ``official``), the HF repo name ``model``, ``algorithm`` (a name of the algorithm registry); ``budget`` =
    (N, B, L) sets ``n_init = N``, ``levels = L`` and ``n = N (1 + B + ... + B^L)`` (Table 3). Branching-specific
    values (``n_init``, ``branch_selection``) of the set apply to APPO and its ablations; ARPO and the
    independent-sampling methods start ``n // 2`` rollouts (ARPO's recipe, the official scripts' n_init for
    every method). The official set's runs are named ``<name>-official``."""
    if hp_set not in SET_NAMES or setup not in SETUPS:
        raise ConfigError(f"paper_config({setup!r}, {hp_set!r}): expected a setup in {', '.join(SETUPS)} and a "
                          f"set in {', '.join(SET_NAMES)}")
    values = dict(SETS[hp_set][setup])
    epochs = values.pop("epochs")
    c = _base(SETUPS[setup], model)
    for key, value in values.items():
        _set(c, key, value)
    a = c.algorithm
    a.name = algorithm
    if not algorithm.startswith("appo"):
        a.n_init, a.branch_selection = a.n // 2, "per_group"
    if budget is not None:
        n_init, branches, levels = budget
        a.n, a.n_init, a.levels = budget_n(n_init, branches, levels), n_init, levels
        if levels > 1:  # the official code has one level; more levels need per-rollout selection (§1.10)
            a.branch_selection = "per_rollout"
    c.train.steps = steps_for(c.data.train, epochs, c.train.prompts_per_step)
    _fit_micro_batch(c, SETUPS[setup].micro_rows)
    suffix = "" if hp_set == "paper" else "-official"
    c.name, c.workdir = name + suffix, workdir + suffix
    return c


def differences(setup: str) -> dict[str, tuple]:
    """``{"section.field": (paper value, official value)}`` of every value the two sets give differently for
    ``setup`` (``epochs`` included)."""
    paper, official = SETS["paper"][setup], SETS["official"][setup]
    keys = sorted(set(paper) | set(official))
    return {k: (paper.get(k), official.get(k)) for k in keys if paper.get(k) != official.get(k)}


__all__ = ["DATASET_RECORDS", "SETS", "SETUPS", "SET_NAMES", "Setup", "differences", "paper_config",
           "select_row", "steps_for"]
