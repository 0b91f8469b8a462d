"""Timing of the jitted sampler (used by `appo-jax bench sampler` and benchmarks/sampler.py).

One measurement = ``start`` (batched prefill of ``batch`` prompts of ``prompt_len`` random token ids) then
``decode`` of exactly ``new_tokens`` tokens per row (EOS disabled, no stop strings), each timed to completion
(``block_until_ready`` / host arrays). The first run compiles; ``compile_s`` is the tracing + lowering + XLA
compile time JAX reports (`jax.monitoring` duration events "/jax/core/compile/*") during the benchmark.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.monitoring
import numpy as np

from appo_jax.models.config import ModelConfig
from appo_jax.rollout.sampler import Sampler, cache_len_for
from appo_jax.rollout.sampling import SamplingParams


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``prompt_len`` token ids drawn uniformly from [3, vocab_size) (fixed seed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(batch, prompt_len)).tolist()


def measure_sampler(config: ModelConfig, params, *, batch: int, new_tokens: int, prompt_len: int = 32,
                    sampling: SamplingParams = SamplingParams(), runs: int = 3, decode_chunk: int = 32,
                    prompts: list[list[int]] | None = None, after_each_run: Callable[[], None] | None = None) -> dict:
    """Median decode / prefill throughput over ``runs`` steady runs (module doc). Returns a JSON-able dict:
    tokens_per_s (generated tokens / decode seconds), prefill_tokens_per_s (prompt tokens / prefill seconds),
    compile_s, decode_s, prefill_s, and the settings. ``after_each_run`` is called after every run (the compiling
    one included), e.g. to interleave a baseline's runs so both see the same machine load."""
    if batch < 1 or new_tokens < 1 or prompt_len < 1 or runs < 1:
        raise ValueError(f"bench needs batch, new_tokens, prompt_len, runs >= 1; got {batch}, {new_tokens}, "
                         f"{prompt_len}, {runs}")
    prompts = prompts or random_prompts(config.vocab_size, batch, prompt_len)
    sampler = Sampler(config, params, num_slots=batch, max_len=cache_len_for([len(p) for p in prompts], new_tokens),
                      sampling=sampling, eos_token_ids=(), decode_chunk=decode_chunk)
    slots = list(range(batch))
    keys = [jax.random.key(i) for i in slots]
    active = np.ones(batch, bool)

    def one_run() -> tuple[float, float]:
        t0 = time.perf_counter()
        sampler.start(slots, prompts, keys)
        jax.block_until_ready(sampler.cache)
        t1 = time.perf_counter()
        out = sampler.decode(active, new_tokens)
        t2 = time.perf_counter()
        if not (out.num_new == new_tokens).all():
            raise RuntimeError(f"bench: expected {new_tokens} tokens per row, got {out.num_new.tolist()}")
        return t1 - t0, t2 - t1

    def run_and_interleave() -> tuple[float, float]:
        times = one_run()
        if after_each_run is not None:
            after_each_run()
        return times

    compile_seconds = []

    def on_event(event: str, seconds: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            compile_seconds.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        run_and_interleave()
        steady = [run_and_interleave() for _ in range(runs)]
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    prefill_s = statistics.median(p for p, _ in steady)
    decode_s = statistics.median(d for _, d in steady)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "tokens_per_s": batch * new_tokens / decode_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "compile_s": sum(compile_seconds),
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_len": max(len(p) for p in prompts),
        "cache_len": sampler.max_len,
        "decode_chunk": decode_chunk,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k},
        "runs": runs,
        "device": str(jax.devices()[0].platform),
    }
