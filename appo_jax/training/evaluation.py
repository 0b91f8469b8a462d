"""pass@1 per benchmark with the evaluation sampling defaults of docs/algorithm.md §1.8.

For each benchmark question the policy runs the multi-turn tool loop ``runs`` times (temperature 0.6, top_p
0.95, repetition penalty 1.1 over the whole sequence, as transformers applies it); a run is correct when the
answer judge (``appo_jax.rewards.judge``, default the rule-based judge: exact match after normalisation or
math-verify equivalence) accepts the last ``\\boxed{}`` of the response, and

    pass@1 = mean over questions of (correct runs / runs)
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

EVAL_TEMPERATURE = 0.6
EVAL_TOP_P = 0.95
EVAL_REPETITION_PENALTY = 1.1
EVAL_RUNS = 5


def pass_at_1(correct: np.ndarray) -> float:
    """``mean_q mean_r correct[q, r]`` of a ``[questions, runs]`` 0/1 array (0.0 when empty)."""
    correct = np.asarray(correct, np.float64)
    return float(correct.mean()) if correct.size else 0.0


def markdown_table(results: dict[str, float], counts: dict[str, int] | None = None, runs: int | None = None) -> str:
    """A markdown table ``| benchmark | questions | pass@1 (%) |`` plus the average row."""
    lines = ["| benchmark | questions | pass@1 (%) |", "|---|---:|---:|"]
    for name, value in results.items():
        n = "" if counts is None else str(counts.get(name, ""))
        lines.append(f"| {name} | {n} | {100.0 * value:.1f} |")
    if len(results) > 1:
        lines.append(f"| **average** | | {100.0 * float(np.mean(list(results.values()))):.1f} |")
    if runs is not None:
        lines.append("")
        lines.append(f"pass@1 over {runs} run(s) per question, temperature {EVAL_TEMPERATURE}, top_p {EVAL_TOP_P}, "
                     f"repetition penalty {EVAL_REPETITION_PENALTY}.")
    return "\n".join(lines)


def eval_rollout_config(rollout, prompts, rollouts: int, num_slots: int = 0):
    """The engine's :class:`~appo_jax.rollout.engine.RolloutConfig` for an evaluation: the evaluation sampling
    settings, the lengths / tool limit / tool pool of ``rollout`` (a
    :class:`~appo_jax.training.config.RolloutSection`), fitted to ``prompts`` and ``rollouts`` concurrent
    rollouts (at most ``num_slots`` or ``rollout.num_slots`` slots when set)."""
    from appo_jax.rollout.engine import RolloutConfig
    cfg = RolloutConfig(max_prompt_len=rollout.max_prompt_len, max_response_len=rollout.max_response_len,
                        tool_call_limit=rollout.tool_call_limit, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P,
                        repetition_penalty=EVAL_REPETITION_PENALTY,
                        num_slots=num_slots or rollout.num_slots or rollouts, decode_chunk=rollout.decode_chunk,
                        tool_workers=rollout.tool_workers, tool_timeout_s=rollout.tool_timeout_s)
    return cfg.fitted(prompts, rollouts)


def _correct(item, text: str) -> float:
    from appo_jax.rewards.answers import last_boxed
    from appo_jax.rewards.judge import make_judge
    return float(make_judge("rule").judge("", last_boxed(text), item.ground_truths).correct)


def evaluate_pass1(model_config, params, tokenizer, tools, benchmarks: Sequence[str], *, limit: int | None = None,
                   runs: int = EVAL_RUNS, rollout=None, mesh=None, data_dir: str = "", engine=None, seed: int = 0,
                   system_prompt: str = "", num_slots: int = 0, log=print, progress: bool = True) -> dict:
    """``{benchmark: pass@1, "_counts": {benchmark: questions}, "_engine": engine}`` (module doc). Questions
    whose prompt exceeds ``rollout.max_prompt_len`` are skipped (and not counted).

    Every benchmark is loaded and tokenised first; the engine (a given ``engine`` is reused when its prompt
    length and slots fit) is sized to the longest prompt and to ``questions x runs`` concurrent rollouts (at most
    ``num_slots``), ``log`` receives the plan (questions, runs, token budgets, KV cache) before sampling starts,
    and each benchmark shows a progress bar (finished rollouts, tokens/s, ETA) unless ``progress`` is False."""
    from appo_jax.progress import RolloutProgress
    from appo_jax.rollout.engine import RolloutEngine
    from appo_jax.training.config import RolloutSection
    from appo_jax.training.prompts import encode_prompts, load_records
    rollout = rollout or RolloutSection()
    items_of = {}
    for name in benchmarks:
        records = load_records(name, data_dir=data_dir, limit=limit or 0)
        items, _ = encode_prompts(records, tokenizer, max_prompt_len=rollout.max_prompt_len, reward="judge",
                                  system_prompt=system_prompt)
        if not items:
            raise ValueError(f"benchmark {name!r}: no question fits rollout.max_prompt_len={rollout.max_prompt_len}")
        items_of[name] = items
    all_items = [it for items in items_of.values() for it in items]
    cfg = eval_rollout_config(rollout, all_items, max(len(v) for v in items_of.values()) * runs, num_slots)
    if engine is not None and (engine.cfg.max_prompt_len < cfg.max_prompt_len or engine.cfg.num_slots < cfg.num_slots):
        engine.close()
        engine = None
    if engine is None:
        engine = RolloutEngine(model_config, params, tokenizer, tools, cfg, mesh=mesh, reward_fn=_correct)
    else:
        engine.set_params(params)
    total = sum(len(v) for v in items_of.values()) * runs
    log(f"eval: {', '.join(f'{n} ({len(v)} questions)' for n, v in items_of.items())} x {runs} run(s) = {total} "
        f"rollouts; temperature {EVAL_TEMPERATURE}, top_p {EVAL_TOP_P}, repetition penalty "
        f"{EVAL_REPETITION_PENALTY}; {engine.describe()}")
    out: dict = {}
    counts = {}
    for b, (name, items) in enumerate(items_of.items()):
        with RolloutProgress(f"eval {name}", enabled=progress) as bar:
            traj = engine.initial(items, runs, jax.random.fold_in(jax.random.PRNGKey(seed), b), progress=bar)
        correct = np.asarray(traj.reward, np.float64).reshape(len(items), runs)
        out[name] = pass_at_1(correct)
        counts[name] = len(items)
    out["_counts"] = counts
    out["_engine"] = engine
    return out
