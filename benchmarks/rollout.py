"""Rollout throughput of the agentic tool loop: SmolLM2-135M-Instruct on GSM8K prompts, tools on.

Runs ``--prompts`` GSM8K test prompts x ``--n`` rollouts through ``RolloutEngine`` (python + search tools live,
``--num-slots`` sampler slots, so slots are refilled) and reports rollouts/s, generated tokens/s and the share of wall
time the decode loop sat idle waiting on tool futures because no slot could decode (target < 10%: tools overlap
decode).

SmolLM2-135M-Instruct is not trained on the tool protocol and makes no tool calls on its own (0 calls in 64
rollouts of 512 tokens here), so by default every rollout starts from the response prefix
``<python>{--seed-call}</python>``: the loop runs that call in the python sandbox first (a real subprocess per
call) and the model continues after the ``<result>``; ``--seed-call ''`` measures the plain model.

Compilation happens inside the run (no warm-up pass: on 2 CPU cores a warm-up costs minutes); its time is
measured with JAX's compile-duration events and reported as ``compile_s``; ``*_per_s`` exclude it,
``*_per_s_incl_compile`` do not. Prints JSON lines; the last line is one JSON object with every number.

    .venv/bin/python benchmarks/rollout.py [--prompts 16] [--n 4] [--max-response-len 256] [--slots 32]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import jax
import numpy as np

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileTimer:
    """Sums the backend compile durations JAX reports while ``active``."""

    def __init__(self):
        self.seconds, self.count, self.active, self._lock = 0.0, 0, False, threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if self.active and event == _COMPILE_EVENT:
            with self._lock:
                self.seconds += duration
                self.count += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-prompt-len", type=int, default=512)
    ap.add_argument("--max-response-len", type=int, default=256)
    ap.add_argument("--tool-call-limit", type=int, default=3)
    ap.add_argument("--num-slots", type=int, default=32, help="sampler slots")
    ap.add_argument("--decode-chunk", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seed-call", default="import math\nprint(math.factorial(20))",
                    help="python code of the call every rollout starts with ('' = none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from appo_jax.core.trajectory import FINISH_NAMES
    from appo_jax.data import encode_records, read_records
    from appo_jax.models.loading import load_policy
    from appo_jax.rollout.agent_loop import Prefix, RolloutRequest
    from appo_jax.rollout.config import RolloutConfig
    from appo_jax.rollout.engine import RolloutEngine, default_tools

    timer = CompileTimer()
    t0 = time.perf_counter()
    config, params, tokenizer = load_policy(args.model, dtype=args.dtype)
    cfg = RolloutConfig(max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
                        tool_call_limit=args.tool_call_limit, temperature=args.temperature,
                        num_slots=args.num_slots, decode_chunk=args.decode_chunk, tool_timeout_s=10.0)
    items, _ = encode_records(read_records("gsm8k")[:args.prompts], tokenizer, max_prompt_len=cfg.max_prompt_len)
    seed_ids = (tokenizer.encode(f"<python>{args.seed_call}</python>", add_special_tokens=False)
                if args.seed_call else [])
    load_s = time.perf_counter() - t0
    print(json.dumps({"phase": "loaded", "load_s": round(load_s, 2), "device": jax.devices()[0].device_kind,
                      "cpus": os.cpu_count()}), flush=True)

    key = jax.random.key(args.seed)
    reqs = []
    for g, item in enumerate(items):
        for i in range(args.n):
            k = len(seed_ids)
            prefix = Prefix(np.asarray(seed_ids, np.int32), np.ones(k, bool), np.zeros(k, bool),
                            np.zeros(k, np.float32), np.zeros(k, np.float32)) if k else None
            reqs.append(RolloutRequest(list(item.prompt_ids), jax.random.fold_in(key, g * args.n + i), prefix,
                                       meta={"item": item}))
    with default_tools(cfg) as tools:
        engine = RolloutEngine(config, params, tokenizer, tools, cfg)
        timer.active = True
        t0 = time.perf_counter()
        rollouts = engine.run(reqs)
        wall = time.perf_counter() - t0
        timer.active = False
        stats = engine.stats
        engine.close()

    gen = int(sum(r.gen_mask.sum() for r in rollouts)) - len(seed_ids) * len(rollouts)
    steady = max(wall - timer.seconds, 1e-9)
    calls = [c for r in rollouts for c in r.tool_calls]
    finish = {name: sum(r.finish_reason == i for r in rollouts) for i, name in enumerate(FINISH_NAMES)}
    result = {
        "benchmark": "rollout",
        "model": args.model,
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(),
        "prompts": len(items),
        "n": args.n,
        "rollouts": len(rollouts),
        "slots": cfg.num_slots,
        "max_response_len": cfg.max_response_len,
        "decode_chunk": cfg.decode_chunk,
        "seed_call": bool(seed_ids),
        "wall_s": round(wall, 2),
        "compile_s": round(timer.seconds, 2),
        "compiles": timer.count,
        "rollouts_per_s": round(len(rollouts) / steady, 4),
        "generated_tokens": gen,
        "generated_tokens_per_s": round(gen / steady, 1),
        "rollouts_per_s_incl_compile": round(len(rollouts) / wall, 4),
        "generated_tokens_per_s_incl_compile": round(gen / wall, 1),
        "observation_tokens": int(sum(r.obs_mask.sum() for r in rollouts)),
        "tool_calls": len(calls),
        "tool_calls_by_name": {n: sum(c.name == n for c in calls) for n in sorted({c.name for c in calls})},
        "tool_wait_s": round(stats.tool_wait_s, 3),
        "tool_wait_share": round(stats.tool_wait_s / stats.wall_s, 4),
        "decode_share": round(stats.decode_s / stats.wall_s, 4),
        "prefill_share": round(stats.prefill_s / stats.wall_s, 4),
        "decode_calls": stats.decode_calls,
        "reward_wait_s": round(stats.reward_wait_s, 3),
        "mean_response_len": round(float(np.mean([len(r.tokens) for r in rollouts])), 1),
        "mean_reward": round(float(np.mean([r.reward for r in rollouts])), 4),
        "finish_reasons": finish,
        "load_s": round(load_s, 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
