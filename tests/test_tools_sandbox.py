"""The python sandbox: normal cells, and hostile code that must fail cleanly without harming anything."""
from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from appo_jax.tools import python_sandbox
from appo_jax.tools.python_sandbox import PythonSandbox, SandboxConfig, strip_code_fence

TIMEOUT = 3.0
MARGIN = 4.0  # start-up, teardown (a fork bomb takes seconds to reap) and a loaded 2-core CI machine
REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module", params=python_sandbox.LAUNCHERS)
def sandbox(request):
    """The default sandbox, once per launcher: everything below holds for both."""
    sb = PythonSandbox(SandboxConfig(timeout_s=TIMEOUT, memory_mb=768, launcher=request.param), max_workers=4)
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def full_sandbox(sandbox):
    """The sandbox, when "full" isolation (root + namespaces) works on this machine."""
    if sandbox.level != "full":
        pytest.skip(f"full isolation unavailable here (running at {sandbox.level!r}: needs root + CAP_SYS_ADMIN)")
    return sandbox


def _processes_of(uids) -> list[int]:
    """Pids (zombies included) whose real uid is one of `uids`, from a /proc scan."""
    wanted = {u for u in uids if u is not None}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if int(uid_line.split()[1]) in wanted:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- normal cells --------------------------------------------------------------------------------------------


def test_prints_and_echoes_last_expression(sandbox):
    r = sandbox.run("print('hello')\nx = 6 * 7\nx")
    assert r.ok and r.error is None
    assert r.text == "hello\n42"


@pytest.mark.parametrize("code, expected", [
    ("x = 1", ""),                                  # last statement not an expression: nothing echoed
    ("None", ""),                                   # None is not echoed
    ("print('a')\n'b'", "a\n'b'"),                  # repr of the value
    ("def f(n):\n    return n * 2\n\nf(21)", "42"),
    ("for i in range(3):\n    print(i)", "0\n1\n2"),
    ("```python\n2 ** 10\n```", "1024"),            # a Markdown fence is removed
])
def test_cell_semantics(sandbox, code, expected):
    r = sandbox.run(code)
    assert r.ok, r.text
    assert r.text == expected


@pytest.mark.parametrize("code, ok, text", [
    ("import atexit\natexit.register(print, 'bye')\nprint('hi')", True, "hi\nbye"),  # atexit handlers run
    ("import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.3), print('late'))).start()", True,
     "late"),                                      # a non-daemon thread is joined before the exit
    ("import sys\nprint('a')\nsys.exit('boom')", False, "a\nboom"),  # a message goes to stderr, status 1
    ("raise SystemExit(300)", False, "[error] exit code 44"),  # 300 & 0xFF, as the interpreter
    ("import sys\nsys.exit(0)", True, ""),
])
def test_the_cell_ends_like_the_interpreter(sandbox, code, ok, text):
    r = sandbox.run(code)
    assert (r.ok, r.text) == (ok, text)


def test_the_cell_holds_no_descriptor_of_the_sandbox(sandbox):
    """Only stdin / stdout / stderr reach the cell (the process server's socket, above all, does not); the fourth
    descriptor listed is the listing's own."""
    r = sandbox.run("import os\nsorted(int(fd) for fd in os.listdir('/proc/self/fd'))")
    assert r.ok and r.text == "[0, 1, 2, 3]", r.text


def test_a_process_server_that_dies_is_replaced_and_close_ends_them():
    sb = PythonSandbox(SandboxConfig(timeout_s=TIMEOUT), max_workers=1)
    assert sb.run("1 + 1").text == "2"
    server = sb._servers[0]
    server.proc.kill()
    server.proc.wait()
    assert sb.run("2 + 2").text == "4"  # found dead: a new one serves the call
    assert sb._servers[0] is not server and sb._servers[0].alive()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # killed in the middle of a call
        future = pool.submit(sb.run, "import time\ntime.sleep(5)\nprint('woke')")
        pid = sb._servers[0].proc.pid
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{pid}/task/{pid}/children").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the server has forked the call's runner
        sb._servers[0].proc.kill()
        r = future.result()
    assert not r.ok and "process server" in r.text and "exit code -9" in r.text, r.text
    assert sb.run("5 + 5").text == "10"
    replacement = sb._servers[0]
    sb.close()
    assert replacement.proc.poll() is not None and sb._servers == [None]
    assert sb.run("3 + 3").text == "6"  # a closed sandbox starts a server again when used


def test_a_trainer_killed_mid_call_leaves_no_process_behind(full_sandbox):
    """SIGKILL of the process holding the sandbox, while a cell sleeps: its process server sees the socket close,
    kills the run (every process of the slot's uid) and exits."""
    if full_sandbox.config.launcher != "zygote":
        pytest.skip("a spawned runner has no process server to end it")
    script = ("import threading, time\n"
              "from appo_jax.tools.python_sandbox import PythonSandbox, SandboxConfig\n"
              "sb = PythonSandbox(SandboxConfig(timeout_s=60), max_workers=1)\n"
              "threading.Thread(target=sb.run, args=('import time\\nprint(1, flush=True)\\ntime.sleep(60)',)).start()\n"
              "while sb._servers[0] is None:\n    time.sleep(0.01)\n"
              "print(sb.uids[0], sb._servers[0].proc.pid, flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        uid, server = map(int, proc.stdout.readline().split())
        deadline = time.monotonic() + 10  # a loaded machine may take a while to start the cell
        while not _processes_of([uid]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_of([uid]), "the cell should be sleeping"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while (_alive(server) or _processes_of([uid])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server) and _processes_of([uid]) == []


def test_strip_code_fence():
    assert strip_code_fence("```py\nprint(1)\n```") == "print(1)"
    assert strip_code_fence("```\na\nb```") == "a\nb"
    assert strip_code_fence("print('```')") == "print('```')"


def test_exception_traceback_shows_only_user_frames(sandbox):
    r = sandbox.run("print('before')\ndef f():\n    return 1 / 0\nf()")
    assert not r.ok
    assert r.error == "ZeroDivisionError: division by zero"
    assert r.text.startswith("before\nTraceback")
    assert 'File "<python>", line 3, in f' in r.text
    assert "sandbox_runner" not in r.text


def test_numpy_and_sympy_available(sandbox):
    pytest.importorskip("numpy")
    pytest.importorskip("sympy")
    r = sandbox.run("import numpy as np, sympy\nprint(int(np.arange(5).sum()))\nsympy.factor(sympy.Symbol('x')**2 - 1)")
    assert r.ok, r.text
    assert r.text == "10\n(x - 1)*(x + 1)"


def test_files_in_own_directory_and_fresh_per_run(sandbox):
    r = sandbox.run("open('data.txt', 'w').write('abc')\nimport os\nprint(open('data.txt').read(), os.getcwd())")
    assert r.ok, r.text
    content, cwd = r.text.split()
    assert content == "abc"
    assert not os.path.exists(cwd)  # the run directory is removed afterwards
    r2 = sandbox.run("import os\nos.path.exists('data.txt')")
    assert r2.text == "False"


def test_per_call_timeout_and_output_truncation():
    sb = PythonSandbox(SandboxConfig(timeout_s=30.0, max_result_chars=200, isolation="auto"), max_workers=1)
    r = sb.run("import time\ntime.sleep(60)", timeout_s=1.0)
    assert not r.ok and r.error.startswith("timeout")
    assert r.seconds < 1.0 + MARGIN
    r = sb.run("for i in range(1000):\n    print(i)")
    assert r.ok and len(r.text) <= 200
    assert r.text.startswith("0\n1\n") and r.text.endswith("998\n999") and "characters truncated" in r.text


def test_config_validation():
    with pytest.raises(ValueError, match="isolation"):
        SandboxConfig(isolation="none")
    with pytest.raises(ValueError, match="launcher"):
        SandboxConfig(launcher="fork")
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="max_workers"):
        PythonSandbox(SandboxConfig(), max_workers=0)


def test_basic_isolation_kills_process_group():
    sb = PythonSandbox(SandboxConfig(timeout_s=TIMEOUT, isolation="basic"), max_workers=1)
    r = sb.run("import subprocess\nprint(subprocess.Popen(['sleep', '60']).pid)")
    assert r.ok, r.text
    child = int(r.text)
    deadline = time.monotonic() + 2
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(child)
    r = sb.run("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert not r.ok and "network access is disabled" in r.text


# -- hostile code --------------------------------------------------------------------------------------------


def test_hostile_code_fails_cleanly(full_sandbox, tmp_path):
    """Every hostile cell ends with an error within timeout + margin, leaves no process, harms nothing."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    sentinel = subprocess.Popen(["sleep", "120"])  # a process of the trainer's uid that must survive
    outside = [Path("/tmp") / f"appo-escape-{uuid.uuid4().hex}", REPO / f"appo-escape-{uuid.uuid4().hex}",
               tmp_path / "escape"]
    hostile = {
        "infinite loop": ("while True:\n    pass", "timeout"),
        "memory bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))", None),
        "200 sleeping children": (
            "import subprocess\nprocs = [subprocess.Popen(['sleep', '100']) for _ in range(200)]\nlen(procs)",
            "BlockingIOError"),
        "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", None),
        "write outside": (
            "".join(f"open({str(p)!r}, 'w').write('x')\n" for p in outside), "Read-only file system"),
        "fill the disk": ("for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * 2**20 * 10)",
                          "No space left on device"),
        "socket via module": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                              "network access is disabled"),
        "raw socket": (f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))",
                       "Network is unreachable"),
        "print 100 MB": ("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)", "output limit"),
        "syntax error": ("def f(:\n    pass", "SyntaxError"),
        "sys.exit(3)": ("import sys\nprint('bye')\nsys.exit(3)", "exit code 3"),
        "kill parent": (f"import os\nos.kill(os.getppid(), 9)\nos.kill({os.getpid()}, 9)", None),
        "kill everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)", None),
        "escape the group": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\nraise SystemExit(5)",
            "exit code 5"),
    }
    try:
        with concurrent.futures.ThreadPoolExecutor(len(hostile)) as pool:
            futures = {name: pool.submit(full_sandbox.run, code) for name, (code, _) in hostile.items()}
            results = {name: f.result() for name, f in futures.items()}
        for name, (_, expected) in hostile.items():
            r = results[name]
            assert not r.ok, f"{name}: {r.text[:300]}"
            assert r.error, name
            if expected is not None:
                assert expected in r.error or expected in r.text, f"{name}: {r.error} / {r.text[-300:]}"
            assert r.seconds < TIMEOUT + MARGIN, f"{name} took {r.seconds:.2f} s"
            assert len(r.text) <= full_sandbox.config.max_result_chars
        assert _processes_of(full_sandbox.uids) == []
        assert sentinel.poll() is None, "a process of the trainer's uid was killed"
        for path in outside:
            assert not path.exists(), f"the sandbox wrote {path}"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
        assert full_sandbox.run("print('still fine')").text == "still fine"
    finally:
        listener.close()
        sentinel.kill()
        sentinel.wait()


def test_normal_exit_reaps_everything_it_started(full_sandbox):
    code = ("import os, subprocess, time\n"
            "subprocess.Popen(['sleep', '100'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\n"
            "print('done')")
    r = full_sandbox.run(code)
    assert r.ok and r.text == "done"
    assert _processes_of(full_sandbox.uids) == []


def test_isolation_view(full_sandbox):
    code = ("import os\n"
            "print(os.getuid() != 0, os.getgid() != 0, os.getgroups())\n"
            "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(os.getppid())")
    r = full_sandbox.run(code)
    assert r.ok, r.text
    ids, pids, ppid = r.text.splitlines()
    assert ids == "True True []"
    assert pids == "[1]"  # its own PID namespace: only itself is visible
    assert ppid == "0"


def test_concurrent_runs_get_distinct_uids(full_sandbox):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(full_sandbox.run, ["import os, time\ntime.sleep(0.5)\nos.getuid()"] * 4))
    uids = {int(r.text) for r in outs}
    assert len(uids) == 4 and uids <= set(full_sandbox.uids)


def test_user_level_when_available():
    if os.geteuid() != 0:
        pytest.skip("'user' isolation needs root")
    try:
        sb = PythonSandbox(SandboxConfig(timeout_s=TIMEOUT, isolation="user"), max_workers=1)
    except ValueError as err:
        pytest.skip(f"'user' isolation unavailable here: {err}")
    r = sb.run(f"import os\nprint(os.getuid() != 0)\nos.kill({os.getpid()}, 9)")
    assert not r.ok and r.error.startswith("PermissionError") and r.text.startswith("True")
    r = sb.run("open('/etc/appo-sandbox-probe', 'w')")
    assert not r.ok and r.error.startswith("PermissionError")


def test_auto_falls_back_when_stronger_levels_do_not_work(monkeypatch, caplog):
    if os.geteuid() != 0:
        pytest.skip("without root 'auto' is always 'basic'")
    work_root = str(Path(tempfile.gettempdir()).resolve())
    monkeypatch.setattr(python_sandbox, "_PROBES", {
        (sys.executable, work_root, "full"): "unshare: Operation not permitted (simulated)",
        (sys.executable, work_root, "user"): "cannot import (simulated)",
    })
    sb = PythonSandbox(SandboxConfig(timeout_s=TIMEOUT), max_workers=2)
    assert sb.level == "basic" and sb.uids == [None, None]
    assert "Operation not permitted (simulated)" in caplog.text
    assert sb.run("print(1)").text == "1"
    with pytest.raises(ValueError, match="does not work here"):
        PythonSandbox(SandboxConfig(isolation="full"))
