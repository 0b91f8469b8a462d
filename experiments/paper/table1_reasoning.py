"""Table 1 of the APPO paper: tool-integrated deep reasoning, official-script hyperparameters
(docs/algorithm.md §1.8).

    appo-jax train --config experiments/paper/table1_reasoning.py:qwen2.5-7b,appo

The argument selects a row: ``<backbone>,<method>``. Backbones: ``qwen2.5-7b`` (Qwen2.5-7B-Instruct) and
``llama3.1-8b`` (Llama-3.1-8B-Instruct), read from ``$APPO_MODELS/<HF repo name>`` (default ``~/models``) or
``--set model.name=/path``. Methods: ``grpo``, ``reinforce_pp``, ``dapo``, ``gppo``, ``cispo``, ``gigpo``,
``arpo``, ``appo`` (the RL methods the paper compares in Table 1). Every method runs with the same budget: 96
prompts per step and 16 rollouts per prompt (APPO and ARPO: 8 initial), on the 10k mixed math + QA RL set with
python and search tools.
"""
import os

from appo_jax.training.config import ConfigError, ExperimentConfig

BACKBONES = {"qwen2.5-7b": "Qwen2.5-7B-Instruct", "llama3.1-8b": "Llama-3.1-8B-Instruct"}
METHODS = ("grpo", "reinforce_pp", "dapo", "gppo", "cispo", "gigpo", "arpo", "appo")
ROWS = tuple(f"{b},{m}" for b in BACKBONES for m in METHODS)


def get_config(arg: str = "qwen2.5-7b,appo") -> ExperimentConfig:
    backbone, _, method = arg.partition(",")
    if backbone not in BACKBONES or method not in METHODS:
        raise ConfigError(f"table1_reasoning row {arg!r}; expected <backbone>,<method> with backbone in "
                          f"{', '.join(BACKBONES)} and method in {', '.join(METHODS)}")
    c = ExperimentConfig(name=f"table1-{backbone}-{method}", workdir=f"runs/table1/{backbone}-{method}")

    # The policy: bf16 compute, fp32 master weights, every layer rematerialised.
    c.model.name = os.path.join(os.path.expanduser(os.environ.get("APPO_MODELS", "~/models")), BACKBONES[backbone])
    c.model.dtype, c.model.param_dtype, c.model.remat_policy = "bfloat16", "float32", "full"

    # Data: 5k math + 5k QA questions with the tool system prompt; the ability picks the reward (arpo_math / arpo_f1).
    c.data.train, c.data.reward, c.data.shuffle = "train_10k", "auto", True

    # Rollouts: prompt 2048 / response 6144 tokens, 3 tool calls, plain sampling at temperature 1.
    r = c.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit = 2048, 6144, 3
    r.temperature, r.top_p, r.top_k = 1.0, 1.0, 0
    r.num_slots, r.decode_chunk, r.tool_workers, r.tool_timeout_s = 256, 64, 32, 30.0

    # The algorithm: 16 rollouts per prompt; APPO branches 8 of them from the initial 8.
    a = c.algorithm
    a.name, a.n, a.n_init = method, 16, 8
    a.omega_baseline, a.omega_gamma, a.omega_clip, a.reward_scale_discount = "sampler", 1.0, 0.2, 0.9

    # Loss: the algorithm's mode and clip-high; low_var_kl to the reference at 0.001; token-mean.
    c.loss.kl_coef, c.loss.kl_kind, c.loss.agg = 0.001, "low_var_kl", "token-mean"
    c.loss.decay_rate, c.loss.fkl_clip, c.loss.fkl_high_only, c.loss.fkl_weight = 64.0, 0.2, True, 1.0

    # Optimisation: AdamW lr 1e-6 constant, wd 0.01, grad-clip 1.0; 96 prompts per step in 6 mini-batches of 16.
    c.optimizer.lr, c.optimizer.schedule, c.optimizer.weight_decay, c.optimizer.grad_clip = 1e-6, "constant", 0.01, 1.0
    t = c.train
    t.steps, t.prompts_per_step, t.mini_batch_prompts, t.ppo_epochs = 300, 96, 16, 1
    t.micro_batch_rows, t.logprob_chunk = 64, 1024

    # FSDP over every device; checkpoints every 20 steps; pass@1 over 5 runs every 50 steps.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every, c.checkpoint.keep = 20, 3
    lg = c.logging
    lg.dump_rollouts_every, lg.eval_every, lg.eval_runs = 20, 50, 5
    lg.eval_benchmarks = "aime24,math500,gsm8k,hotpotqa"
    return c
