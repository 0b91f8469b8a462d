"""Building a run: everything an experiment config names, made once, before the loop (`appo_jax.training.trainer`).

    run, state = build_run(cfg, workdir=..., resume=..., log=print)

In order, so that a bad config, a used workdir or a missing dataset fails before minutes of model loading:
the config is validated and the processes counted; the workdir is checked (a workdir holding checkpoints is only
continued with ``resume``; a URL is refused); the data is loaded; then the mesh, the policy and its tokenizer, the
prompt iterator, the optimizer and the initial train state, the policies an iteration reads (current, reference,
lagged: `Policies`), the compiled train step, the algorithm (rollout strategy, estimator options, negative
control), the tools, the rollout engine (on the mesh, or each host's share of it) and the checkpointer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.core.candidates import candidate_token_table
from appo_jax.core.registry import CONTROLS
from appo_jax.data import encode_records, get_task, load_dataset
from appo_jax.models.loading import load_model, load_policy
from appo_jax.models.sharding import shard_params
from appo_jax.parallel.mesh import make_mesh
from appo_jax.parallel.placement import Placement
from appo_jax.rewards.registry import RecordReward
from appo_jax.rollout.decision_labels import DecisionLabeller
from appo_jax.rollout.engine import RolloutEngine, default_tools
from appo_jax.rollout.host_sharded import HostShardedEngine
from appo_jax.rollout.strategies import StrategyContext
from appo_jax.training.algorithms import AlgorithmSpec
from appo_jax.training.checkpoint import Checkpointer
from appo_jax.training.config import (ExperimentConfig, algorithm_spec, candidate_rule, resolve_mesh_shape,
                                      resolved_loss, rows_per_mini_batch, validate)
from appo_jax.training.learning_signals import signal_warnings
from appo_jax.training.policies import Policies
from appo_jax.training.prompt_iterator import PromptIterator
from appo_jax.training.state import TrainState, learning_rate_schedule, make_optimizer
from appo_jax.training.train_step import StepConfig, TrainStepRunner, init_train_state


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, unusable workdir, ...); the message says what is intact."""


@dataclass
class Run:
    """The built parts of a run (module doc); the train state is not one of them (the loop owns it)."""

    cfg: ExperimentConfig
    spec: AlgorithmSpec
    workdir: Path
    processes: int
    primary: bool
    task: Any  # the generated task of data.train (None for a dataset)
    records: list
    prompts: PromptIterator
    mesh: Any
    placement: Placement
    model_config: Any
    tokenizer: Any
    tx: Any
    lr_schedule: Callable
    shardings: Any
    policies: Policies
    runner: TrainStepRunner
    strategy: Any
    advantage_options: Any  # the estimator's frozen options dataclass (a jit static argument)
    control: Callable
    kl_coef: float
    tools: Any
    reward: RecordReward
    engine: Any  # RolloutEngine, or HostShardedEngine with several processes
    local_mesh: Any  # the sampler's mesh (this host's devices with several processes)
    checkpointer: Checkpointer
    warnings: list

    @property
    def ckpt_dir(self) -> Path:
        return self.workdir / "checkpoints"


def build_run(cfg: ExperimentConfig, *, workdir: str | None = None, resume: bool = False,
              log: Callable[[str], None] = print) -> tuple[Run, TrainState]:
    """``(Run, initial TrainState)`` of ``cfg`` (module doc)."""
    validate(cfg, jax.device_count())
    processes = jax.process_count()
    if cfg.train.prompts_per_step % processes:
        raise TrainingError(f"train.prompts_per_step={cfg.train.prompts_per_step} does not split over the "
                            f"{processes} processes of this job (each samples an equal block of prompts)")
    path = _workdir(workdir or cfg.workdir, resume)
    task = get_task(cfg.data.train)  # the data first: a missing dataset fails before minutes of model loading
    records = load_dataset(cfg.data.train, limit=cfg.data.limit or None, seed=cfg.data.seed,
                           data_dir=cfg.data.data_dir or None,
                           task_options=cfg.data.task_options if task is not None else None)
    mesh = _mesh(cfg, processes)
    placement = Placement(mesh)
    m, t, a = cfg.model, cfg.train, cfg.algorithm
    overrides = {"remat_policy": m.remat_policy} if m.remat_policy else {}
    model_config, params, tokenizer = load_policy(m.name, m.tokenizer, mesh, m.dtype or "float32",
                                                  m.param_dtype or None, init_seed=m.init_seed, **overrides)
    prompts, too_long = encode_records(records, tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                       system_prompt=cfg.data.system_prompt)
    if too_long:
        log(f"data: dropped {len(too_long)} prompts longer than rollout.max_prompt_len={cfg.rollout.max_prompt_len}")

    updates = t.steps * (t.prompts_per_step // t.mini_batch_prompts) * t.ppo_epochs
    tx, lr_schedule = make_optimizer(cfg.optimizer, updates), learning_rate_schedule(cfg.optimizer, updates)
    state, shardings = init_train_state(params, tx, t.seed, mesh=mesh, model_config=model_config)
    loss = resolved_loss(cfg)
    micro = t.micro_batch_rows or rows_per_mini_batch(cfg)
    need_reference = loss["kl_coef"] > 0 or a.omega_baseline == "reference" or cfg.logging.kl_to_start
    reference = _reference(cfg, params, mesh) if need_reference else None
    del params
    policies = Policies(model_config, placement, chunk=t.logprob_chunk, temperature=cfg.rollout.temperature,
                        micro_rows=micro, baseline=a.omega_baseline, lag=a.omega_lag, reference=reference)
    step_cfg = StepConfig.make(model_config, loss, mini_batches=t.prompts_per_step // t.mini_batch_prompts,
                               micro_batches=rows_per_mini_batch(cfg) // micro, epochs=t.ppo_epochs,
                               logprob_chunk=t.logprob_chunk, temperature=cfg.rollout.temperature)
    runner = TrainStepRunner(step_cfg, mesh=mesh, lr_schedule=lr_schedule, shardings=shardings)

    spec = algorithm_spec(cfg)
    labeller = DecisionLabeller(task, tokenizer) if task is not None and task.decision_spans else None
    table = jnp.asarray(_candidate_table(tokenizer, model_config.vocab_size, candidate_rule(a)))
    strategy = spec.strategy(a, StrategyContext(table=table, logprobs=policies.current_and_baseline,
                                                place=placement.tree, to_host=placement.host, labeller=labeller))
    tools = default_tools(cfg.rollout, (task.search_backend, task.backend_kwargs(cfg.data.task_options))
                          if task is not None and task.search_backend else None)
    # the sampler holds the prompt length and slots of this dataset (this host's share), not the maxima
    rollout_cfg = cfg.rollout.fitted(prompts, t.prompts_per_step // processes * strategy.rollouts_per_prompt)
    reward = RecordReward(cfg.data.reward)
    engine, local_mesh = _engine(cfg, model_config, state.params, tokenizer, tools, rollout_cfg, reward, mesh,
                                 placement, processes)
    warnings = signal_warnings(cfg, strategy.rollouts_per_prompt, records, reward)
    for warning in warnings:
        log(f"warning: {warning}")
    run = Run(cfg=cfg, spec=spec, workdir=path, processes=processes, primary=jax.process_index() == 0, task=task,
              records=records, prompts=PromptIterator(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle),
              mesh=mesh, placement=placement, model_config=model_config, tokenizer=tokenizer, tx=tx,
              lr_schedule=lr_schedule, shardings=shardings, policies=policies, runner=runner, strategy=strategy,
              advantage_options=spec.advantage_options(a), control=CONTROLS.get(a.control),
              kl_coef=loss["kl_coef"], tools=tools, reward=reward, engine=engine, local_mesh=local_mesh,
              checkpointer=Checkpointer(path / "checkpoints", keep=cfg.checkpoint.keep,
                                        async_save=cfg.checkpoint.async_save),
              warnings=warnings)
    return run, state


def _workdir(workdir: str, resume: bool) -> Path:
    """The absolute workdir, created; refused when it is a URL or holds checkpoints without ``resume``."""
    if "://" in str(workdir):
        raise TrainingError(f"workdir {str(workdir)!r} is a URL; the trainer writes through the file system: mount "
                            "the bucket (gcsfuse) or shared storage at the same path on every process and give that "
                            "path")
    path = Path(workdir).absolute()
    ckpt = path / "checkpoints"
    existing = sorted(p.name for p in ckpt.glob("[0-9]*")) if ckpt.is_dir() else []
    if existing and not resume:
        raise TrainingError(f"workdir {str(path)!r} already has checkpoints {existing}; pass --resume to continue "
                            "that run or choose another --workdir (nothing was changed)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _mesh(cfg: ExperimentConfig, processes: int):
    """None for one device (plain jit on the default device), else a mesh over the first devices."""
    data, fsdp, tensor = resolve_mesh_shape(cfg, jax.device_count())
    size = data * fsdp * tensor
    if processes > 1 and size != jax.device_count():
        raise TrainingError(f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} = {size} does not cover the "
                            f"{jax.device_count()} devices of the {processes} processes; with several processes the "
                            "mesh spans every device (use -1 for one axis)")
    if size == 1:
        return None
    devices = jax.devices()
    return make_mesh(data, fsdp, tensor, devices=None if size == len(devices) else devices[:size])


def _reference(cfg: ExperimentConfig, params, mesh):
    """The reference policy: ``model.reference`` loaded, or the initial policy itself (the state holds a copy)."""
    m = cfg.model
    if not m.reference:
        return params
    _, ref, _ = load_model(m.reference, mesh, m.dtype or "float32", m.param_dtype or None)
    if jax.tree.structure(ref) != jax.tree.structure(params) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params))):
        raise ValueError(f"model.reference={m.reference!r} does not have the policy's parameter shapes")
    return ref


@functools.lru_cache(maxsize=8)
def _candidate_table(tokenizer, vocab_size: int, rule: str) -> np.ndarray:
    """The branch-candidate table of the tokenizer under ``rule`` (`candidate_rule`), padded with False up to
    the model's vocabulary size."""
    table = candidate_token_table(tokenizer, rule)
    if table.size < vocab_size:
        table = np.concatenate([table, np.zeros(vocab_size - table.size, bool)])
    return table[:vocab_size]


def _engine(cfg, model_config, params, tokenizer, tools, rollout_cfg, reward, mesh, placement, processes):
    """``(engine, sampler mesh)``: on the run's mesh for one process; with several processes each samples its
    block of prompts on a sampler over its own devices (`HostShardedEngine`, docs/multihost.md)."""
    if processes == 1:
        return RolloutEngine(model_config, params, tokenizer, tools, rollout_cfg, mesh=mesh, reward_fn=reward), mesh
    local = jax.local_devices()
    _, fsdp, tensor = resolve_mesh_shape(cfg, jax.device_count())
    if len(local) % (fsdp * tensor):
        raise TrainingError(f"each host samples with a full copy of the policy on its {len(local)} devices, which "
                            f"mesh.fsdp x mesh.tensor = {fsdp} x {tensor} does not divide")
    local_mesh = None if len(local) == 1 else make_mesh(len(local) // (fsdp * tensor), fsdp, tensor, devices=local)

    def place(host_params):
        if local_mesh is None:
            return jax.device_put(host_params, local[0])
        return shard_params(host_params, local_mesh, model_config)

    host_params = place(placement.host(params))
    inner = RolloutEngine(model_config, host_params, tokenizer, tools, rollout_cfg, mesh=local_mesh, reward_fn=reward)
    return HostShardedEngine(inner, jax.process_index(), processes, place, host_params), local_mesh
