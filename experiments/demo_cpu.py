"""CPU demo (``make demo``): APPO visibly improves a small policy on a tool-use task, in minutes on 2 cores.

The task is ``arith_program`` (docs/mini_reproduction.md): compose a one- or two-step arithmetic program into one
``<python>`` expression, run it, box the result. The policy is the ``mini-tasks`` preset (a 0.4M-parameter
decoder with the shipped 512-token tokenizer), trained from scratch by cold-start SFT on demonstrations from a
teacher that is often wrong in a systematic way: 70% of its demonstrations write "Subtract it from y" as
``x - y`` (``order_confusion``) and 20% take one random wrong decision. The SFT policy therefore answers about half
of the held-out questions right, and the ones with "subtract it from" mostly wrong, greedy or sampled. APPO then
learns from the outcome reward alone (math equivalence of the boxed answer) which order is right.

It prints held-out accuracy (200 questions never trained on, greedy and at the training temperature) before and
after RL with binomial 95% intervals, says whether each moved beyond noise, and writes the learning curve to
``RUN_DIR/learning_curve.png`` (with metrics.jsonl, TensorBoard events, checkpoints and HTML rollout dumps).
``experiments/demo_smollm2.py`` is the same pipeline on SmolLM2-135M-Instruct.
"""
from appo_jax.training.config import ExperimentConfig

TASK_OPTIONS = {"steps": (1, 2), "max_operand": 9, "wrong_fraction": 0.2, "order_confusion": 0.7}


def get_config() -> ExperimentConfig:
    c = ExperimentConfig(name="demo_cpu", workdir="runs/demo_cpu")
    c.model.name, c.model.tokenizer = "mini-tasks", "mini-tasks"
    d = c.data
    d.train, d.limit, d.seed, d.reward, d.task_options = "arith_program:train", 2000, 1, "auto", dict(TASK_OPTIONS)
    r = c.rollout
    r.max_prompt_len, r.max_response_len, r.tool_call_limit = 96, 64, 4
    r.temperature, r.top_p = 1.0, 1.0
    # 32 slots: the training batch (8 prompts x 4 initial rollouts) and the evaluation waves share the sampler's
    # compiled programs (the first run compiles about a third less)
    r.decode_chunk, r.tool_workers, r.tool_timeout_s, r.num_slots = 16, 4, 10.0, 32
    a = c.algorithm
    a.name, a.n, a.n_init, a.omega_baseline = "appo", 8, 4, "lagged"
    t = c.train
    t.steps, t.prompts_per_step, t.mini_batch_prompts, t.ppo_epochs, t.logprob_chunk, t.seed = 16, 8, 4, 1, 256, 1
    c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.grad_clip = 3e-4, 0.0, 1.0
    c.loss.kl_coef = 0.0
    s = c.sft
    s.steps, s.data, s.examples, s.batch_size, s.lr, s.seed, s.max_response_len = 1000, "arith_program", 1024, 16, 1e-3, 0, 64
    c.mesh.data = 1
    c.checkpoint.every, c.checkpoint.keep = 8, 2
    lg = c.logging
    lg.eval_every, lg.eval_benchmarks, lg.eval_limit, lg.eval_modes = 8, "arith_program:heldout", 200, "greedy,train"
    lg.dump_rollouts_every = 8
    return c
