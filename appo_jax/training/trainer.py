"""The training driver: builds everything an experiment config names and runs the RL loop.

    Trainer(cfg, workdir=..., resume=...).run() -> summary dict

Per iteration ``it`` (1-based): draw prompts (resumable iterator) -> :class:`Collector` (rollouts, log-probs,
branching, branch rollouts, rewards, advantages) -> the jitted train step (PPO epochs x mini-batches x
micro-batches) -> new weights to the rollout engine -> metrics (JSONL + TensorBoard + progress bar), rollout dump,
evaluation and checkpoint on their schedules. The PRNG key of iteration ``it`` is ``fold_in(state.rng, it)``,
so with fixed seeds a resumed run repeats the uninterrupted run's iterations exactly.

Safety: a workdir that already holds checkpoints is only continued with ``resume=True`` (never overwritten);
a non-finite loss or gradient skips the update inside the step and stops the run with an error before
anything is saved for that iteration; checkpoint failures (e.g. a full disk) stop the run with
:class:`~appo_jax.training.checkpoint.CheckpointError` while earlier checkpoints stay intact.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.progress import progress_bar
from appo_jax.training.algorithms import Collector, Placer, make_logprob_fn
from appo_jax.training.checkpoint import Checkpointer
from appo_jax.training.config import (ExperimentConfig, algorithm_spec, resolve_mesh_shape, resolved_loss,
                                      rows_per_mini_batch, to_dict, to_json, validate)
from appo_jax.training.metrics import MetricsWriter, read_metrics, summarize
from appo_jax.training.prompts import PromptIterator, encode_prompts, load_records
from appo_jax.training.state import learning_rate_schedule, make_optimizer
from appo_jax.training.train_step import StepConfig, TrainStepRunner, init_train_state, make_train_batch


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, unusable workdir, ...); the message says what is intact."""


# ------------------------------------------------------------------------------------------------ model / tools
@functools.lru_cache(maxsize=8)
def load_tokenizer(source: str):
    """A tokenizer from ``smollm2-135m-instruct``, a ``.gguf`` file or an HF directory (cached per source:
    tokenizers are not modified after loading)."""
    from appo_jax.models.loading import find_smollm2_gguf
    from appo_jax.models.gguf_io import load_gguf_tokenizer
    if source == "smollm2-135m-instruct":
        return load_gguf_tokenizer(find_smollm2_gguf())
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"tokenizer file {source!r} does not exist")
        return load_gguf_tokenizer(source)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"tokenizer source {source!r} is not smollm2-135m-instruct, a .gguf file or a "
                                "directory")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(source)


def load_policy(cfg: ExperimentConfig, mesh=None):
    """``(model_config, params, tokenizer)`` of ``cfg.model`` (module doc of :mod:`config`). A random preset takes
    its vocabulary size, EOS and pad ids from ``model.tokenizer``."""
    from appo_jax.models.loading import load_model
    from appo_jax.models.presets import PRESETS
    m = cfg.model
    overrides: dict[str, Any] = {}
    if m.remat_policy:
        overrides["remat_policy"] = m.remat_policy
    tokenizer = load_tokenizer(m.tokenizer) if m.tokenizer else None
    if m.name in PRESETS:
        if tokenizer is None:
            raise ValueError(f"model.name={m.name!r} is a randomly initialised preset without a tokenizer; set "
                             "model.tokenizer (e.g. smollm2-135m-instruct, a .gguf file or an HF directory)")
        eos = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        overrides.update(vocab_size=len(tokenizer), eos_token_ids=eos, pad_token_id=pad)
    config, params, own_tokenizer = load_model(m.name, mesh, m.dtype or "float32", m.param_dtype or None,
                                               rng=jax.random.PRNGKey(m.init_seed), **overrides)
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        raise ValueError(f"model {m.name!r} has no tokenizer; set model.tokenizer")
    return config, params, tokenizer


def build_tools(cfg: ExperimentConfig):
    from appo_jax.tools.registry import build_registry
    r = cfg.rollout
    search = {"backend_kwargs": {"path": r.search_cache}} if r.search_cache else {}
    return build_registry(("python", "search"), max_workers=r.tool_workers,
                          python={"timeout_s": r.tool_timeout_s}, search=search)


class RewardCache:
    """The engine's reward function: scores a response with the prompt's named reward and remembers the
    answer accuracy for the metrics (thread-safe; cleared every iteration)."""

    def __init__(self, override: Callable | None = None):
        self.override = override
        self._acc: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def __call__(self, item, text: str) -> float:
        if self.override is not None:
            score = float(self.override(item, text))
            acc = float(score >= 1.0)
        else:
            from appo_jax.rewards.registry import get_reward_fn
            out = get_reward_fn(item.reward)(text, item.ground_truths)
            score, acc = float(out.score), float(out.accuracy)
        with self._lock:
            self._acc[(id(item), text)] = acc
        return score

    def accuracy(self, item, text: str) -> float:
        with self._lock:
            hit = self._acc.get((id(item), text))
        if hit is None:
            self(item, text)
            with self._lock:
                hit = self._acc[(id(item), text)]
        return hit

    def clear(self) -> None:
        with self._lock:
            self._acc.clear()


@functools.lru_cache(maxsize=8)
def _candidate_table(tokenizer, vocab_size: int) -> np.ndarray:
    """The branch-candidate table of the tokenizer, padded with False up to the model's vocabulary size."""
    from appo_jax.core.candidates import candidate_token_table
    table = candidate_token_table(tokenizer)
    if table.size < vocab_size:
        table = np.concatenate([table, np.zeros(vocab_size - table.size, bool)])
    return table[:vocab_size]


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _copy_tree(tree):
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Builds and runs an experiment (module doc). ``reward_fn(item, text) -> float`` replaces the reward
    registry (custom tasks); ``log`` receives progress lines."""

    def __init__(self, cfg: ExperimentConfig, *, workdir: str | None = None, resume: bool = False,
                 reward_fn: Callable | None = None, log: Callable[[str], None] = print):
        validate(cfg, jax.device_count())
        self.cfg, self.spec, self.log = cfg, algorithm_spec(cfg), log
        self.workdir = Path(workdir or cfg.workdir).absolute()
        self.ckpt_dir = self.workdir / "checkpoints"
        self.resume = resume
        self._check_workdir()

        # the data first: a missing dataset fails before minutes of model loading
        records = load_records(cfg.data.train, data_dir=cfg.data.data_dir, limit=cfg.data.limit, seed=cfg.data.seed)
        data, fsdp, tensor = resolve_mesh_shape(cfg, jax.device_count())
        self.mesh = None  # one device: plain jit on the default device
        if data * fsdp * tensor > 1:
            from appo_jax.parallel.mesh import make_mesh
            devices = jax.devices()
            self.mesh = make_mesh(data, fsdp, tensor, devices=None if data * fsdp * tensor == len(devices)
                                  else devices[:data * fsdp * tensor])
        self.placer = Placer(self.mesh)

        self.model_config, params, self.tokenizer = load_policy(cfg, self.mesh)
        items, dropped = encode_prompts(records, self.tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                        reward=cfg.data.reward, system_prompt=cfg.data.system_prompt)
        if dropped:
            log(f"data: dropped {dropped} prompts longer than rollout.max_prompt_len={cfg.rollout.max_prompt_len}")
        self.prompts = PromptIterator(items, seed=cfg.data.seed, shuffle=cfg.data.shuffle)

        updates_per_step = (cfg.train.prompts_per_step // cfg.train.mini_batch_prompts) * cfg.train.ppo_epochs
        self.lr_schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps * updates_per_step)
        self.tx = make_optimizer(cfg.optimizer, cfg.train.steps * updates_per_step)
        self.state, self.shardings = init_train_state(params, self.tx, cfg.train.seed, mesh=self.mesh,
                                                      model_config=self.model_config)
        loss = resolved_loss(cfg)
        self.kl_coef = loss["kl_coef"]
        need_ref = self.kl_coef > 0 or cfg.algorithm.omega_baseline == "reference"
        self.ref_params = None
        if need_ref:
            self.ref_params = self._load_reference(params)
        del params

        rows = rows_per_mini_batch(cfg)
        micro = cfg.train.micro_batch_rows or rows
        self.step_cfg = StepConfig.make(self.model_config, loss, mini_batches=cfg.train.prompts_per_step //
                                        cfg.train.mini_batch_prompts, micro_batches=rows // micro,
                                        epochs=cfg.train.ppo_epochs, logprob_chunk=cfg.train.logprob_chunk,
                                        temperature=cfg.rollout.temperature)
        self.runner = TrainStepRunner(self.step_cfg, mesh=self.mesh, lr_schedule=self.lr_schedule,
                                      shardings=self.shardings)
        self.logprob_fn = make_logprob_fn(self.model_config, chunk=cfg.train.logprob_chunk,
                                          temperature=cfg.rollout.temperature, micro_rows=micro)

        from appo_jax.rollout.engine import RolloutConfig, RolloutEngine
        table = _candidate_table(self.tokenizer, self.model_config.vocab_size)
        self.tools = build_tools(cfg)
        self.rewards = RewardCache(reward_fn)
        r = cfg.rollout
        rows_per_step = cfg.train.prompts_per_step * cfg.algorithm.n
        self.rollout_cfg = RolloutConfig(
            max_prompt_len=r.max_prompt_len, max_response_len=r.max_response_len, tool_call_limit=r.tool_call_limit,
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, num_slots=r.num_slots or rows_per_step,
            decode_chunk=r.decode_chunk, tool_workers=r.tool_workers, tool_timeout_s=r.tool_timeout_s
        ).fitted(items, rows_per_step)  # prompt length and slots of this dataset, not the configured maxima
        self.engine = RolloutEngine(self.model_config, self.state.params, self.tokenizer, self.tools,
                                    self.rollout_cfg, mesh=self.mesh, reward_fn=self.rewards)
        self.collector = Collector(cfg, self.spec, self.engine, self.logprob_fn, table, self.placer,
                                   accuracy_of=self.rewards.accuracy)
        self.lagged: deque = deque(maxlen=cfg.algorithm.omega_lag)
        self.iteration = 0
        self.sft_done = False
        self._nonfinite = None
        self._last_collected = None
        self.checkpointer = Checkpointer(self.ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self._eval_engine = None
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

    def _load_reference(self, params):
        ref_name = self.cfg.model.reference
        if not ref_name:
            return params  # the loaded initial policy (the train state holds its own copy)
        from appo_jax.models.loading import load_model
        m = self.cfg.model
        config, ref, _ = load_model(ref_name, self.mesh, m.dtype or "float32", m.param_dtype or None)
        if jax.tree.structure(ref) != jax.tree.structure(params) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params))):
            raise ValueError(f"model.reference={ref_name!r} does not have the policy's parameter shapes")
        return ref

    def _extra_tree(self) -> dict:
        extra = {}
        if self.cfg.algorithm.omega_baseline == "lagged" and self.lagged:
            extra["lagged"] = {str(i): p for i, p in enumerate(self.lagged)}
        if self.sft_done and self.ref_params is not None:
            extra["reference"] = self.ref_params
        return extra

    def _restore(self) -> None:
        meta = self.checkpointer.read_meta()
        extra_target = {}
        lagged_count = int(meta.get("lagged", 0))
        if lagged_count:
            extra_target["lagged"] = {str(i): self.state.params for i in range(lagged_count)}
        if meta.get("sft_done") and self.ref_params is not None:
            extra_target["reference"] = self.ref_params
        state, meta, extra = self.checkpointer.restore(self.state, extra_target=extra_target)
        self.state = state
        self.engine.set_params(self.state.params)
        self.iteration = int(meta["iteration"])
        self.prompts.restore(meta["data"])
        self.sft_done = bool(meta.get("sft_done"))
        if "reference" in extra:
            self.ref_params = extra["reference"]
        for i in range(lagged_count):
            self.lagged.append(extra["lagged"][str(i)])
        self.log(f"resumed from {self.ckpt_dir}/{self.iteration} (iteration {self.iteration}, "
                 f"optimizer step {int(self.state.step)})")

    # -- SFT -------------------------------------------------------------------------------------------------
    def run_sft(self, writer: MetricsWriter | None = None) -> list[float]:
        """Cold-start SFT (``cfg.sft``) on the current params; the reference policy becomes the SFT result."""
        from appo_jax.training.sft import encode_examples, load_sft_examples, make_sft_step, sft_batches
        s = self.cfg.sft
        if s.data == "toy_arithmetic":
            from appo_jax.training.toy_task import arithmetic_records, arithmetic_traces
            examples = arithmetic_traces(arithmetic_records(s.examples, seed=self.cfg.data.seed + 1000), self.tools)
        else:
            examples = load_sft_examples(s.data)
        if self.cfg.data.system_prompt:
            for ex in examples:
                if ex["messages"] and ex["messages"][0]["role"] == "system":
                    ex["messages"][0] = {"role": "system", "content": self.cfg.data.system_prompt}
        arrays = encode_examples(examples, self.tokenizer, max_prompt_len=self.cfg.rollout.max_prompt_len,
                                 max_response_len=s.max_response_len, pad_id=self.engine.pad_id)
        opt = dataclasses.replace(self.cfg.optimizer, lr=s.lr, schedule="constant", warmup_steps=0)
        tx = make_optimizer(opt, s.steps)
        sft_state, sh = init_train_state(self.state.params, tx, self.cfg.train.seed, mesh=self.mesh,
                                         model_config=self.model_config)
        step = make_sft_step(self.model_config, self.cfg.train.logprob_chunk, sh)
        losses = []
        batches = sft_batches(arrays, min(s.batch_size, len(examples)), seed=self.cfg.data.seed)
        self.log(f"cold-start SFT: {s.steps} steps x {min(s.batch_size, len(examples))} of {len(examples)} "
                 f"examples ({s.data}), lr {s.lr:g}, responses <= {s.max_response_len} tokens")
        tokens, t0 = 0.0, time.perf_counter()
        with progress_bar(s.steps, "sft", "step", enabled=self.cfg.logging.progress) as bar:
            for i in range(s.steps):
                batch = {k: self.placer.rows(v) for k, v in next(batches).items()}
                with self.placer.context():
                    sft_state, m = step(sft_state, batch)
                losses.append(float(m["sft/loss"]))
                if not math.isfinite(losses[-1]):
                    raise TrainingError(f"SFT loss became non-finite at SFT step {i + 1}; nothing was saved")
                tokens += float(m["sft/tokens"])
                bar.set_postfix_str(f"loss {losses[-1]:.4f}, {tokens / (time.perf_counter() - t0):.0f} tok/s",
                                    refresh=False)
                bar.update(1)
        self.log(f"cold-start SFT loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
        # RL starts from the SFT weights with a fresh optimizer; the reference becomes the SFT policy.
        self.state, self.shardings = init_train_state(sft_state.params, self.tx, self.cfg.train.seed,
                                                      mesh=self.mesh, model_config=self.model_config)
        if self.ref_params is not None:
            self.ref_params = _copy_tree(self.state.params)
        self.engine.set_params(self.state.params)
        self.sft_done = True
        return losses

    # -- the loop --------------------------------------------------------------------------------------------
    def _save(self) -> None:
        meta = {"iteration": self.iteration, "data": self.prompts.state(), "sft_done": self.sft_done,
                "lagged": len(self.lagged) if self.cfg.algorithm.omega_baseline == "lagged" else 0,
                "config": to_dict(self.cfg)}
        self.checkpointer.save(self.iteration, self.state, meta, extra=self._extra_tree())

    def train_iteration(self) -> dict:
        """One RL iteration (module doc); returns its metrics."""
        cfg = self.cfg
        it = self.iteration + 1
        t_start = time.perf_counter()
        key = jax.random.fold_in(jnp.asarray(self.state.rng), it)
        lagged = self.lagged[0] if (cfg.algorithm.omega_baseline == "lagged" and
                                    len(self.lagged) == cfg.algorithm.omega_lag) else None
        self.rewards.clear()
        col = self.collector.collect(self.prompts.next, self.state.params, self.ref_params, lagged, key)
        if cfg.algorithm.omega_baseline == "lagged":
            self.lagged.append(_copy_tree(self.state.params))

        n = col.train_rows
        traj = jax.tree_util.tree_map(lambda x: np.asarray(x)[:n], col.batch.traj)
        batch = make_train_batch(traj, col.advantages, col.old_logp,
                                 col.ref_logp if self.kl_coef else None, train_branches=col.train_branches)
        t0 = time.perf_counter()
        self.state, step_metrics = self.runner(self.state, batch)
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        t_update = time.perf_counter() - t0
        self.engine.set_params(self.state.params)
        self.iteration = it

        metrics = dict(col.metrics)
        metrics.update({f"train/{k}": v for k, v in step_metrics.items()})
        metrics["time/update_s"] = t_update
        trained_tokens = float(np.asarray(batch["loss_mask"]).sum()) * cfg.train.ppo_epochs
        metrics["throughput/train_tokens_per_s"] = trained_tokens / max(t_update, 1e-9)
        metrics["time/step_s"] = time.perf_counter() - t_start
        metrics["train/optimizer_step"] = float(int(self.state.step))
        self._last_collected = col
        if (step_metrics.get("update_skipped", 0.0) > 0 or step_metrics.get("nonfinite_tokens", 0.0) > 0
                or not math.isfinite(step_metrics.get("loss", 0.0)) or not _all_finite(self.state.params)):
            self._nonfinite = (it, step_metrics)
        return metrics

    def evaluate(self) -> dict:
        from appo_jax.training.evaluation import evaluate_pass1
        cfg = self.cfg.logging
        names = [b.strip() for b in cfg.eval_benchmarks.split(",") if b.strip()]
        results = evaluate_pass1(self.model_config, self.state.params, self.tokenizer, self.tools, names,
                                 limit=cfg.eval_limit or None, runs=cfg.eval_runs, rollout=self.cfg.rollout,
                                 mesh=self.mesh, data_dir=self.cfg.data.data_dir, engine=self._eval_engine,
                                 system_prompt=self.cfg.data.system_prompt)
        self._eval_engine = results.pop("_engine", self._eval_engine)
        results.pop("_counts", None)
        return {f"eval/{k}": v for k, v in results.items()}

    def run(self) -> dict:
        """Run (or continue) the experiment to ``train.steps`` iterations; returns a summary dict."""
        cfg = self.cfg
        start = self.iteration
        (self.workdir / "config.json").write_text(to_json(cfg))
        writer = MetricsWriter(self.workdir, total_steps=cfg.train.steps, start_step=start,
                               tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        self.log = writer.log_text
        self.log(self.plan())
        sft_losses = []
        try:
            if cfg.sft.steps and not self.sft_done and start == 0:
                sft_losses = self.run_sft()
            while self.iteration < cfg.train.steps:
                metrics = self.train_iteration()
                it = self.iteration
                if cfg.logging.eval_every and it % cfg.logging.eval_every == 0 and cfg.logging.eval_benchmarks:
                    metrics.update(self.evaluate())
                if it % cfg.logging.every == 0 or self._nonfinite:
                    writer.write(it, metrics)
                if self._nonfinite:
                    _, m = self._nonfinite
                    last = self.checkpointer.latest_step()
                    raise TrainingError(
                        f"non-finite loss or gradient at iteration {it} (loss={m.get('loss')}, "
                        f"grad_norm={m.get('grad_norm')}, non-finite log-prob tokens={m.get('nonfinite_tokens')}):"
                        f" the run stopped and nothing was saved for this iteration; the last complete checkpoint is "
                        f"{'none' if last is None else f'{self.ckpt_dir}/{last}'}. Lower optimizer.lr or check "
                        "the data / rewards.")
                if cfg.logging.dump_rollouts_every and it % cfg.logging.dump_rollouts_every == 0:
                    self.dump_rollouts(it)
                if (cfg.checkpoint.every and it % cfg.checkpoint.every == 0) or it == cfg.train.steps:
                    self._save()
            self.checkpointer.wait()
        finally:
            writer.close()
            self.log = print
        return self.summary(sft_losses)

    def plan(self) -> str:
        """What the run is about to do: algorithm, batch layout, token budgets, sampler memory, outputs."""
        cfg, a, t = self.cfg, self.cfg.algorithm, self.cfg.train
        per_prompt = (f"{a.n_init} initial + {a.n - a.n_init} branch rollouts" if self.spec.rollout == "appo"
                      else f"{a.n} rollouts")
        sft = f"cold-start SFT {cfg.sft.steps} steps, then " if cfg.sft.steps and not self.sft_done else ""
        mesh = dict(self.mesh.shape) if self.mesh is not None else "one device"
        return (f"train {cfg.name}: {sft}{cfg.algorithm.name} iterations {self.iteration + 1}..{t.steps}, each "
                f"{t.prompts_per_step} prompts x ({per_prompt}), {t.prompts_per_step // t.mini_batch_prompts} "
                f"update(s) x {t.ppo_epochs} epoch(s); {self.engine.describe()}; mesh {mesh}; workdir {self.workdir}")

    def dump_rollouts(self, it: int) -> Path:
        from appo_jax.training.rollout_dump import write_rollout_dump
        path = self.workdir / "rollouts" / f"step_{it:06d}.html"
        write_rollout_dump(path, self._last_collected, self.tokenizer, title=f"{self.cfg.name} iteration {it}")
        return path

    def summary(self, sft_losses=()) -> dict:
        records = read_metrics(self.workdir / "metrics.jsonl")
        keys = ("reward/mean", "reward/accuracy", "response/length", "tools/calls_per_rollout", "branch/count",
                "branch/score_mean", "train/loss", "train/kl", "train/grad_norm", "time/step_s")
        out = {"experiment": self.cfg.name, "algorithm": self.cfg.algorithm.name, "iterations": self.iteration,
               "workdir": str(self.workdir), "metrics": str(self.workdir / "metrics.jsonl"),
               "tensorboard": str(self.workdir / "tensorboard"), "checkpoints": str(self.ckpt_dir),
               "checkpoint_steps": self.checkpointer.all_steps(), "trends": summarize(records, keys),
               "reward_per_iteration": [r.get("reward/mean") for r in records]}
        dumps = sorted((self.workdir / "rollouts").glob("*.html")) if (self.workdir / "rollouts").is_dir() else []
        if dumps:
            out["rollout_dumps"] = [str(p) for p in dumps]
        if sft_losses:
            out["sft_loss"] = {"first": sft_losses[0], "last": sft_losses[-1]}
        return out

    def close(self) -> None:
        """Finish pending checkpoint writes and release the engines' and tools' threads."""
        try:
            self.checkpointer.close()
        finally:
            self.engine.close()
            if self._eval_engine is not None:
                self._eval_engine.close()
            self.tools.close()
