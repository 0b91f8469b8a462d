"""pass@1 per benchmark under a sampling mode (the paper's evaluation defaults of docs/algorithm.md §1.8, greedy, or
the training sampling).

For each benchmark question the policy runs the multi-turn tool loop ``runs`` times with the sampling of the mode
(:data:`EVAL_MODES`); a run is correct when the answer judge (``appo_jax.rewards.judge``, default the rule-based
judge: exact match after normalisation or math-verify equivalence) accepts the last ``\\boxed{}`` of the response,
and

    pass@1 = mean over questions of (correct runs / runs)

Modes: ``paper`` (temperature 0.6, top_p 0.95, repetition penalty 1.1 over the whole sequence, as transformers
applies it), ``greedy`` (temperature 0, no penalty) and ``train`` (the rollout config's own temperature / top-p /
top-k / penalty: pass@1 of the policy as RL samples it).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from appo_jax.data.loading import benchmark_prompts
from appo_jax.rollout.presets import PRESETS
from appo_jax.progress import RolloutProgress
from appo_jax.rewards.answers import last_boxed
from appo_jax.rewards.judge import make_judge
from appo_jax.rollout.config import RolloutConfig
from appo_jax.rollout.engine import RolloutEngine
from appo_jax.rollout.strategies import initial_rollouts

PAPER = PRESETS["paper"]
EVAL_TEMPERATURE = PAPER.temperature
EVAL_TOP_P = PAPER.top_p
EVAL_REPETITION_PENALTY = PAPER.repetition_penalty
EVAL_RUNS = 5


def pass_at_1(correct: np.ndarray) -> float:
    """``mean_q mean_r correct[q, r]`` of a ``[questions, runs]`` 0/1 array (0.0 when empty)."""
    correct = np.asarray(correct, np.float64)
    return float(correct.mean()) if correct.size else 0.0


#: mode -> the rollout config with that mode's sampling (module doc)
EVAL_MODES = {
    "paper": PAPER.apply,
    "greedy": PRESETS["greedy"].apply,
    "train": lambda r: r,
}


def sampling_text(cfg: RolloutConfig) -> str:
    """``"greedy"`` or ``"temperature T, top_p P[, top_k K][, repetition penalty R]"``."""
    if cfg.temperature == 0:
        return "greedy"
    text = f"temperature {cfg.temperature:g}, top_p {cfg.top_p:g}"
    if cfg.top_k:
        text += f", top_k {cfg.top_k}"
    if cfg.repetition_penalty != 1.0:
        text += f", repetition penalty {cfg.repetition_penalty:g}"
    return text


def eval_rollout_config(rollout: RolloutConfig, prompts, rollouts: int, mode: str = "paper") -> RolloutConfig:
    """The engine's config for an evaluation: ``rollout`` (lengths, tool limit, tool pool) with the sampling of
    ``mode`` (:data:`EVAL_MODES`), fitted to ``prompts`` and ``rollouts`` concurrent rollouts (at most
    ``rollout.num_slots`` when that is non-zero)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluation mode {mode!r}; expected one of {', '.join(EVAL_MODES)}")
    return EVAL_MODES[mode](rollout).fitted(prompts, rollouts)


def _correct(record, text: str) -> float:
    """1.0 when the rule judge accepts the last ``\\boxed{}`` of ``text`` for the record's ground truths."""
    return float(make_judge("rule").judge("", last_boxed(text), record.ground_truths).correct)


def evaluate_pass1(model_config, params, tokenizer, tools, benchmarks: Sequence[str], *, limit: int | None = None,
                   runs: int = EVAL_RUNS, rollout: RolloutConfig | None = None, mesh=None, data_dir: str = "",
                   engine=None, seed: int = 0, system_prompt: str = "", log=print, progress: bool = True,
                   mode: str = "paper", task_options: dict | None = None) -> dict:
    """``{benchmark: pass@1, "_counts": {benchmark: questions}, "_engine": engine}`` (module doc). Questions
    whose prompt exceeds ``rollout.max_prompt_len`` are skipped (and not counted).

    Every benchmark is loaded and tokenised first; the engine (a given ``engine`` is reused when its prompt
    length and slots fit) is sized to the longest prompt and to ``questions x runs`` concurrent rollouts (at most
    ``rollout.num_slots`` when set), ``log`` receives the plan (questions, runs, token budgets, KV cache) before
    sampling starts, and each benchmark shows a progress bar (finished rollouts, tokens/s, ETA) unless
    ``progress`` is False. ``mode``: the sampling (:data:`EVAL_MODES`; with ``greedy`` one run is enough);
    ``task_options``: the difficulty knobs of generated tasks (``kb_multihop:heldout``)."""
    rollout = rollout or RolloutConfig()
    prompts_of = {}
    for name in benchmarks:
        prompts_of[name] = benchmark_prompts(name, tokenizer, max_prompt_len=rollout.max_prompt_len, limit=limit,
                                             seed=seed, data_dir=data_dir, system_prompt=system_prompt,
                                             task_options=task_options, budget_name="rollout.max_prompt_len")[1]
    every = [p for prompts in prompts_of.values() for p in prompts]
    cfg = eval_rollout_config(rollout, every, max(len(v) for v in prompts_of.values()) * runs, mode)
    if engine is not None and (engine.cfg.max_prompt_len < cfg.max_prompt_len or engine.cfg.num_slots < cfg.num_slots
                               or sampling_text(engine.cfg) != sampling_text(cfg)):
        engine.close()
        engine = None
    if engine is None:
        engine = RolloutEngine(model_config, params, tokenizer, tools, cfg, mesh=mesh, reward_fn=_correct)
    else:
        engine.set_params(params)
    total = len(every) * runs
    log(f"eval ({mode}): {', '.join(f'{n} ({len(v)} questions)' for n, v in prompts_of.items())} x {runs} run(s) = "
        f"{total} rollouts; {sampling_text(cfg)}; {engine.describe()}")
    out: dict = {}
    counts = {}
    for b, (name, prompts) in enumerate(prompts_of.items()):
        with RolloutProgress(f"eval {name}", enabled=progress) as bar:
            batch = initial_rollouts(engine, prompts, runs, jax.random.fold_in(jax.random.PRNGKey(seed), b), bar)
        correct = np.asarray(batch.traj.reward, np.float64).reshape(len(prompts), runs)
        out[name] = pass_at_1(correct)
        counts[name] = len(prompts)
    out["_counts"] = counts
    out["_engine"] = engine
    return out
