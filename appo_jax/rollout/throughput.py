"""Throughput of the jitted sampler: decode / prefill tokens per second and the decode roofline (used by
`appo-jax bench sampler` and benchmarks/sampler.py).

One measurement = ``start`` (batched prefill of ``batch`` prompts of ``prompt_len`` random token ids) then
``decode`` of exactly ``new_tokens`` tokens per row (EOS disabled, no stop strings), each timed to completion
(``block_until_ready`` / host arrays). The first run compiles; ``compile_s`` is the tracing + lowering + XLA
compile time JAX reports (`jax.monitoring` duration events "/jax/core/compile/*") during the benchmark.

Roofline: a decode step at small batch is bound by memory traffic, so the result also reports the bytes one step
must read (`decode_step_bytes`: every parameter once, plus the K and V cache slots of the attention window) and
``memory_bandwidth_share`` = (bytes per step / seconds per step) / the device's streaming bandwidth measured in
the same process (`measure_memory_bandwidth` after each steady run, the median: on a shared machine it moves by
a third from one minute to the next), next to the nominal peak where the device is known
(NOMINAL_PEAK_BANDWIDTH, e.g. HBM of an H100).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np

from appo_jax.models.config import ModelConfig
from appo_jax.rollout.sampler import Sampler, cache_len_for
from appo_jax.rollout.sampling import SamplingParams

# Nominal memory bandwidth (bytes/s) of devices we know by jax `device_kind` (vendor data sheets).
NOMINAL_PEAK_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 8.19e11,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
}


def decode_step_bytes(config: ModelConfig, params, *, batch: int, window: float) -> dict:
    """Bytes one decode step reads at least: every parameter once (its stored dtype; the input-embedding gather
    is counted as part of the embedding, which a tied model reads whole for the logits) plus K and V of
    ``window`` cache slots for each of ``batch`` rows and every layer, in the compute dtype:
    kv = 2 * num_layers * batch * window * num_kv_heads * head_dim * itemsize(compute dtype)."""
    param_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    kv_bytes = (2 * config.num_layers * batch * window * config.num_kv_heads * config.head_dim
                * np.dtype(config.compute_dtype).itemsize)
    return {"params": param_bytes, "kv_cache": int(kv_bytes), "total": int(param_bytes + kv_bytes)}


def measure_memory_bandwidth(megabytes: int = 1024, runs: int = 5) -> float:
    """Streaming read bandwidth (bytes/s) of the default device: median time of a jitted sum over a float32
    array of ``megabytes`` MiB (large enough to defeat caches), bytes / seconds."""
    n = megabytes * 2**20 // 4
    x = jax.jit(lambda: jnp.ones((n,), jnp.float32))()
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    del x
    return n * 4 / statistics.median(times)


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``prompt_len`` token ids drawn uniformly from [3, vocab_size) (fixed seed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(batch, prompt_len)).tolist()


def decode_roofline(config: ModelConfig, params, *, batch: int, windows: list[int], step_s: float,
                    bandwidth: float | None = None) -> dict:
    """Where one decode step of ``step_s`` seconds stands against memory bandwidth: the bytes it reads
    (`decode_step_bytes` at the mean attention window of ``windows``), the GB/s that makes, the streaming bandwidth
    (``bandwidth`` bytes/s, else measured now: `measure_memory_bandwidth`) and the share of it, and of the device's
    nominal peak when known."""
    step_bytes = decode_step_bytes(config, params, batch=batch, window=float(np.mean(windows)))
    bandwidth = bandwidth or measure_memory_bandwidth()
    nominal = NOMINAL_PEAK_BANDWIDTH.get(jax.devices()[0].device_kind)
    return {
        "bytes_per_step": step_bytes,
        "mean_attention_window": round(float(np.mean(windows)), 1),
        "step_ms": round(step_s * 1e3, 3),
        "achieved_GB_per_s": round(step_bytes["total"] / step_s / 1e9, 2),
        "measured_stream_GB_per_s": round(bandwidth / 1e9, 2),
        "memory_bandwidth_share": round(step_bytes["total"] / step_s / bandwidth, 3),
        "nominal_peak_GB_per_s": nominal and round(nominal / 1e9, 1),
        "nominal_peak_share": nominal and round(step_bytes["total"] / step_s / nominal, 3),
    }


def measure_sampler(config: ModelConfig, params, *, batch: int, new_tokens: int, prompt_len: int = 32,
                    sampling: SamplingParams = SamplingParams(), runs: int = 3, decode_chunk: int = 32,
                    prompts: list[list[int]] | None = None, after_each_run: Callable[[], None] | None = None,
                    unstack_weights: bool = False, cpu_kernels: bool = False) -> dict:
    """Median decode / prefill throughput over ``runs`` steady runs (module doc). Returns a JSON-able dict:
    tokens_per_s (generated tokens / decode seconds), prefill_tokens_per_s (prompt tokens / prefill seconds),
    compile_s, decode_s, prefill_s, and the settings. ``after_each_run`` is called after every run (the compiling
    one included), e.g. to interleave a baseline's runs so both see the same machine load. ``unstack_weights``,
    ``cpu_kernels``: the sampler's options of those names (``cpu_kernels`` in the result: whether the kernel ran,
    or why not)."""
    if batch < 1 or new_tokens < 1 or prompt_len < 1 or runs < 1:
        raise ValueError(f"bench needs batch, new_tokens, prompt_len, runs >= 1; got {batch}, {new_tokens}, "
                         f"{prompt_len}, {runs}")
    prompts = prompts or random_prompts(config.vocab_size, batch, prompt_len)
    sampler = Sampler(config, params, num_slots=batch, max_len=cache_len_for([len(p) for p in prompts], new_tokens),
                      sampling=sampling, eos_token_ids=(), decode_chunk=decode_chunk, unstack_weights=unstack_weights,
                      cpu_kernels=cpu_kernels)
    windows = []  # the attention window of every decode step (the sampler picks one per device chunk)
    slots, active = list(range(batch)), np.ones(batch, bool)
    keys = [jax.random.key(i) for i in slots]

    def one_run() -> tuple[float, float]:
        t0 = time.perf_counter()
        sampler.start(slots, prompts, keys)
        jax.block_until_ready(sampler.cache)
        t1 = time.perf_counter()
        first_end = max(sampler.max_len - sampler.free_cache_slots(s) for s in slots)
        out = sampler.decode(active, new_tokens)
        t2 = time.perf_counter()
        windows[:] = [sampler.attention_window(first_end + min(new_tokens, (step // decode_chunk + 1) * decode_chunk))
                      for step in range(new_tokens)]
        if not (out.num_new == new_tokens).all():
            raise RuntimeError(f"bench: expected {new_tokens} tokens per row, got {out.num_new.tolist()}")
        return t1 - t0, t2 - t1

    streams = []  # the streaming bandwidth after each run: the machine as the runs found it

    def run_and_interleave() -> tuple[float, float]:
        times = one_run()
        streams.append(measure_memory_bandwidth())
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
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "repetition_penalty": sampling.repetition_penalty},
        "runs": runs,
        "device": str(jax.devices()[0].platform),
        "device_kind": jax.devices()[0].device_kind,
        "dtype": str(np.dtype(config.compute_dtype)),
        "cpu_kernels": sampler.cpu_kernels_status[0] or sampler.cpu_kernels_status[1],
        "roofline": decode_roofline(config, params, batch=batch, windows=windows, step_s=decode_s / new_tokens,
                                    bandwidth=statistics.median(streams[1:])),  # the steady runs' 
    }
