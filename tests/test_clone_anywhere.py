"""A clone with nothing beside it works: its data ships inside the package, a wheel built from it carries that data,
and the demo config trains there.

The repository is cloned (committed state) into an empty temporary directory. A wheel built from the clone is
unpacked into a site directory and used from a working directory outside any source tree: every registered
dataset loads through TFDS with its full row count and the offline search answers a query. Then, inside the
clone, one training iteration of ``experiments/demo_cpu.py`` (the ``make demo`` config: cold-start SFT + APPO
with the held-out evaluation, shortened) runs through the CLI. No ``$APPO_DATA_DIR`` is set and nothing outside the clone (and the virtualenv's dependencies) is used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from appo_jax.data.rows import DATASETS

REPO = Path(__file__).resolve().parents[1]

# Rows each shipped dataset yields (train_10k has one row without a ground truth, skipped with a warning).
EXPECTED_RECORDS = {"aime24": 30, "aime25": 30, "math500": 500, "gsm8k": 1319, "hotpotqa": 200, "2wiki": 200,
                    "musique": 200, "bamboogle": 125, "webwalker": 680, "gaia": 103, "xbench": 100, "simpleqa": 500,
                    "hle": 500, "train_10k": 9999, "valid": 180, "hard_search_1k": 1071, "gaia_test": 103,
                    "hle_test": 100}


def _env(tmp: Path, pythonpath: Path) -> dict:
    # as a user runs it: no data dir, no extra import path, and the machine's own devices (not the tests' 8 fakes;
    # the session's compile-speed flags stay, they change no result)
    env = {k: v for k, v in os.environ.items() if k not in ("APPO_DATA_DIR", "PYTHONPATH")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(PYTHONPATH=str(pythonpath), APPO_TFDS_DIR=str(tmp / "tfds"), HOME=str(tmp / "home"),
               XLA_FLAGS=" ".join(flags))
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists():
        pytest.fail(f"{REPO} is not a git checkout: this test clones the repository")
    root = tmp_path_factory.mktemp("nothing-beside-it")
    target = root / "appo-jax"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True, timeout=120)
    assert sorted(p.name for p in root.iterdir()) == ["appo-jax"]
    return target


def test_every_record_count_is_listed():
    assert set(EXPECTED_RECORDS) == set(DATASETS)


def test_a_wheel_built_in_the_clone_carries_the_data(clone, tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."],
         clone, _env(tmp_path, clone), 300)
    (wheel,) = dist.glob("appo_jax-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert any(n.startswith("appo_jax/data/raw/rl/") for n in names)
    assert {"appo_jax/kernels/cpu_panel_matmul.cc", "appo_jax/kernels/cpu_decode_attention.cc",
            "appo_jax/kernels/cpu_vectors.h"} <= set(names)  # the kernels build from the installed package
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent(f"""
        import json, pathlib
        import appo_jax
        from appo_jax.data import DATASETS, get_spec, load_split, resolve_data_dir
        from appo_jax.tools import build_registry
        site = pathlib.Path({str(site)!r})
        assert pathlib.Path(appo_jax.__file__).resolve().is_relative_to(site), appo_jax.__file__
        assert resolve_data_dir().is_relative_to(site), resolve_data_dir()
        counts = {{name: len(load_split(name, get_spec(name).split)) for name in DATASETS}}
        with build_registry(("search",)) as tools:
            result = tools.call("search", "Campfire Tales director")
        from appo_jax.models.loading import load_tokenizer  # the shipped tokenizer of the mini tasks
        vocab = len(load_tokenizer("mini-tasks"))
        print(json.dumps({{"counts": counts, "search_ok": result.ok, "search": result.text[:200], "vocab": vocab}}))
    """)
    out = _run([sys.executable, "-c", script], elsewhere, _env(tmp_path, site), 900)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["counts"] == EXPECTED_RECORDS
    assert report["search_ok"] and report["search"].startswith("Page 1:")
    assert report["vocab"] == 512


@pytest.mark.heavy(order=2)
def test_the_demo_config_trains_in_the_clone(clone, tmp_path):
    workdir = tmp_path / "run"
    out = _run([sys.executable, "-m", "appo_jax.cli", "train", "--config", "experiments/demo_cpu.py",
                "--workdir", str(workdir), "--set", "train.steps=1", "--set", "sft.steps=1",
                "--set", "sft.examples=16", "--set", "logging.eval_limit=4", "--set", "logging.eval_every=1",
                "--set", "logging.dump_rollouts_every=1"], clone, _env(tmp_path, clone), 900)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 1 and summary["checkpoint_steps"] == [1]
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["rollouts/count"] > 0 and record["branch/count"] > 0
    assert (workdir / "rollouts" / "step_000001.html").is_file()
    assert (workdir / "learning_curve.png").is_file() and "held-out arith_program:heldout/greedy" in out.stdout
    assert "Traceback" not in out.stderr
