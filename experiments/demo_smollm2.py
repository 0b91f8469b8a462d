"""SmolLM2-135M-Instruct on a small tool-use task with cold-start SFT + APPO (the real small model, on CPU).

    appo-jax train --config experiments/demo_smollm2.py

(``make demo`` runs experiments/demo_cpu.py instead: a tiny policy in a regime where RL visibly learns. This run
shows the whole pipeline on a real model; in a few iterations its reward does not move beyond noise.)

Task: integer arithmetic questions ("What is 37 * 12?") answered through the python tool, rewarded with the ARPO
math reward (format check, then math equivalence of the boxed answer). A few SFT steps on tool-use traces teach
the protocol (<think>, <python>, <result>, <answer>\\boxed{}); then APPO iterations sample 4 initial rollouts per
prompt, branch 4 more at the highest Branching Scores, and update the policy. Sized to finish in a few minutes on
2 CPU cores; outputs (metrics.jsonl, TensorBoard events, checkpoints, HTML rollout dumps) go to runs/demo_smollm2.
"""
from appo_jax.training.config import ExperimentConfig


def get_config() -> ExperimentConfig:
    c = ExperimentConfig(name="demo_smollm2", workdir="runs/demo_smollm2")
    c.model.name = "smollm2-135m-instruct"
    c.data.train, c.data.limit, c.data.reward = "toy_arithmetic", 32, "auto"
    r = c.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit = 80, 96, 2
    r.temperature, r.top_p = 1.0, 1.0
    r.decode_chunk, r.tool_workers, r.tool_timeout_s = 16, 4, 10.0
    a = c.algorithm
    a.name, a.n, a.n_init, a.omega_baseline = "appo", 8, 4, "lagged"
    t = c.train
    t.steps, t.prompts_per_step, t.mini_batch_prompts, t.ppo_epochs, t.logprob_chunk = 6, 2, 2, 1, 64
    c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.grad_clip = 1e-5, 0.01, 1.0
    c.loss.kl_coef = 0.0  # no reference forward: saves a third of the log-prob time on CPU
    s = c.sft
    s.steps, s.data, s.examples, s.batch_size, s.lr, s.max_response_len = 4, "toy_arithmetic", 32, 4, 1e-4, 96
    c.mesh.data = 1  # one device: what a CPU machine has (the batch of 2 prompts would not split over more)
    c.checkpoint.every, c.checkpoint.keep = 3, 2
    c.logging.dump_rollouts_every = 3
    return c
