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
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.compilation_cache import active_cache_dir, compile_counts
from appo_jax.core.registry import CONTROLS
from appo_jax.core.advantages import advantages_from_trajectory
from appo_jax.core.candidates import candidate_token_table
from appo_jax.data import encode_records, get_task, load_dataset
from appo_jax.models.loading import load_model, load_policy
from appo_jax.models.sharding import shard_params
from appo_jax.parallel.mesh import make_mesh
from appo_jax.parallel.multihost import reduce_timings
from appo_jax.parallel.placement import Placement
from appo_jax.progress import progress_bar
from appo_jax.rewards.registry import RecordReward
from appo_jax.rollout.decision_labels import DecisionLabeller
from appo_jax.rollout.engine import RolloutEngine, default_tools
from appo_jax.rollout.host_sharded import HostShardedEngine
from appo_jax.rollout.strategies import Sampled
from appo_jax.training.batch import TrainBatch
from appo_jax.training.checkpoint import Checkpointer
from appo_jax.training.config import (ExperimentConfig, algorithm_spec, resolve_mesh_shape, resolved_loss,
                                      candidate_rule, eval_modes, rows_per_mini_batch, to_dict, to_json, validate)
from appo_jax.training.evaluation import evaluate_pass1
from appo_jax.training.learning_signals import (heldout_changes, kl_to_reference, plot_learning_curve, run_warnings,
                                                signal_warnings)
from appo_jax.training.metrics import MetricsWriter, read_metrics, summarize
from appo_jax.training.policies import Policies, copy_tree
from appo_jax.training.prompt_iterator import PromptIterator
from appo_jax.training.rollout_dump import write_rollout_dump
from appo_jax.training.rollout_metrics import (advantage_metrics, batch_metrics, branching_metrics,
                                               mismatch_metrics)
from appo_jax.training.sft import (encode_examples, load_sft_examples, make_sft_step, sft_batches, sft_cache_key,
                                   sft_optimizer)
from appo_jax.training.state import learning_rate_schedule, make_optimizer
from appo_jax.training.train_step import StepConfig, TrainStepRunner, init_train_state


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, unusable workdir, ...); the message says what is intact."""


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


@functools.lru_cache(maxsize=8)
def _candidate_table(tokenizer, vocab_size: int, rule: str) -> np.ndarray:
    """The branch-candidate table of the tokenizer under ``rule`` (`candidate_rule`), padded with False up to
    the model's vocabulary size."""
    table = candidate_token_table(tokenizer, rule)
    if table.size < vocab_size:
        table = np.concatenate([table, np.zeros(vocab_size - table.size, bool)])
    return table[:vocab_size]


@functools.partial(jax.jit, static_argnames=("name", "num_groups", "num_trees", "options"))
def _advantages(traj, tree_ids, *, name: str, num_groups: int, num_trees: int, options: tuple):
    """``advantages_from_trajectory(name, traj, num_groups, tree_ids, num_trees, **options)``, jitted."""
    return advantages_from_trajectory(name, traj, num_groups, tree_ids=tree_ids, num_trees=num_trees,
                                      **dict(options))


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Trainer:
    """Builds and runs an experiment (module doc); ``log`` receives progress lines."""

    def __init__(self, cfg: ExperimentConfig, *, workdir: str | None = None, resume: bool = False,
                 log: Callable[[str], None] = print):
        self._started, self._compiles_at_start = time.perf_counter(), compile_counts()
        self.startup: dict = {}
        validate(cfg, jax.device_count())
        self.processes, self.primary = jax.process_count(), jax.process_index() == 0
        if cfg.train.prompts_per_step % self.processes:
            raise TrainingError(f"train.prompts_per_step={cfg.train.prompts_per_step} does not split over the "
                                f"{self.processes} processes of this job (each samples an equal block of prompts)")
        self.cfg, self.spec, self.log = cfg, algorithm_spec(cfg), log
        if "://" in str(workdir or cfg.workdir):
            raise TrainingError(f"workdir {str(workdir or cfg.workdir)!r} is a URL; the trainer writes through the file "
                                "system: mount the bucket (gcsfuse) or shared storage at the same path on every "
                                "process and give that path")
        self.workdir = Path(workdir or cfg.workdir).absolute()
        self.ckpt_dir = self.workdir / "checkpoints"
        self.resume = resume
        self._check_workdir()

        # the data first: a missing dataset fails before minutes of model loading
        self.task = get_task(cfg.data.train)
        records = load_dataset(cfg.data.train, limit=cfg.data.limit or None, seed=cfg.data.seed,
                               data_dir=cfg.data.data_dir or None,
                               task_options=cfg.data.task_options if self.task is not None else None)
        self.mesh = self._make_mesh()
        self.placement = Placement(self.mesh)
        m = cfg.model
        overrides = {"remat_policy": m.remat_policy} if m.remat_policy else {}
        self.model_config, params, self.tokenizer = load_policy(
            m.name, m.tokenizer, self.mesh, m.dtype or "float32", m.param_dtype or None, init_seed=m.init_seed,
            **overrides)
        prompts, too_long = encode_records(records, self.tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                           system_prompt=cfg.data.system_prompt)
        if too_long:
            log(f"data: dropped {len(too_long)} prompts longer than rollout.max_prompt_len="
                f"{cfg.rollout.max_prompt_len}")
        self.prompts = PromptIterator(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle)

        t = cfg.train
        updates_per_step = (t.prompts_per_step // t.mini_batch_prompts) * t.ppo_epochs
        self.lr_schedule = learning_rate_schedule(cfg.optimizer, t.steps * updates_per_step)
        self.tx = make_optimizer(cfg.optimizer, t.steps * updates_per_step)
        self.state, self.shardings = init_train_state(params, self.tx, t.seed, mesh=self.mesh,
                                                      model_config=self.model_config)
        loss = resolved_loss(cfg)
        self.kl_coef = loss["kl_coef"]
        a = cfg.algorithm
        micro = t.micro_batch_rows or rows_per_mini_batch(cfg)
        self.kl_to_start = cfg.logging.kl_to_start
        need_reference = self.kl_coef > 0 or a.omega_baseline == "reference" or self.kl_to_start
        self.policies = Policies(self.model_config, self.placement, chunk=t.logprob_chunk,
                                 temperature=cfg.rollout.temperature, micro_rows=micro, baseline=a.omega_baseline,
                                 lag=a.omega_lag, reference=self._load_reference(params) if need_reference else None)
        del params

        self.step_cfg = StepConfig.make(self.model_config, loss, mini_batches=t.prompts_per_step // t.mini_batch_prompts,
                                        micro_batches=rows_per_mini_batch(cfg) // micro, epochs=t.ppo_epochs,
                                        logprob_chunk=t.logprob_chunk, temperature=cfg.rollout.temperature)
        self.runner = TrainStepRunner(self.step_cfg, mesh=self.mesh, lr_schedule=self.lr_schedule,
                                      shardings=self.shardings)
        self.strategy = self.spec.strategy(
            a, cfg.rollout, table=jnp.asarray(_candidate_table(self.tokenizer, self.model_config.vocab_size,
                                                                 candidate_rule(a))),
            logprobs=self.policies.current_and_baseline, place=self.placement.tree, to_host=self.placement.host,
            labeller=DecisionLabeller(self.task, self.tokenizer) if self.task and self.task.decision_spans else None)
        task = self.task
        self.tools = default_tools(cfg.rollout, (task.search_backend, task.backend_kwargs(cfg.data.task_options))
                                   if task is not None and task.search_backend else None)
        # the sampler holds the prompt length and slots of this dataset (this host's share), not the maxima
        rollout_cfg = cfg.rollout.fitted(
            prompts, t.prompts_per_step // self.processes * self.strategy.rollouts_per_prompt)
        reward = RecordReward(cfg.data.reward)
        self.engine = self._make_engine(rollout_cfg, reward)
        self.advantage_options = tuple(sorted(self.spec.advantage_options(a).items()))
        self.iteration = 0
        self.sft_done = False
        self._nonfinite = None
        self._last_collected: Collected | None = None
        self.checkpointer = Checkpointer(self.ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self._eval_engines: dict = {}
        self._eval_counts: dict = {}
        self.control = CONTROLS.get(a.control)
        self.warnings = signal_warnings(cfg, self.strategy.rollouts_per_prompt, records, reward)
        for warning in self.warnings:
            log(f"warning: {warning}")
        if self.resume:
            if self.checkpointer.latest_step() is not None:
                self._restore()
            else:
                log(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from the beginning")

    # -- setup helpers ---------------------------------------------------------------------------------------
    def _check_workdir(self) -> None:
        existing = sorted(p.name for p in self.ckpt_dir.glob("[0-9]*")) if self.ckpt_dir.is_dir() else []
        if existing and not self.resume:
            raise TrainingError(f"workdir {str(self.workdir)!r} already has checkpoints {existing}; pass --resume to "
                                "continue that run or choose another --workdir (nothing was changed)")
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _make_mesh(self):
        """None for one device (plain jit on the default device), else a mesh over the first devices."""
        data, fsdp, tensor = resolve_mesh_shape(self.cfg, jax.device_count())
        size = data * fsdp * tensor
        if self.processes > 1 and size != jax.device_count():
            raise TrainingError(f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} = {size} does not cover the "
                                f"{jax.device_count()} devices of the {self.processes} processes; with several "
                                "processes the mesh spans every device (use -1 for one axis)")
        if size == 1:
            return None
        devices = jax.devices()
        return make_mesh(data, fsdp, tensor, devices=None if size == len(devices) else devices[:size])

    def _make_engine(self, rollout_cfg, reward_fn):
        """The rollout engine: on the trainer's mesh for one process; with several processes each samples its
        block of prompts on a sampler over its own devices (`HostShardedEngine`, docs/multihost.md)."""
        if self.processes == 1:
            return RolloutEngine(self.model_config, self.state.params, self.tokenizer, self.tools, rollout_cfg,
                                 mesh=self.mesh, reward_fn=reward_fn)
        local = jax.local_devices()
        _, fsdp, tensor = resolve_mesh_shape(self.cfg, jax.device_count())
        if len(local) % (fsdp * tensor):
            raise TrainingError(f"each host samples with a full copy of the policy on its {len(local)} devices, "
                                f"which mesh.fsdp x mesh.tensor = {fsdp} x {tensor} does not divide")
        mesh = None if len(local) == 1 else make_mesh(len(local) // (fsdp * tensor), fsdp, tensor, devices=local)

        def place(host_params):
            if mesh is None:
                return jax.device_put(host_params, local[0])
            return shard_params(host_params, mesh, self.model_config)

        params = place(self.placement.host(self.state.params))
        inner = RolloutEngine(self.model_config, params, self.tokenizer, self.tools, rollout_cfg, mesh=mesh,
                              reward_fn=reward_fn)
        self.local_mesh = mesh
        return HostShardedEngine(inner, jax.process_index(), self.processes, place, params)

    def _sampler_params(self):
        """The parameters and mesh the sampler uses (this host's copy in a multi-process run)."""
        if self.processes == 1:
            return self.state.params, self.mesh
        return self.engine.params, self.local_mesh

    def _load_reference(self, params):
        ref_name = self.cfg.model.reference
        if not ref_name:
            return params  # the loaded initial policy (the train state holds its own copy)
        m = self.cfg.model
        _, ref, _ = load_model(ref_name, self.mesh, m.dtype or "float32", m.param_dtype or None)
        if jax.tree.structure(ref) != jax.tree.structure(params) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params))):
            raise ValueError(f"model.reference={ref_name!r} does not have the policy's parameter shapes")
        return ref

    def _restore(self) -> None:
        meta = self.checkpointer.read_meta()
        target = self.policies.restore_target(int(meta.get("lagged", 0)), bool(meta.get("sft_done")),
                                              self.state.params)
        state, meta, extra = self.checkpointer.restore(self.state, extra_target=target)
        self.state = state
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
    def _sft_examples(self) -> list[dict]:
        s, data = self.cfg.sft, self.cfg.data
        task = get_task(s.data)
        if task is None:
            examples = load_sft_examples(s.data)
        else:
            options = data.task_options if task is self.task else None
            seed = self._sft_seed()
            examples = task.traces(task.records(task.splits[0], s.examples, seed + 1000, options), self.tools,
                                   options, seed=seed)
        if data.system_prompt:
            for ex in examples:
                if ex["messages"] and ex["messages"][0]["role"] == "system":
                    ex["messages"][0] = {"role": "system", "content": data.system_prompt}
        return examples

    def _sft_seed(self) -> int:
        return self.cfg.sft.seed if self.cfg.sft.seed >= 0 else self.cfg.data.seed

    def _sft_cache_file(self) -> Path | None:
        """``<sft.cache_dir>/sft-<key>.npz`` with the key of `sft_cache_key` (what the SFT policy depends on)."""
        c = self.cfg
        if not c.sft.cache_dir:
            return None
        task = get_task(c.sft.data)
        key = sft_cache_key(c, self.tokenizer, task, c.data.task_options if task is self.task else None,
                            self._sft_seed())
        return Path(c.sft.cache_dir) / f"sft-{key}.npz"

    def _start_rl_from(self, params) -> None:
        """RL starts from ``params`` with a fresh optimizer; the reference becomes that policy."""
        self.state, self.shardings = init_train_state(params, self.tx, self.cfg.train.seed,
                                                      mesh=self.mesh, model_config=self.model_config)
        if self.policies.reference is not None:
            self.policies.reference = copy_tree(self.state.params)
        self.engine.set_params(self.state.params)
        self.sft_done = True

    def run_sft(self) -> list[float]:
        """Cold-start SFT (``cfg.sft``) on the current params, or its cached result (``sft.cache_dir``); the
        reference policy becomes the SFT result."""
        s = self.cfg.sft
        cache = self._sft_cache_file()
        if cache is not None and cache.is_file():
            with np.load(cache) as f:
                losses = [float(x) for x in f["__losses__"]]
                leaves = [f[f"leaf_{i}"] for i in range(len(jax.tree.leaves(self.state.params)))]
            params = jax.tree.unflatten(jax.tree.structure(self.state.params), leaves)
            self.log(f"cold-start SFT: reusing {cache} (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
            self._start_rl_from(jax.tree.map(jnp.asarray, params))  # init_train_state shards it on the mesh
            return losses
        examples = self._sft_examples()
        arrays = encode_examples(examples, self.tokenizer, max_prompt_len=self.cfg.rollout.max_prompt_len,
                                 max_response_len=s.max_response_len, pad_id=self.engine.pad_id)
        sft_state, sh = init_train_state(self.state.params, make_optimizer(sft_optimizer(self.cfg.optimizer, s.lr),
                                                                           s.steps),
                                         s.seed if s.seed >= 0 else self.cfg.train.seed,
                                         mesh=self.mesh, model_config=self.model_config)
        step = make_sft_step(self.model_config, self.cfg.train.logprob_chunk, sh)
        losses = []
        batch_size = min(s.batch_size, len(examples))
        batches = sft_batches(arrays, batch_size, seed=self._sft_seed())
        self.log(f"cold-start SFT: {s.steps} steps x {batch_size} of {len(examples)} examples ({s.data}), "
                 f"lr {s.lr:g}, responses <= {s.max_response_len} tokens")
        tokens, t0 = 0.0, time.perf_counter()
        with progress_bar(s.steps, "sft", "step", enabled=self.cfg.logging.progress) as bar:
            for i in range(s.steps):
                batch = self.placement.tree(next(batches))
                with self.placement.context():
                    sft_state, m = step(sft_state, batch)
                losses.append(float(m["sft/loss"]))
                if not math.isfinite(losses[-1]):
                    raise TrainingError(f"SFT loss became non-finite at SFT step {i + 1}; nothing was saved")
                tokens += float(m["sft/tokens"])
                if s.eval_every and ((i + 1) % s.eval_every == 0 or i + 1 == s.steps):
                    self._sft_probe(i + 1, losses, sft_state.params)
                bar.set_postfix_str(f"loss {losses[-1]:.4f}, {tokens / (time.perf_counter() - t0):.0f} tok/s",
                                    refresh=False)
                bar.update(1)
        self.log(f"cold-start SFT loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
        if cache is not None:
            leaves = {f"leaf_{i}": x for i, x in enumerate(self.placement.host(jax.tree.leaves(sft_state.params)))}
        if cache is not None and self.primary:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.stem + f".tmp{os.getpid()}.npz")
            np.savez(tmp, __losses__=np.asarray(losses), **leaves)
            os.replace(tmp, cache)  # atomic: concurrent runs never read half a file
        self._start_rl_from(sft_state.params)
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
        self.policies.current = self.state.params
        sampled = self.strategy.sample(self.engine, self.prompts.next, num_prompts, key)
        self.policies.iteration_done()
        n = sampled.train_rows
        traj = jax.tree.map(lambda x: np.asarray(x)[:n], sampled.batch.traj)
        t0 = time.perf_counter()
        old = sampled.old_logp if sampled.old_logp is not None else self.policies.logprobs(self.state.params, traj)
        ref = self.policies.reference_logprobs(traj) if self.kl_coef or self.kl_to_start else None
        old, ref = self.placement.host((old, ref))
        if self.kl_to_start:
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
        """One RL iteration (module doc); returns its metrics."""
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
        metrics = reduce_timings(metrics)
        self._last_collected = col
        if (step_metrics.get("update_skipped", 0.0) > 0 or step_metrics.get("nonfinite_tokens", 0.0) > 0
                or not math.isfinite(step_metrics.get("loss", 0.0)) or not _all_finite(self.state.params)):
            self._nonfinite = (it, step_metrics)
        return metrics

    def evaluate(self, params=None) -> dict:
        """Pass@1 on ``logging.eval_benchmarks`` under every mode of ``logging.eval_modes`` (of ``params``, default
        the sampler's): ``{"eval/BENCH/MODE": acc, "eval/BENCH": acc of the first mode}``."""
        cfg = self.cfg.logging
        names = [b.strip() for b in cfg.eval_benchmarks.split(",") if b.strip()]
        sampler_params, mesh = self._sampler_params()  # every host evaluates the whole benchmark with its own copy
        out = {}
        for mode in eval_modes(cfg):
            results = evaluate_pass1(self.model_config, sampler_params if params is None else params,
                                     self.tokenizer, self.tools, names, limit=cfg.eval_limit or None,
                                     runs=cfg.eval_runs, rollout=self.cfg.rollout, mesh=mesh,
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
                if it % cfg.logging.every == 0 or self._nonfinite:
                    writer.write(it, metrics)
                if self._nonfinite:
                    self._stop_nonfinite(it)
                if cfg.logging.dump_rollouts_every and it % cfg.logging.dump_rollouts_every == 0 and self.primary:
                    self.dump_rollouts(it)
                if (cfg.checkpoint.every and it % cfg.checkpoint.every == 0) or it == cfg.train.steps:
                    self._save()
            self.checkpointer.wait()
        finally:
            writer.close()
            self.log = print
        return self.summary(sft_losses)

    def _stop_nonfinite(self, it: int) -> None:
        _, m = self._nonfinite
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
