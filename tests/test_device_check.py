"""`benchmarks/device_check.sh --cpu-smoke`: every check of the accelerator script runs at tiny sizes on CPU and
prints its JSON line, so the script cannot rot between the sessions that are lent a device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_cpu_smoke_prints_one_result_per_check():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--cpu-smoke"], cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert [x["check"] for x in lines] == ["sampler_tiny-qwen2", "train_step_mfu", "branch_fork", "core_pipeline"]
    sampler, train, fork, core = (x["result"] for x in lines)
    assert all(x["seconds"] > 0 for x in lines)
    assert "memory_bandwidth_share" in json.dumps(sampler)
    assert train["mfu"]["tokens_per_s"] > 0 and train["mfu"]["model"] == "tiny-qwen2"
    assert fork["fork_matches_reprefill"] and fork["all_branches_forked"] and fork["branch_rows"] == 4
    assert fork["branch_phase_seconds_fork"] > 0 and fork["branch_phase_seconds_reprefill"] > 0
    assert core["benchmark"] == "core_ops" and "256" in json.dumps(core)


def test_device_check_refuses_unknown_arguments():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--gpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage: benchmarks/device_check.sh [--cpu-smoke]" in run.stderr
