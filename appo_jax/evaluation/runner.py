"""An evaluation whose every answer is saved: rollouts through the tool loop, each answer judged as it finishes and
appended to the :class:`~appo_jax.evaluation.answer_store.AnswerStore`, then the summary of the paper's metrics.

For benchmark b, question q (its index in the benchmark's records) and run r the rollout's sampling key is
``fold_in(fold_in(fold_in(PRNGKey(seed), crc32(b)), q), r)``: an answer does not depend on which other benchmarks,
questions or runs share the call, so a resumed evaluation samples the missing rows with the keys an
uninterrupted one would have used. Judging runs on ``judge_workers`` threads while the sampler goes on (an LLM
judge's network round trips never stall decoding); a judge that fails (`JudgeError`) marks the row
``judge.failed`` with the reason and the raw reply, and the evaluation goes on.
"""
from __future__ import annotations

import dataclasses
import json
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from appo_jax.core.trajectory import FINISH_NAMES
from appo_jax.data import get_task
from appo_jax.data.breakdowns import record_breakdowns
from appo_jax.data.loading import benchmark_prompts
from appo_jax.evaluation.answer_store import AnswerStore
from appo_jax.evaluation.metrics import summarize, summary_table
from appo_jax.rollout.presets import get_preset
from appo_jax.progress import RolloutProgress
from appo_jax.rewards.answers import last_boxed
from appo_jax.rewards.judge import Judge, JudgeError
from appo_jax.rewards.qa_metrics import exact_match, f1_score
from appo_jax.rollout.agent_loop import Rollout
from appo_jax.rollout.config import RolloutConfig
from appo_jax.rollout.engine import RolloutEngine

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


@dataclasses.dataclass
class EvalSpec:
    """What to evaluate and how: ``benchmarks``, ``runs`` per question, the first ``limit`` questions (None: all),
    the sampling ``preset``, the rollout budgets (``rollout``: prompt / response lengths, tool-call limit, slots),
    ``seed``, ``system_prompt`` ("" keeps the benchmark's), ``data_dir`` ("" = the shipped data) and the
    ``dtype`` the policy computes in (recorded)."""

    benchmarks: Sequence[str]
    runs: int = 1
    limit: int | None = None
    preset: str = "paper"
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    seed: int = 0
    system_prompt: str = ""
    data_dir: str = ""
    dtype: str = "float32"

    def engine_config(self) -> RolloutConfig:
        return get_preset(self.preset).apply(self.rollout)

    def settings(self, model_id: str, judge: Judge) -> dict:
        """The settings that decide an answer (`AnswerStore` refuses a directory made with others)."""
        cfg = self.engine_config()
        return {"model_id": model_id, "preset": self.preset, "sampling": sampling_of(cfg),
                "max_prompt_len": cfg.max_prompt_len, "max_response_len": cfg.max_response_len,
                "tool_call_limit": cfg.tool_call_limit, "system_prompt": self.system_prompt, "seed": self.seed,
                "dtype": self.dtype, "judge": judge.name}


def sampling_of(cfg: RolloutConfig) -> dict:
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
            "repetition_penalty": cfg.repetition_penalty}


def benchmark_key(seed: int, benchmark: str):
    """``fold_in(PRNGKey(seed), crc32(benchmark))``: the sampling key of a benchmark's questions (module doc)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(benchmark.encode()) & 0x7FFFFFFF)


def answer_row(rollout: Rollout, judge: Judge, model_id: str, sampling: dict) -> dict:
    """The saved row of one finished rollout (`appo_jax.evaluation.answer_store`), judged by ``judge``."""
    meta = rollout.request.meta
    record = meta["item"]
    answer = last_boxed(rollout.text)
    row = {"model_id": model_id, "benchmark": meta["benchmark"], "question_id": record.id,
           "question": record.question, "run": int(meta["local"]), "sampling": sampling,
           "response": rollout.text,
           "tool_calls": [{"name": c.name, "input": c.input, "output": c.output} for c in rollout.tool_calls],
           "finish_reason": FINISH_NAMES[rollout.finish_reason],
           "response_tokens": int(np.count_nonzero(rollout.gen_mask)),
           "observation_tokens": int(np.count_nonzero(rollout.obs_mask)),
           "answer": answer, "gold": list(record.ground_truths)}
    try:
        verdict = judge.judge(record.question, answer, record.ground_truths)
        row["judge"] = {"name": judge.name, "correct": bool(verdict.correct), "rationale": verdict.rationale,
                        "verdict": verdict.raw or verdict.rationale, "failed": False}
        correct = bool(verdict.correct)
    except JudgeError as err:
        row["judge"] = {"name": judge.name, "correct": None, "rationale": str(err), "verdict": err.raw,
                        "failed": True}
        correct = False
    row["metrics"] = {"correct": correct, "f1": f1_score(answer, record.ground_truths),
                      "em": exact_match(answer, record.ground_truths)}
    row["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return row


class _JudgeAndSave:
    """Loop hooks: every finished rollout is judged and saved on a worker thread (module doc)."""

    def __init__(self, store: AnswerStore, judge: Judge, model_id: str, sampling: dict, workers: int):
        self.store, self.judge, self.model_id, self.sampling = store, judge, model_id, sampling
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="judge")
        self.futures: list[Future] = []

    def on_probe(self, request, prefix, mean_entropy, first):
        return []

    def on_finish(self, rollout: Rollout):
        self.futures.append(self.pool.submit(self._save, rollout))
        return []

    def _save(self, rollout: Rollout) -> None:
        self.store.append(answer_row(rollout, self.judge, self.model_id, self.sampling))

    def wait(self) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


def _load(spec: EvalSpec, tokenizer, log) -> dict:
    """``{benchmark: [(question index, record)]}``, prompts encoded; questions longer than the prompt budget are
    skipped with a message."""
    out = {}
    for name in spec.benchmarks:
        records, prompts, too_long = benchmark_prompts(
            name, tokenizer, max_prompt_len=spec.rollout.max_prompt_len, limit=spec.limit, seed=spec.seed,
            data_dir=spec.data_dir, system_prompt=spec.system_prompt, task_options={}, budget_name="--max-prompt-len")
        index = {r.id: i for i, r in enumerate(records)}
        if too_long:
            log(f"eval: {name}: skipped {len(too_long)} question(s) longer than {spec.rollout.max_prompt_len} "
                "prompt tokens")
        out[name] = [(index[p.id], p) for p in prompts]
    return out


def evaluate_to_dir(policy, spec: EvalSpec, out_dir: str | Path, judge: Judge, tools, *,
                    log: Callable[[str], None] = print, progress: bool = True, judge_workers: int = 8) -> dict:
    """Evaluate ``policy`` (`appo_jax.training.policy_source.Policy`) as ``spec`` says, saving every answer in
    ``out_dir`` (resuming what is there), and return the summary (also written to ``summary.json`` /
    ``summary.md``): ``{"benchmarks": {name: scores}, "settings": ..., "sampled": rows sampled by this call}``."""
    if spec.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {spec.runs}")
    store = AnswerStore(out_dir, spec.settings(policy.model_id, judge))
    questions = _load(spec, policy.tokenizer, log)
    todo = [(b, q, rec, r) for b, items in questions.items() for q, rec in items for r in range(spec.runs)
            if not store.done(b, rec.id, r)]
    total = sum(len(v) for v in questions.values()) * spec.runs
    cfg = spec.engine_config()
    log(f"eval: {policy.model_id}; preset {spec.preset} ({get_preset(spec.preset).source}); "
        f"{', '.join(f'{b} ({len(v)} questions)' for b, v in questions.items())} x {spec.runs} run(s) = {total} "
        f"answers, {total - len(todo)} already in {out_dir}, {len(todo)} to sample; judge {judge.name}")
    if todo:
        _sample(policy, cfg, todo, store, judge, tools, spec.seed, log, progress, judge_workers)
    wanted = {(b, rec.id, r) for b, items in questions.items() for _, rec in items for r in range(spec.runs)}
    rows = [row for row in store.rows() if (row["benchmark"], row["question_id"], row["run"]) in wanted]
    breakdowns = {b: record_breakdowns(b, spec.data_dir or None) for b in questions if get_task(b) is None}
    summary = {"benchmarks": summarize(rows, breakdowns), "settings": store.settings, "sampled": len(todo),
               "answers_file": str(store.path)}
    Path(out_dir, SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    Path(out_dir, SUMMARY_MD).write_text(summary_markdown(summary) + "\n", encoding="utf-8")
    return summary


def _sample(policy, cfg: RolloutConfig, todo, store, judge, tools, seed, log, progress, workers) -> None:
    cfg = cfg.fitted([rec for _, _, rec, _ in todo], len(todo))
    engine = RolloutEngine(policy.config, policy.params, policy.tokenizer, tools, cfg, reward_fn=lambda rec, text: 0.0)
    keys = {b: benchmark_key(seed, b) for b in {t[0] for t in todo}}
    requests = []
    for b, q, rec, r in todo:
        req = engine.request(keys[b], rec, q, r)
        req.meta["benchmark"] = b
        requests.append(req)
    log(f"eval: {engine.describe()}")
    hooks = _JudgeAndSave(store, judge, policy.model_id, sampling_of(cfg), workers)
    try:
        with RolloutProgress("eval", enabled=progress) as bar:
            engine.run(requests, hooks, bar)
    finally:
        hooks.wait()
        engine.close()


def summary_markdown(summary: dict) -> str:
    """The summary table with a line saying which model, preset, sampling and judge produced it."""
    s = summary["settings"]
    samp = s["sampling"]
    head = (f"model `{s['model_id']}`; preset **{s['preset']}** (temperature {samp['temperature']}, top_p "
            f"{samp['top_p']}, top_k {samp['top_k'] or 'off'}, repetition penalty {samp['repetition_penalty']}); "
            f"responses <= {s['max_response_len']} tokens, <= {s['tool_call_limit']} tool calls; judge "
            f"**{s['judge']}**; answers in `{summary['answers_file']}`")
    note = ""
    if s["preset"] == "official":
        note = ("\n\nThe official scripts allow 4096 new tokens per model call and 5 python + 10 search calls; here "
                "the response budget covers the whole response and the 15 calls are one total.")
    return head + "\n\n" + summary_table(summary["benchmarks"]) + note
