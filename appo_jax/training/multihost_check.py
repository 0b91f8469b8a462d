"""Several JAX processes on this machine against one: the multi-host path proven on CPU (`compare`).

The script ``python benchmarks/multihost_cpu.py --processes 2`` (2 processes x 4 CPU devices vs 1 x 8) prints
`compare`'s result as one JSON line; ``tests/test_multihost.py`` drives the same functions.

Runs APPO on a tiny random model (the SmolLM2 tokenizer, toy arithmetic with the python tool, 4 prompts x
(2 initial + 2 branch) rollouts, a lagged Omega baseline, KL to the reference) three ways, every process a real
``appo-jax train`` with gloo collectives over 127.0.0.1:

1. ``single``: one process with ``P x D`` CPU devices, ``--steps`` iterations;
2. ``multi``: ``P`` processes with ``D`` devices each (one ``P D``-device mesh), stopped after iteration
   ``--steps - 1`` (its checkpoint; with ``--kill``, process 1 is SIGKILLed as soon as that checkpoint is
   complete and the others must exit on their own), then
3. ``multi --resume`` to ``--steps`` iterations, on ``--resume-processes`` processes (default ``P``; with 1, the
   ``P``-process checkpoint continues in one process over all ``P x D`` devices).

``metrics_equal``: every non-timing metric of every iteration equal (rel. 1e-5; the Branching Score statistics to
5e-2, see `Z_AMPLIFIED`); ``max_abs_param_diff_vs_single_
process``: the largest difference between the final parameters of 1 and 3 (from their last checkpoints);
``resume_ok``: 3 restarted from iteration ``--steps - 1`` and finished; ``param_copy_s``: seconds the multi run
spent copying parameters from the train state to the hosts' samplers and ``host_gather_s`` exchanging rollout
rows between hosts (sums over its iterations, the slowest process each time).
"""
from __future__ import annotations

import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from appo_jax.training.metrics import read_metrics

#: The directory holding the `appo_jax` package: the subprocesses import this same copy.
ROOT = Path(__file__).resolve().parent.parent.parent
IGNORED = ("time/", "throughput/")

CONFIG = textwrap.dedent('''
    from appo_jax.training.config import ExperimentConfig


    def get_config():
        c = ExperimentConfig(name="multihost", workdir="unused")
        c.model.name, c.model.tokenizer = "tiny-llama", "smollm2-135m-instruct"
        c.data.train, c.data.limit, c.data.system_prompt = "toy_arithmetic", 16, "Hi."
        r = c.rollout
        r.max_prompt_len, r.max_response_len, r.tool_call_limit, r.decode_chunk, r.tool_workers = 32, 12, 1, 6, 2
        r.temperature = 0.05  # see the module doc: a random model at temperature 1 is near-uniform
        c.algorithm.name, c.algorithm.n, c.algorithm.n_init = "appo", 4, 2
        c.algorithm.omega_baseline = "lagged"
        c.loss.kl_coef = 0.01
        c.train.steps, c.train.prompts_per_step, c.train.mini_batch_prompts, c.train.logprob_chunk = 2, 4, 4, 6
        c.optimizer.lr, c.optimizer.schedule = 3e-3, "constant"
        c.checkpoint.every, c.checkpoint.keep = 1, 3
        c.logging.progress, c.logging.tensorboard = False, False
        return c
''')


def processor_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, cache_dir: Path | None = None) -> dict:
    """The environment of one CPU process with ``devices`` devices (and a shared compilation cache); the other
    ``XLA_FLAGS`` of this process's environment are kept."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def train_command(config: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-u", "-m", "appo_jax.cli", "train", "--config", str(config), "--workdir",
            str(workdir), *extra]


def launch(config: Path, workdir: Path, processes: int, devices: int, *extra: str, port: int | None = None,
           cache_dir: Path | None = None, heartbeat_timeout: int = 10, logs: Path | None = None
           ) -> list[subprocess.Popen]:
    """Start ``processes`` ``appo-jax train`` processes of one job (``devices`` CPU devices each); with one
    process no coordinator is used. stdout / stderr go to ``logs/process_<i>.log``."""
    logs = logs or workdir.parent
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    port = port or free_port()
    for i in range(processes):
        dist = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                          "--process-id", str(i), "--heartbeat-timeout", str(heartbeat_timeout),
                                          "--init-timeout", "120"]
        log = open(logs / f"{workdir.name}.process_{i}.log", "ab")
        procs.append(subprocess.Popen(train_command(config, workdir, *dist, *extra), cwd=ROOT,
                                      env=process_env(devices, cache_dir), stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def run_job(config: Path, workdir: Path, processes: int, devices: int, *extra: str, timeout: float = 900,
            cache_dir: Path | None = None) -> None:
    codes = wait_all(launch(config, workdir, processes, devices, *extra, cache_dir=cache_dir), timeout)
    if any(codes):
        tails = "\n".join((workdir.parent / f"{workdir.name}.process_{i}.log").read_text()[-3000:]
                          for i in range(processes))
        raise RuntimeError(f"{workdir.name}: exit codes {codes}\n{tails}")


def load_params(workdir: Path, step: int) -> dict:
    """The parameters of checkpoint ``step`` as numpy arrays (one process, any device count)."""
    from appo_jax.training.checkpoint import load_checkpoint_params  # deferred: orbax, only for the comparison

    return load_checkpoint_params(workdir / "checkpoints", step)[0]


def metrics_by_step(workdir: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(IGNORED)}
            for r in read_metrics(workdir / "metrics.jsonl")}


#: Metrics compared with a looser tolerance: the Branching Scores are products of per-row Z-scores of the sampled
#: tokens' entropies, which for a random tiny model are nearly constant along a row (std ~1e-3 nats around
#: log V), so the last-bit differences between a sampler on 8 and on 4 devices become ~1% differences of Z.
#: The selected positions, the tokens and everything trained are compared exactly (to ``rel``).
Z_AMPLIFIED = ("branch/score_",)


def same_metrics(a: dict[int, dict], b: dict[int, dict], rel: float = 1e-5,
                 z_rel: float = 5e-2) -> tuple[bool, list[str]]:
    """Equal steps, equal keys, values equal to ``rel`` (`Z_AMPLIFIED` keys to ``z_rel``; None == None); the
    differences found."""
    diffs = []
    if sorted(a) != sorted(b):
        return False, [f"steps {sorted(a)} vs {sorted(b)}"]
    for step in a:
        keys = set(a[step]) | set(b[step])
        for k in sorted(keys):
            x, y = a[step].get(k), b[step].get(k)
            if x is None or y is None:
                if x is not y:
                    diffs.append(f"step {step} {k}: {x} vs {y}")
            elif not math.isclose(x, y, rel_tol=z_rel if k.startswith(Z_AMPLIFIED) else rel, abs_tol=1e-6):
                diffs.append(f"step {step} {k}: {x} vs {y}")
    return not diffs, diffs


def kill_after_checkpoint(procs: list[subprocess.Popen], workdir: Path, step: int, victim: int = 1,
                          timeout: float = 900) -> dict:
    """SIGKILL process ``victim`` as soon as checkpoint ``step`` is complete (later iterations are running);
    wait for the others to exit and report how long they took and what they said."""
    deadline = time.monotonic() + timeout
    ckpt = workdir / "checkpoints" / str(step)
    while not ckpt.is_dir():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError(f"checkpoint {ckpt} never appeared (exit codes {[p.poll() for p in procs]})")
        time.sleep(0.05)
    procs[victim].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    others = [p for i, p in enumerate(procs) if i != victim]
    codes = wait_all(others, timeout=300)
    return {"survivor_exit_codes": codes, "survivor_exit_s": round(time.monotonic() - t_kill, 1)}


def compare(processes: int = 2, devices: int = 8, steps: int = 3, out: Path | None = None, kill: bool = False,
            heartbeat_timeout: int = 10, resume_processes: int | None = None) -> dict:
    """Run the jobs of the module doc under ``out`` (a temporary directory by default) and compare them."""
    import jax
    import numpy as np

    if devices % processes:
        raise SystemExit(f"--devices {devices} does not split over --processes {processes}")
    if steps < 2:
        raise SystemExit("--steps must be at least 2 (the multi-process run resumes before the last)")
    resume_processes = processes if resume_processes is None else resume_processes
    if resume_processes < 1 or devices % resume_processes:
        raise SystemExit(f"--resume-processes {resume_processes} does not split --devices {devices}")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="appo-multihost-")
        out = Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "multihost_config.py"
    config.write_text(CONFIG)
    cache = out / "jax_cache"
    t0 = time.perf_counter()
    single, multi = out / "single", out / "multi"
    run_job(config, single, 1, devices, "--set", f"train.steps={steps}", cache_dir=cache)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    extra: dict = {}
    per = devices // processes
    if kill:  # SIGKILL one process after checkpoint steps - 1; the rest must exit on their own, then resume
        procs = launch(config, multi, processes, per, "--set", f"train.steps={steps}", cache_dir=cache,
                       heartbeat_timeout=heartbeat_timeout)
        extra = kill_after_checkpoint(procs, multi, steps - 1)
        text = (out / "multi.process_0.log").read_text(errors="replace")
        extra["survivor_said_a_process_died"] = "another task died" in text or "heartbeat" in text
        extra["last_complete_checkpoint_after_kill"] = max(
            (int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()), default=None)
    else:
        run_job(config, multi, processes, per, "--set", f"train.steps={steps - 1}", cache_dir=cache)
    resume_from = extra.get("last_complete_checkpoint_after_kill", steps - 1)
    run_job(config, multi, resume_processes, devices // resume_processes, "--resume", "--set",
            f"train.steps={steps}", cache_dir=cache)
    t_multi = time.perf_counter() - t0
    log = (out / "multi.process_0.log").read_text(errors="replace")
    resume_ok = (f"resumed from {multi / 'checkpoints'}/{resume_from}" in log
                 and (multi / "checkpoints" / str(steps)).is_dir())
    ok, diffs = same_metrics(metrics_by_step(single), metrics_by_step(multi))
    pa, pb = load_params(single, steps), load_params(multi, steps)
    diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    records = read_metrics(multi / "metrics.jsonl")
    copy_s = sum(r.get("time/param_copy_s", 0.0) for r in records)
    gather_s = sum(r.get("time/host_gather_s", 0.0) for r in records)
    result = {"benchmark": "multihost_cpu", "processes": processes, "devices": devices,
              "devices_per_process": per, "resume_processes": resume_processes, "iterations": steps,
              "max_abs_param_diff_vs_single_process": diff, "metrics_equal": ok, "metric_differences": diffs[:10],
              "resume_ok": resume_ok, "resumed_from": resume_from, "param_copy_s": round(copy_s, 4),
              "host_gather_s": round(gather_s, 4), **extra,
              "seconds_single_process": round(t_single, 1), "seconds_multi_process": round(t_multi, 1),
              "processor": processor_name(), "cpus": os.cpu_count()}
    if tmp is not None:
        tmp.cleanup()
    return result
