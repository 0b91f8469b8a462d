"""The paper's training setups with the official hyperparameters (docs/algorithm.md §1.8), for the experiment files.

    paper_config(setup, algorithm) -> ExperimentConfig

setups: ``qwen2.5-7b-reasoning`` (Qwen2.5-7B-Instruct on train_10k, tool-call limit 3), ``llama3.1-8b-reasoning``
(Llama-3.1-8B-Instruct on train_10k) and ``qwen3-8b-deep-search`` (Qwen3-8B on hard_search_1k, tool-call limit 6).
Shared: lr 1e-6 constant, AdamW wd 0.01, grad-clip 1.0; 96 prompts x n = 16 rollouts (APPO: 8 initial + 8
branches), PPO mini-batch 16 prompts, 1 epoch; prompt 2048 / response 6144 tokens; rollout temperature 1.0,
top_p 1.0; KL 0.001 (low_var_kl); bf16 compute with fp32 parameters, full remat; FSDP over every device.

Weights: ``model.name`` defaults to ``$APPO_MODELS/<HF repo name>`` (``APPO_MODELS`` defaults to
``~/models``): download the HF checkpoint there or pass ``--set model.name=/path/to/dir``.
"""
from __future__ import annotations

import os

from appo_jax.training.config import ALGORITHMS, ConfigError, ExperimentConfig

SETUPS = {
    "qwen2.5-7b-reasoning": dict(repo="Qwen2.5-7B-Instruct", data="train_10k", tool_call_limit=3),
    "llama3.1-8b-reasoning": dict(repo="Llama-3.1-8B-Instruct", data="train_10k", tool_call_limit=3),
    "qwen3-8b-deep-search": dict(repo="Qwen3-8B", data="hard_search_1k", tool_call_limit=6),
}


def paper_config(setup: str, algorithm: str) -> ExperimentConfig:
    """The official-hyperparameter config of ``setup`` trained with ``algorithm`` (module doc)."""
    if setup not in SETUPS:
        raise ConfigError(f"unknown paper setup {setup!r}; known: {', '.join(SETUPS)}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; known algorithms: {', '.join(ALGORITHMS)}")
    s = SETUPS[setup]
    cfg = ExperimentConfig(name=f"{setup}-{algorithm}", workdir=f"runs/{setup}-{algorithm}")
    cfg.model.name = os.path.join(os.environ.get("APPO_MODELS", os.path.expanduser("~/models")), s["repo"])
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat_policy = "bfloat16", "float32", "full"
    cfg.data.train = s["data"]
    r = cfg.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit = 2048, 6144, s["tool_call_limit"]
    r.temperature, r.top_p, r.top_k = 1.0, 1.0, 0
    r.num_slots, r.decode_chunk, r.tool_workers, r.tool_timeout_s = 256, 64, 32, 30.0
    a = cfg.algorithm
    a.name, a.n, a.n_init = algorithm, 16, 8
    cfg.optimizer.lr, cfg.optimizer.schedule, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip = (
        1e-6, "constant", 0.01, 1.0)
    t = cfg.train
    t.steps, t.prompts_per_step, t.mini_batch_prompts, t.ppo_epochs = 300, 96, 16, 1
    t.micro_batch_rows, t.logprob_chunk = 64, 1024
    cfg.loss.kl_coef, cfg.loss.kl_kind, cfg.loss.agg = 0.001, "low_var_kl", "token-mean"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.checkpoint.every, cfg.checkpoint.keep = 20, 3
    cfg.logging.dump_rollouts_every, cfg.logging.eval_every = 20, 50
    cfg.logging.eval_benchmarks = ("hotpotqa,2wiki,musique,bamboogle" if "search" in setup
                                   else "aime24,math500,gsm8k,hotpotqa")
    cfg.logging.eval_runs = 5
    return cfg
