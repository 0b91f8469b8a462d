"""The training driver: builds everything an experiment config names and runs the RL loop.

    Trainer(cfg, workdir=..., resume=...).run() -> summary dict

Per iteration ``it`` (1-based): the algorithm's rollout strategy samples ``train.prompts_per_step`` prompts from
the resumable prompt iterator (for APPO: initial rollouts, log-probs, branch points, branches) -> the current
policy's log-probs of the rows that train (unless the strategy computed them) and the reference's (KL) ->
advantages (the algorithm's estimator) -> one jitted update (PPO epochs x mini-batches x micro-batches) -> new
weights to the engine -> metrics (JSONL + TensorBoard + progress bar), rollout dump, evaluation and checkpoint on
their schedules. The PRNG key of iteration ``it`` is ``fold_in(state.rng, it)``, so with fixed seeds a resumed run
repeats the uninterrupted run's iterations exactly.

Several processes (a TPU pod; CPU processes with gloo): each samples its block of the prompts on its own devices
(`HostShardedEngine`), every process then holds the whole batch and the log-probs, branch selection, advantages
and the update run as global jitted ops on the global mesh; process 0 writes metrics, config and rollout dumps,
every process writes its shards of the checkpoints (docs/multihost.md).

Safety: a workdir that already holds checkpoints is only continued with ``resume=True`` (never overwritten);
a non-finite loss or gradient skips the update inside the step and stops the run with an error before
anything is saved for that iteration; checkpoint failures (e.g. a full disk) stop the run with
:class:`~appo_jax.training.checkpoint.CheckpointError` while earlier checkpoints stay intact.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.compilation_cache import active_cache_dir, compile_counts
from appo_jax.core.advantages import advantages_from_trajectory
from appo_jax.parallel.multihost import reduce_timings
from appo_jax.rollout.strategies import Sampled
from appo_jax.training.batch import TrainBatch
from appo_jax.training.build import TrainingError, build_run
from appo_jax.training.config import ExperimentConfig, eval_modes, to_dict, to_json
from appo_jax.training.evaluation import evaluate_pass1
from appo_jax.training.learning_signals import heldout_changes, kl_to_reference, plot_learning_curve, run_warnings
from appo_jax.training.metrics import MetricsWriter, read_metrics, summarize
from appo_jax.training.policies import copy_tree
from appo_jax.training.rollout_dump import write_rollout_dump
from appo_jax.training.rollout_metrics import (advantage_metrics, batch_metrics, branching_metrics,
                                               mismatch_metrics)
from appo_jax.training.sft import cold_start_sft
from appo_jax.training.train_step import init_train_state

__all__ = ["Collected", "Trainer", "TrainingError"]


@dataclass
class Collected:
    """One iteration's rollouts and what the update used: ``sampled`` (the strategy's output), ``train_traj``
    (its ``train_rows`` leading rows, host arrays) and their ``advantages`` / ``old_logp`` / ``ref_logp``."""

    sampled: Sampled
    train_traj: Any
    advantages: Any
    old_logp: Any
    ref_logp: Any

    @property
    def batch(self):
        return self.sampled.batch

    @property
    def train_rows(self) -> int:
        return self.sampled.train_rows

    @property
    def branching(self):
        return self.sampled.branching


@functools.partial(jax.jit, static_argnames=("name", "num_groups", "num_trees", "options"))
def _advantages(traj, tree_ids, *, name: str, num_groups: int, num_trees: int, options):
    """``advantages_from_trajectory(name, traj, num_groups, options, tree_ids=..., num_trees=...)``, jitted
    (``options``: the estimator's frozen options dataclass, a static argument)."""
    return advantages_from_trajectory(name, traj, num_groups, options, tree_ids=tree_ids, num_trees=num_trees)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Trainer:
    """Runs an experiment (module doc): `build_run` makes its parts once (``self.parts``; their names read
    through, e.g. ``trainer.engine``, ``trainer.policies``), the loop owns the train state (``self.state``);
    ``log`` receives progress lines."""

    def __init__(self, cfg: ExperimentConfig, *, workdir: str | None = None, resume: bool = False,
                 log: Callable[[str], None] = print):
        self._started, self._compiles_at_start = time.perf_counter(), compile_counts()
        self.cfg, self.log = cfg, log
        self.parts, self.state = build_run(cfg, workdir=workdir, resume=resume, log=log)
        self.iteration, self.sft_done, self.startup = 0, False, {}
        self._last_collected: Collected | None = None
        self._eval_engines: dict = {}
        self._eval_counts: dict = {}
        if resume:
            if self.checkpointer.latest_step() is not None:
                self._restore()
            else:
                log(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from the beginning")

    def __getattr__(self, name: str):  # the built parts (only reached for names the trainer itself lacks)
        if name == "parts":
            raise AttributeError(name)
        return getattr(self.parts, name)

    def _sampler_params(self):
        """The parameters the sampler uses (this host's copy in a multi-process run)."""
        return self.state.params if self.processes == 1 else self.engine.params

    def _restore(self) -> None:
        meta = self.checkpointer.read_meta()
        target = self.policies.restore_target(int(meta.get("lagged", 0)), bool(meta.get("sft_done")),
                                              self.state.params)
        self.state, meta, extra = self.checkpointer.restore(self.state, extra_target=target)
        self.engine.set_params(self.state.params)
        self.iteration = int(meta["iteration"])
        written_by = int(meta.get("processes", 1))
        if written_by != self.processes:
            self.log(f"checkpoint {self.iteration} was written by {written_by} process(es), resuming on "
                     f"{self.processes}: the parameters are resharded onto this mesh and every process draws the "
                     "same global prompt sequence, so the run continues where it stopped")
        self.prompts.restore(meta["data"])
        self.sft_done = bool(meta.get("sft_done"))
        self.policies.restore(extra)
        self.log(f"resumed from {self.ckpt_dir}/{self.iteration} (iteration {self.iteration}, "
                 f"optimizer step {int(self.state.step)})")

    # -- SFT -------------------------------------------------------------------------------------------------
    def run_sft(self) -> list[float]:
        """Cold-start SFT (``cfg.sft``, `cold_start_sft`) on the current params, or its cached result; RL then
        starts from the SFT policy with a fresh optimizer, and the reference becomes that policy."""
        params, losses = cold_start_sft(self.parts, self.state.params, self.log, probe=self._sft_probe)
        self.state, _ = init_train_state(params, self.tx, self.cfg.train.seed, mesh=self.mesh,
                                         model_config=self.model_config)
        if self.policies.reference is not None:
            self.policies.reference = copy_tree(self.state.params)
        self.engine.set_params(self.state.params)
        self.sft_done = True
        return losses

    def _sft_probe(self, step: int, losses: list[float], params) -> None:
        """Held-out accuracy of the SFT policy after ``step`` SFT steps, appended to ``sft_metrics.jsonl``."""
        if self.processes > 1:  # each host evaluates with its own copy, as after an RL step
            params = self.engine.place_params(self.placement.host(params))
        record = {"sft_step": step, "sft/loss": float(np.mean(losses[-max(1, self.cfg.sft.eval_every):])),
                  **self.evaluate(params)}
        self.log("sft probe: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
        if self.primary:
            with open(self.workdir / "sft_metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- one iteration ---------------------------------------------------------------------------------------
    def _save(self) -> None:
        meta = {"iteration": self.iteration, "data": self.prompts.state(), "sft_done": self.sft_done,
                "lagged": len(self.policies.lagged), "config": to_dict(self.cfg), "processes": self.processes}
        self.checkpointer.save(self.iteration, self.state, meta,
                               extra=self.policies.checkpoint_extras(with_reference=self.sft_done))

    def collect(self, key) -> Collected:
        """Rollouts of one iteration and what the update needs: old / reference log-probs and advantages of
        the rows that train."""
        cfg = self.cfg
        num_prompts = cfg.train.prompts_per_step
        sampled = self.strategy.sample(self.engine, self.state.params, self.prompts.next, num_prompts, key)
        self.policies.iteration_done(self.state.params)
        n = sampled.train_rows
        traj = jax.tree.map(lambda x: np.asarray(x)[:n], sampled.batch.traj)
        t0 = time.perf_counter()
        old = sampled.old_logp if sampled.old_logp is not None else self.policies.logprobs(self.state.params, traj)
        kl_to_start = cfg.logging.kl_to_start
        ref = self.policies.reference_logprobs(traj) if self.kl_coef or kl_to_start else None
        old, ref = self.placement.host((old, ref))
        if kl_to_start:
            sampled.metrics["kl/to_start"] = kl_to_reference(old, ref, traj.loss_mask & traj.row_valid[:, None])
        sampled.metrics["time/logprobs_s"] = sampled.metrics.get("time/logprobs_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        full = sampled.batch.traj
        if self.cfg.algorithm.control != "none":  # a negative control: the estimator sees no signal
            full = full.replace(reward=np.asarray(self.control(full.reward, full.group_id, full.kind,
                                                               jax.random.fold_in(key, 1))))
        adv = self.placement.host(_advantages(
            self.placement.tree(full), self.placement.rows(sampled.batch.tree_id), name=self.spec.advantage,
            num_groups=num_prompts, num_trees=full.num_rows, options=self.advantage_options))[:n]
        sampled.metrics["time/advantages_s"] = time.perf_counter() - t0
        return Collected(sampled, traj, adv, old, ref if self.kl_coef else None)

    def _iteration_metrics(self, col: Collected, batch: TrainBatch) -> dict:
        sampled = col.sampled
        metrics = dict(sampled.metrics)
        metrics.update(batch_metrics(sampled.batch.traj, sampled.batch.accuracy, sampled.train_rows,
                                     sampled.batch.format_ok))
        train_traj = col.train_traj
        if sampled.branching is not None:
            metrics.update(branching_metrics(sampled.branching, train_traj))
        metrics.update(advantage_metrics(col.advantages, batch.loss_mask))
        metrics.update(mismatch_metrics(col.old_logp, train_traj.behavior_logp,
                                        train_traj.gen_mask & train_traj.row_valid[:, None]))
        rollout_s = metrics.get("time/rollout_s", 0.0) + metrics.get("time/branch_rollout_s", 0.0)
        generated = float(np.asarray(sampled.batch.traj.gen_mask).sum())
        metrics["rollout/generated_tokens"] = generated  # every sampled row's, trained or not: the budget spent
        metrics["throughput/rollout_tokens_per_s"] = generated / max(rollout_s, 1e-9)
        return metrics

    def train_iteration(self) -> dict:
        """One RL iteration (module doc); returns its metrics, ``train/nonfinite`` = 1 when the update was skipped
        or the loss, a log-prob or a parameter is not finite (the loop then stops)."""
        cfg = self.cfg
        it = self.iteration + 1
        t_start = time.perf_counter()
        col = self.collect(jax.random.fold_in(jnp.asarray(self.state.rng), it))
        batch = TrainBatch.from_trajectory(col.train_traj, col.advantages, col.old_logp, col.ref_logp,
                                           train_branches=self.spec.train_branches,
                                           with_behavior=cfg.loss.tis_cap is not None)
        t0 = time.perf_counter()
        self.state, step_metrics = self.runner(self.state, batch)
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        t_update = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.engine.set_params(self.state.params)
        t_copy = time.perf_counter() - t0
        self.iteration = it

        metrics = self._iteration_metrics(col, batch)
        metrics.update({f"train/{k}": v for k, v in step_metrics.items()})
        metrics["time/update_s"] = t_update
        metrics["time/param_copy_s"] = t_copy  # new weights to the sampler (to every host's sampler)
        if self.processes > 1:
            metrics["time/host_gather_s"], self.engine.gather_s = self.engine.gather_s, 0.0
        trained_tokens = float(np.asarray(batch.loss_mask).sum()) * cfg.train.ppo_epochs
        metrics["throughput/train_tokens_per_s"] = trained_tokens / max(t_update, 1e-9)
        metrics["time/step_s"] = time.perf_counter() - t_start
        metrics["train/optimizer_step"] = float(int(self.state.step))
        nonfinite = (step_metrics.get("update_skipped", 0.0) > 0 or step_metrics.get("nonfinite_tokens", 0.0) > 0
                     or not math.isfinite(step_metrics.get("loss", 0.0)) or not bool(_all_finite(self.state.params)))
        metrics["train/nonfinite"] = float(nonfinite)
        self._last_collected = col
        return reduce_timings(metrics)

    def evaluate(self, params=None) -> dict:
        """Pass@1 on ``logging.eval_benchmarks`` under every mode of ``logging.eval_modes`` (of ``params``, default
        the sampler's): ``{"eval/BENCH/MODE": acc, "eval/BENCH": acc of the first mode}``."""
        cfg = self.cfg.logging
        names = [b.strip() for b in cfg.eval_benchmarks.split(",") if b.strip()]
        params = self._sampler_params() if params is None else params  # each host evaluates with its own copy
        out = {}
        for mode in eval_modes(cfg):
            results = evaluate_pass1(self.model_config, params, self.tokenizer, self.tools, names,
                                     limit=cfg.eval_limit or None, runs=cfg.eval_runs, rollout=self.cfg.rollout,
                                     mesh=self.local_mesh,
                                     data_dir=self.cfg.data.data_dir, engine=self._eval_engines.get(mode),
                                     system_prompt=self.cfg.data.system_prompt, log=self.log, progress=cfg.progress,
                                     mode=mode, task_options=self.cfg.data.task_options)
            self._eval_engines[mode] = results.pop("_engine")
            self._eval_counts.update(results.pop("_counts"))
            for bench, value in results.items():
                out[f"eval/{bench}/{mode}"] = value
                out.setdefault(f"eval/{bench}", value)
        return out

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run (or continue) the experiment to ``train.steps`` iterations; returns a summary dict."""
        cfg = self.cfg
        start = self.iteration
        if self.primary:
            (self.workdir / "config.json").write_text(to_json(cfg))
        writer = MetricsWriter(self.workdir, total_steps=cfg.train.steps, start_step=start,
                               tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                               primary=self.primary)
        self.log = writer.log_text
        self.log(self.plan())
        sft_losses = []
        try:
            if cfg.sft.steps and not self.sft_done and start == 0:
                sft_losses = self.run_sft()
            if start == 0 and cfg.logging.eval_every and cfg.logging.eval_benchmarks:
                writer.write(0, self.evaluate(), advance=False)  # the starting point of the learning curve
            while self.iteration < cfg.train.steps:
                metrics = self.train_iteration()
                it = self.iteration
                if it == start + 1:
                    self.log(self._startup_report())
                if cfg.logging.eval_every and it % cfg.logging.eval_every == 0 and cfg.logging.eval_benchmarks:
                    metrics.update(self.evaluate())
                if it % cfg.logging.every == 0 or metrics["train/nonfinite"]:
                    writer.write(it, metrics)
                if metrics["train/nonfinite"]:
                    self._stop_nonfinite(it, metrics)
                if cfg.logging.dump_rollouts_every and it % cfg.logging.dump_rollouts_every == 0 and self.primary:
                    self.dump_rollouts(it)
                if (cfg.checkpoint.every and it % cfg.checkpoint.every == 0) or it == cfg.train.steps:
                    self._save()
            self.checkpointer.wait()
        finally:
            writer.close()
            self.log = print
        return self.summary(sft_losses)

    def _stop_nonfinite(self, it: int, metrics: dict) -> None:
        m = {k.removeprefix("train/"): v for k, v in metrics.items() if k.startswith("train/")}
        last = self.checkpointer.latest_step()
        raise TrainingError(
            f"non-finite loss or gradient at iteration {it} (loss={m.get('loss')}, grad_norm={m.get('grad_norm')}, "
            f"non-finite log-prob tokens={m.get('nonfinite_tokens')}): the run stopped and nothing was saved for "
            f"this iteration; the last complete checkpoint is "
            f"{'none' if last is None else f'{self.ckpt_dir}/{last}'}. Lower optimizer.lr or check the data / "
            "rewards.")

    def _startup_report(self) -> str:
        """One line after the first iteration of this run: the time from the Trainer's start (loading, SFT and the
        first evaluation included) and what was compiled, loaded from the persistent cache or reused."""
        took = time.perf_counter() - self._started
        counts = compile_counts() - self._compiles_at_start
        step = ("compiled" if counts.compiled["jit(train_step)"] else
                "loaded from the persistent compilation cache" if counts.loaded["jit(train_step)"] else
                "already compiled in this process")
        self.startup = {"first_iteration_s": took, "programs_compiled": sum(counts.compiled.values()),
                        "programs_loaded": sum(counts.loaded.values()), "compile_s": counts.compile_s,
                        "train_step": step}
        cache = active_cache_dir()
        where = f" (cache {cache})" if cache else " (persistent compilation cache off)"
        return f"first iteration done {took:.1f} s after start; {counts.describe()}{where}; the train step was {step}"

    def plan(self) -> str:
        """What the run is about to do: algorithm, batch layout, token budgets, sampler memory, outputs."""
        cfg, a, t = self.cfg, self.cfg.algorithm, self.cfg.train
        per_prompt = f"{self.strategy.rollouts_per_prompt} concurrent rollouts, {self.strategy.train_rows_per_prompt} trained"
        sft = f"cold-start SFT {cfg.sft.steps} steps, then " if cfg.sft.steps and not self.sft_done else ""
        mesh = dict(self.mesh.shape) if self.mesh is not None else "one device"
        if self.processes > 1:
            mesh = f"{mesh} over {self.processes} processes"
        return (f"train {cfg.name}: {sft}{a.name} iterations {self.iteration + 1}..{t.steps}, each "
                f"{t.prompts_per_step} prompts x ({per_prompt}, n = {a.n}), "
                f"{t.prompts_per_step // t.mini_batch_prompts} update(s) x {t.ppo_epochs} epoch(s); "
                f"{self.engine.describe()}; mesh {mesh}; workdir {self.workdir}")

    def dump_rollouts(self, it: int) -> Path:
        path = self.workdir / "rollouts" / f"step_{it:06d}.html"
        write_rollout_dump(path, self._last_collected, self.tokenizer, title=f"{self.cfg.name} iteration {it}")
        return path

    def summary(self, sft_losses=()) -> dict:
        records = read_metrics(self.workdir / "metrics.jsonl")
        keys = ("reward/mean", "reward/accuracy", "response/length", "tools/calls_per_rollout", "branch/count",
                "branch/score_mean", "train/loss", "train/kl", "train/grad_norm", "time/step_s", "kl/to_start",
                "reward/groups_with_variance", "reward/format_ok", "entropy/mean")
        out = {"experiment": self.cfg.name, "algorithm": self.cfg.algorithm.name, "iterations": self.iteration,
               "workdir": str(self.workdir), "metrics": str(self.workdir / "metrics.jsonl"),
               "tensorboard": str(self.workdir / "tensorboard"), "checkpoints": str(self.ckpt_dir),
               "checkpoint_steps": self.checkpointer.all_steps(), "trends": summarize(records, keys),
               "reward_per_iteration": [r.get("reward/mean") for r in records]}
        if self.startup:
            out["startup"] = self.startup
        dumps = sorted((self.workdir / "rollouts").glob("*.html")) if (self.workdir / "rollouts").is_dir() else []
        if dumps:
            out["rollout_dumps"] = [str(p) for p in dumps]
        if sft_losses:
            out["sft_loss"] = {"first": sft_losses[0], "last": sft_losses[-1]}
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        if evals:
            out["final_eval"] = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
        out["heldout"] = heldout_changes(records, self._eval_counts, self.cfg.logging.eval_runs)
        out["warnings"] = self.warnings + run_warnings(records, out["heldout"])
        if self.primary and records:
            out["learning_curve"] = str(plot_learning_curve(records, self.workdir / "learning_curve.png",
                                                            title=f"{self.cfg.name} ({self.cfg.algorithm.name})"))
        return out

    def close(self) -> None:
        """Finish pending checkpoint writes and release the engines' and tools' threads."""
        try:
            self.checkpointer.close()
        finally:
            self.engine.close()
            for engine in self._eval_engines.values():
                engine.close()
            self.tools.close()
