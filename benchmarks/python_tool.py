"""The python tool's cost per call: the process-server launcher against a fresh interpreter per call.

Setting: a `PythonSandbox` (``--isolation``, default the strongest that works here) with ``--workers`` slots
runs batches of ``--calls`` cells (``print(50 - ((7 + 5) * 3))``, the arithmetic tasks' kind of call) submitted
from as many threads, inside a process that looks like a trainer to the kernel: ``--trainer-mib`` MiB of
touched memory that ``--writers`` threads keep writing (every page, then a 5 ms pause; as XLA's threads write
their buffers). Per repeat, the two launchers (`SandboxConfig.launcher`) run one batch each, in alternating
order, each on a sandbox already warm (probed, process servers started):

* ``spawn``: a fresh ``python sandbox_runner.py`` per call, the uid-wide kill by a ``/bin/sh`` forked from the
  trainer (the sandbox before the process servers);
* ``zygote``: the runner forked from the slot's process server; the trainer forks nothing.

Per launcher, medians over ``--repeats``: ``wall_ms_per_call`` (batch wall time / calls), ``cpu_ms_per_call``
(every CPU-second the machine spent during the batch and the 2 s after it — child processes, the kernel's work
on namespaces — minus the writer threads' own user time, / calls: run it on an otherwise idle machine), and
``writer_sys_ms_per_call`` (the writer threads' kernel time / calls: the copy-on-write faults a fork of the
trainer makes its compute threads pay). ``speedup_cpu`` = spawn / zygote CPU per call.

Progress goes to stderr; the last stdout line is one JSON object. Run: ``python benchmarks/python_tool.py``
(about a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

CELL = "print(50 - ((7 + 5) * 3))"
HZ = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[python_tool] {msg}", file=sys.stderr, flush=True)


def busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / HZ


def thread_times(tids: list[int]) -> tuple[float, float]:
    """(user, system) CPU-seconds of this process's threads ``tids`` (/proc/self/task/TID/stat)."""
    user = system = 0.0
    for tid in tids:
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        user, system = user + int(fields[11]) / HZ, system + int(fields[12]) / HZ
    return user, system


class Trainer:
    """``mib`` MiB of touched memory and ``writers`` threads writing every page of it, then pausing 5 ms."""

    def __init__(self, mib: int, writers: int):
        self.pages = np.ones((mib * 2**20 // 4096, 512))  # a row is one 4 KiB page
        self.stop, self.tids = threading.Event(), []
        ready = threading.Barrier(writers + 1)
        for _ in range(writers):
            threading.Thread(target=self._write, args=(ready,), daemon=True).start()
        ready.wait()

    def _write(self, ready):
        self.tids.append(threading.get_native_id())
        ready.wait()
        while not self.stop.is_set():
            self.pages[:, 0] += 1.0
            time.sleep(0.005)


def batch(sandbox, calls: int, workers: int, trainer: Trainer) -> dict:
    """Run ``calls`` cells on ``workers`` threads; wall / CPU / writer-kernel milliseconds per call."""
    w_user0, w_sys0 = thread_times(trainer.tids)
    busy0, start = busy_seconds(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(sandbox.run, [CELL] * calls))
    wall = time.perf_counter() - start
    time.sleep(2.0)  # the kernel tears namespaces down after the processes are gone
    busy = busy_seconds() - busy0
    w_user, w_sys = thread_times(trainer.tids)
    bad = [r for r in results if not (r.ok and r.text == "14")]
    if bad:
        raise SystemExit(f"a cell failed: {bad[0].text!r}")
    return {"wall_ms_per_call": 1e3 * wall / calls, "cpu_ms_per_call": 1e3 * (busy - (w_user - w_user0)) / calls,
            "writer_sys_ms_per_call": 1e3 * (w_sys - w_sys0) / calls}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trainer-mib", type=int, default=1024)
    ap.add_argument("--writers", type=int, default=1)
    ap.add_argument("--isolation", default="auto")
    args = ap.parse_args(argv)

    from appo_jax.tools.python_sandbox import LAUNCHERS, PythonSandbox, SandboxConfig
    from appo_jax.training.multihost_check import processor_name

    trainer = Trainer(args.trainer_mib, args.writers)
    boxes = {name: PythonSandbox(SandboxConfig(isolation=args.isolation, launcher=name), max_workers=args.workers)
             for name in LAUNCHERS}
    for name, box in boxes.items():  # warm: every slot's server started, the first calls' imports done
        batch(box, args.workers * 2, args.workers, trainer)
    runs = {name: [] for name in boxes}
    for rep in range(args.repeats):
        for name in (LAUNCHERS if rep % 2 == 0 else LAUNCHERS[::-1]):
            runs[name].append(batch(boxes[name], args.calls, args.workers, trainer))
            shown = ", ".join(f"{k} {v:.1f}" for k, v in runs[name][-1].items())
            log(f"repeat {rep + 1}/{args.repeats} {name}: {shown}")
    trainer.stop.set()
    for box in boxes.values():
        box.close()
    med = {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for name, rs in runs.items()}
    out = {"benchmark": "python_tool", "isolation": boxes["zygote"].level, "calls": args.calls,
           "workers": args.workers, "repeats": args.repeats, "trainer_mib": args.trainer_mib, "writers": args.writers,
           **{name: m for name, m in med.items()},
           "speedup_cpu": round(med["spawn"]["cpu_ms_per_call"] / med["zygote"]["cpu_ms_per_call"], 2),
           "speedup_wall": round(med["spawn"]["wall_ms_per_call"] / med["zygote"]["wall_ms_per_call"], 2),
           "processor": processor_name(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
