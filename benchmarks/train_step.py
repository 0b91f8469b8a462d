"""Train-step speed and the per-phase time of one APPO iteration. Prints one JSON object as the last line.

    python benchmarks/train_step.py                 # CPU: SmolLM2-135M train tokens/s + one APPO iteration
    python benchmarks/train_step.py --mfu           # accelerator: MFU of the train step, 0.5B random init

1. ``train_tokens_per_s``: the jitted train step (future-KL loss, AdamW, one mini-batch) of SmolLM2-135M
   (random init of the preset; speed does not depend on the weights) on ``--rows`` rows of ``--prompt-len`` +
   ``--response-len`` tokens; compile excluded, median of ``--repeats`` steps; tokens = rows x (P + L).
2. ``appo_iteration``: the demo setup (SmolLM2-135M-Instruct, toy arithmetic with the python tool, 2 prompts x
   (4 initial + 4 branch) rollouts) run for two iterations without SFT; the seconds per phase of the second
   (compiled) iteration: rollout, log-probs, branching, branch rollouts, advantages, update.
3. ``--mfu`` (GPU / TPU): model FLOPs utilisation of the train step for ``--mfu-model`` (default qwen2.5-0.5b,
   bf16 compute, fp32 params, full remat) on ``--mfu-rows`` rows of ``--mfu-prompt-len`` + ``--mfu-response-len``
   (1024 + 3072) tokens: 6 N + 12 L T d flops per trained token (N non-embedding + lm-head params; the attention
   term uses the context length T) against the device peak (``--peak-tflops``, or a table of known devices).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0,
                    "TPU v5 lite": 197.0, "TPU v6 lite": 918.0}


def _batch(rows: int, p: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return dict(prompt_tokens=rng.integers(3, vocab, (rows, p)).astype(np.int32), prompt_mask=np.ones((rows, p), bool),
                tokens=rng.integers(3, vocab, (rows, length)).astype(np.int32),
                response_mask=np.ones((rows, length), bool), loss_mask=np.ones((rows, length), bool),
                old_logp=np.full((rows, length), -np.log(vocab), np.float32),
                advantages=rng.normal(size=(rows, length)).astype(np.float32))


def time_train_step(config, rows: int, p: int, length: int, repeats: int, micro: int = 1, chunk: int = 256):
    """(median seconds per step, compile seconds) of the jitted train step."""
    from appo_jax.models.decoder import init_params
    from appo_jax.training.config import OptimizerSection
    from appo_jax.training.batch import TrainBatch
    from appo_jax.training.state import create_train_state, make_optimizer
    from appo_jax.training.train_step import StepConfig, train_step_fn

    params = jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    state = jax.jit(lambda p_: create_train_state(p_, make_optimizer(OptimizerSection(lr=1e-6), 100)))(params)
    del params
    cfg = StepConfig.make(config, dict(mode="future_kl", kl_coef=0.0), micro_batches=micro, logprob_chunk=chunk)
    step = jax.jit(train_step_fn(cfg), donate_argnums=0)
    batch = TrainBatch(**{k: jnp.asarray(v) for k, v in _batch(rows, p, length, config.vocab_size).items()})
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


def appo_iteration_breakdown() -> dict:
    """Phase times of the second of two demo-setup APPO iterations (no SFT)."""
    import os

    from appo_jax.training.config import load_config
    from appo_jax.training.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "experiments", "demo_smollm2.py"))
    cfg.sft.steps, cfg.train.steps, cfg.logging.progress = 0, 2, False
    cfg.logging.dump_rollouts_every, cfg.checkpoint.every = 0, 0
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, workdir=workdir, log=lambda _: None)
        try:
            first = trainer.train_iteration()
            second = trainer.train_iteration()
        finally:
            trainer.close()
    phases = {k.split("/", 1)[1]: round(v, 3) for k, v in second.items() if k.startswith("time/")}
    return {"phases_s": phases, "first_iteration_s_incl_compile": round(first["time/step_s"], 2),
            "generated_tokens": second["response/generated_tokens"] * second["rollouts/count"],
            "rollout_tokens_per_s": round(second["throughput/rollout_tokens_per_s"], 1),
            "train_tokens_per_s": round(second["throughput/train_tokens_per_s"], 1)}


def mfu(model: str, rows: int, p: int, length: int, repeats: int, micro: int, peak_tflops: float | None) -> dict:
    from appo_jax.models.presets import get_config
    config = get_config(model, dtype="bfloat16", param_dtype="float32", remat_policy="full")
    sec, compile_s = time_train_step(config, rows, p, length, repeats, micro, chunk=512)
    t = p + length
    d, layers = config.hidden_size, config.num_layers
    n = config.num_params() - config.vocab_size * d * (1 if not config.tie_word_embeddings else 0)
    # 6 N per token for the matmuls (embedding lookup excluded, lm head included) + causal attention 6 L T d
    flops_per_token = 6 * n + 6 * layers * t * d
    achieved = rows * t * flops_per_token / sec
    kind = jax.devices()[0].device_kind
    peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)
    return {"model": model, "device": kind, "step_s": round(sec, 4), "compile_s": round(compile_s, 1),
            "tokens_per_s": round(rows * t / sec, 1), "achieved_tflops": round(achieved / 1e12, 2),
            "peak_tflops": peak, "mfu": None if not peak else round(achieved / (peak * 1e12), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-iteration", action="store_true", help="only the train-step throughput")
    ap.add_argument("--mfu", action="store_true", help="accelerator MFU of the train step instead")
    ap.add_argument("--mfu-model", default="qwen2.5-0.5b")
    ap.add_argument("--mfu-rows", type=int, default=16)
    ap.add_argument("--mfu-micro", type=int, default=1)
    ap.add_argument("--mfu-prompt-len", type=int, default=1024)
    ap.add_argument("--mfu-response-len", type=int, default=3072)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    out = {"backend": jax.default_backend(), "devices": jax.device_count()}
    if args.mfu:
        out["mfu"] = mfu(args.mfu_model, args.mfu_rows, args.mfu_prompt_len, args.mfu_response_len, args.repeats,
                         args.mfu_micro, args.peak_tflops)
        print(json.dumps(out))
        return
    from appo_jax.models.presets import get_config
    config = get_config("smollm2-135m")
    sec, compile_s = time_train_step(config, args.rows, args.prompt_len, args.response_len, args.repeats)
    tokens = args.rows * (args.prompt_len + args.response_len)
    out["smollm2_135m_train_step"] = {"rows": args.rows, "prompt_len": args.prompt_len,
                                      "response_len": args.response_len, "step_s": round(sec, 3),
                                      "compile_s": round(compile_s, 1), "train_tokens_per_s": round(tokens / sec, 1)}
    print(f"SmolLM2-135M train step: {tokens / sec:.1f} tokens/s ({sec:.2f} s per step of {tokens} tokens)",
          flush=True)
    if not args.skip_iteration:
        out["appo_iteration"] = appo_iteration_breakdown()
        print("APPO iteration phases (s):", out["appo_iteration"]["phases_s"], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
