"""The mini reproduction (docs/mini_reproduction.md): every method at one rollout budget on tasks with known
decision points, a policy small enough for 2 CPU cores.

    appo-jax train --config experiments/mini/config.py:appo,kb_multihop,1

The argument is ``METHOD,TASK,SEED``. Every method shares everything below except its algorithm: the same task
and difficulty (the learning regime of docs/learning.md: a teacher whose demonstrations are systematically wrong
in 70% of cases), the same cold-start SFT policy (one per task, SFT seed 0, cached in ``runs/mini/sft``; the run's
seed then drives the RL sampling, prompt order and updates), 8 rollouts per prompt, 8 prompts per step, 30 RL
steps, AdamW lr 1e-4 without KL (the sweep and the seeds of docs/learning.md: at 3e-4 one seed in three fell), and
the same held-out evaluation (128 questions, greedy and at the training temperature, before RL and every 5
steps). Branching methods spend their budget of 8 as 4 initial rollouts + 4 branches (APPO and its variants,
ARPO / AEPO / Tree-GRPO grow their trees to 8).

``SCALE=smollm2`` (environment) runs the same grid with SmolLM2-135M-Instruct and its tokenizer (an accelerator
run; the tiny model is what the CPU grid uses).
"""
import os

from appo_jax.training.config import ConfigError, ExperimentConfig, set_value
from appo_jax.training.fidelity import OFFICIAL

#: method -> (algorithm name, {dotted config key: value} beyond the algorithm)
METHODS = {
    "grpo": ("grpo", {}),
    # the negative control: GRPO with the rewards permuted inside each prompt group (no signal; must not learn)
    "grpo_permuted": ("grpo", {"algorithm.control": "permute_rewards"}),
    "dapo": ("dapo", {}),
    "reinforce_pp": ("reinforce_pp", {}),
    "gppo": ("gppo", {}),
    "cispo": ("cispo", {}),
    "gigpo": ("gigpo", {}),
    "arpo": ("arpo", {}),
    "aepo": ("aepo", {}),
    "tree_grpo": ("tree_grpo", {}),
    "appo": ("appo", {}),
    "appo_entropy_only": ("appo_entropy_only", {}),
    "appo_omega_only": ("appo_omega_only", {}),
    "appo_no_prefix_credit": ("appo_no_prefix_credit", {}),
    "appo_no_procedure_scaling": ("appo_no_procedure_scaling", {}),
    # the procedure-level scale M applied to the advantages (A_t * M_t) instead of the official reward mode, which
    # scales R by M at the last token, where M = 1 (docs/algorithm.md §1.5): the variant in which M acts
    "appo_advantage_scaling": ("appo", {"algorithm.procedure_scaling": "advantage"}),
    "appo_no_future_kl": ("appo_no_future_kl", {}),
    "appo_sampler": ("appo", {"algorithm.omega_baseline": "sampler"}),
    "appo_reference": ("appo", {"algorithm.omega_baseline": "reference"}),
    "appo_oracle": ("appo_oracle", {}),
    # APPO with the official implementation's Branching Score (docs/official_differences.md)
    "appo_official": ("appo", dict(OFFICIAL)),
    # APPO with the official candidate rule alone (only whitespace-only tokens excluded: operators can branch)
    "appo_ws_candidates": ("appo", {"algorithm.candidate_rule": "official"}),
}
TASKS = {
    # 1-2 hops, 2 distractor pages per search; SFT teacher: 20% of its traces take one random wrong decision and
    # 70% resolve the relations in the order the question writes them (outermost first: wrong for 2 hops)
    "kb_multihop": {"hops": (1, 2), "distractors": 2, "entities": 24, "relations": 4, "wrong_fraction": 0.2,
                    "order_confusion": 0.7},
    # 1-2 operations; SFT teacher: 20% one random wrong decision, 70% write "subtract it from y" as x - y
    "arith_program": {"steps": (1, 2), "max_operand": 9, "wrong_fraction": 0.2, "order_confusion": 0.7},
}
RESPONSE_LEN = {"kb_multihop": 192, "arith_program": 64}


def get_config(arg: str = "appo,kb_multihop,1") -> ExperimentConfig:
    parts = arg.split(",")
    if len(parts) != 3 or parts[0] not in METHODS or parts[1] not in TASKS or not parts[2].isdigit():
        raise ConfigError(f"mini config argument {arg!r}: expected METHOD,TASK,SEED with METHOD in "
                          f"{', '.join(METHODS)} and TASK in {', '.join(TASKS)}")
    method, task, seed = parts[0], parts[1], int(parts[2])
    algorithm, extra = METHODS[method]
    c = ExperimentConfig(name=f"mini-{method}-{task}-{seed}", workdir=f"runs/mini/{task}/{method}/seed{seed}")

    if os.environ.get("SCALE") == "smollm2":
        c.model.name = "smollm2-135m-instruct"
    else:
        c.model.name, c.model.tokenizer = "mini-tasks", "mini-tasks"

    d = c.data
    d.train, d.limit, d.seed, d.reward = f"{task}:train", 2000, seed, "auto"
    d.task_options = dict(TASKS[task])

    r = c.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit = 96, RESPONSE_LEN[task], 4
    r.temperature, r.top_p = 1.0, 1.0
    r.decode_chunk, r.tool_workers, r.tool_timeout_s = 16, 4, 10.0

    a = c.algorithm
    a.name, a.n, a.n_init = algorithm, 8, 4
    a.omega_baseline = "lagged"
    for key, value in extra.items():
        set_value(c, key, str(value))

    t = c.train
    t.steps, t.prompts_per_step, t.mini_batch_prompts, t.ppo_epochs, t.logprob_chunk = 30, 8, 4, 1, 256
    t.seed = seed
    c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.grad_clip = 1e-4, 0.0, 1.0
    c.loss.kl_coef = 0.0

    s = c.sft
    s.steps, s.data, s.examples, s.batch_size, s.lr, s.seed = 2000, task, 2048, 16, 1e-3, 0
    s.max_response_len, s.cache_dir = RESPONSE_LEN[task], "runs/mini/sft"

    c.mesh.data = 1
    c.checkpoint.every, c.checkpoint.keep, c.checkpoint.async_save = 0, 1, False
    lg = c.logging
    lg.tensorboard, lg.eval_every, lg.eval_benchmarks = False, 5, f"{task}:heldout"
    lg.eval_limit, lg.eval_runs, lg.eval_modes = 128, 1, "greedy,train"
    return c
