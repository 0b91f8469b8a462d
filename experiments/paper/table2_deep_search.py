"""Table 2 of the APPO paper: deep search (GAIA, WebWalkerQA, HLE, xbench), official-script hyperparameters
(docs/algorithm.md §1.8).

    appo-jax train --config experiments/paper/table2_deep_search.py:qwen3-8b,appo

The argument selects a row: ``<backbone>,<method>``. Backbones: ``qwen3-8b`` and ``qwen3-14b`` (Qwen3-8B / Qwen3-14B
from ``$APPO_MODELS/<HF repo name>``, default ``~/models``); methods: ``grpo``, ``arpo``, ``appo``. Training
data: the 1k hard-search RL set, 6 tool calls per rollout; the 8B and 14B official scripts differ in batch and
lengths (below).
"""
import os

from appo_jax.training.config import ConfigError, ExperimentConfig

#: backbone -> (HF repo, prompts per step, mini-batch prompts, max prompt, max response, n, n_init)
BACKBONES = {"qwen3-8b": ("Qwen3-8B", 128, 16, 2000, 10000, 16, 8),
             "qwen3-14b": ("Qwen3-14B", 64, 8, 2000, 6192, 12, 6)}
METHODS = ("grpo", "arpo", "appo")
ROWS = tuple(f"{b},{m}" for b in BACKBONES for m in METHODS)


def get_config(arg: str = "qwen3-8b,appo") -> ExperimentConfig:
    backbone, _, method = arg.partition(",")
    if backbone not in BACKBONES or method not in METHODS:
        raise ConfigError(f"table2_deep_search row {arg!r}; expected <backbone>,<method> with backbone in "
                          f"{', '.join(BACKBONES)} and method in {', '.join(METHODS)}")
    repo, prompts, mini, prompt_len, response_len, n, n_init = BACKBONES[backbone]
    c = ExperimentConfig(name=f"table2-{backbone}-{method}", workdir=f"runs/table2/{backbone}-{method}")

    c.model.name = os.path.join(os.path.expanduser(os.environ.get("APPO_MODELS", "~/models")), repo)
    c.model.dtype, c.model.param_dtype, c.model.remat_policy = "bfloat16", "float32", "full"

    # Data: the hard-search set (QA, arpo_f1 reward); search is the main tool.
    c.data.train, c.data.reward, c.data.shuffle = "hard_search_1k", "auto", True

    r = c.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit = prompt_len, response_len, 6
    r.temperature, r.top_p, r.top_k = 1.0, 1.0, 0
    r.num_slots, r.decode_chunk, r.tool_workers, r.tool_timeout_s = 256, 64, 32, 30.0

    a = c.algorithm
    a.name, a.n, a.n_init = method, n, n_init
    a.omega_baseline, a.omega_gamma, a.omega_clip, a.reward_scale_discount = "sampler", 1.0, 0.2, 0.9

    c.loss.kl_coef, c.loss.kl_kind, c.loss.agg = 0.001, "low_var_kl", "token-mean"
    c.loss.decay_rate, c.loss.fkl_clip, c.loss.fkl_high_only, c.loss.fkl_weight = 64.0, 0.2, True, 1.0

    c.optimizer.lr, c.optimizer.schedule, c.optimizer.weight_decay, c.optimizer.grad_clip = 1e-6, "constant", 0.01, 1.0
    t = c.train
    t.steps, t.prompts_per_step, t.mini_batch_prompts, t.ppo_epochs = 40, prompts, mini, 1
    t.micro_batch_rows, t.logprob_chunk = 16, 1024

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every, c.checkpoint.keep = 10, 3
    lg = c.logging
    lg.dump_rollouts_every, lg.eval_every, lg.eval_runs = 10, 20, 5
    lg.eval_benchmarks = "gaia,webwalker,hle,xbench"
    return c
