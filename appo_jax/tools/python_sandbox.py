"""The ``python`` tool: run untrusted model-written code in a sandboxed subprocess.

Each call runs `sandbox_runner.py` in a new process (own session / process group; forked from the slot's
process server, see ``SandboxConfig.launcher``) inside its own temporary directory, with a wall-clock timeout,
`resource` limits (address space, CPU time, file size, number of processes, open files), no network, captured
output with a hard byte cap, and the last expression echoed like a notebook. Every failure — exception, timeout,
limit, crash, setup problem — becomes an ``ok=False`` `ToolResult` whose text shows the error; nothing is raised
into the caller.

Isolation levels (``SandboxConfig.isolation``); ``"auto"`` (default) takes the strongest one that works here —
each level is probed once per process with a trivial cell — and logs a warning when that is not ``"full"``:

* ``"full"`` (root with CAP_SYS_ADMIN): the runner enters new mount, network and PID namespaces — no network
  at all; the file system read-only and nosuid except the run directory (a private, size-limited tmpfs); the
  cell is PID 1 of its namespace, so when it ends the kernel kills everything it started, ``setsid()``
  escapees included — and drops to an unprivileged uid/gid *of its own*: every concurrent slot of every sandbox
  instance has a distinct uid, so code in one run can signal neither the trainer nor another run, and
  RLIMIT_NPROC counts only that run's processes. On timeout (and after every run) everything owned by that uid
  is SIGKILLed (``kill(-1)`` as that uid).
* ``"user"`` (root, e.g. a container without CAP_SYS_ADMIN): the same private uid, limits and uid-wide kill,
  but no namespaces: the code can reach the network and write to world-writable places such as ``/tmp``.
* ``"basic"`` (no root): resource limits, a socket module refusing internet sockets, and the process group
  killed after the run. Code can still write where the trainer's user can and reach the network with raw
  syscalls — use it only for trusted code or inside an outer sandbox.

Concurrency: `PythonSandbox` is thread-safe; at most ``max_workers`` runs execute at once (further calls wait for
a free slot, and that wait is not counted against their timeout). `ToolRegistry.submit` provides the futures.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import pwd
import queue
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from appo_jax.tools.result import ToolResult, error_result, truncate_middle

RUNNER = Path(__file__).with_name("sandbox_runner.py")
SETUP_FAILED = 121  # keep in sync with sandbox_runner.SETUP_FAILED
SETUP_PREFIX = "[sandbox setup failed]"
ISOLATION_LEVELS = ("auto", "full", "user", "basic")
LAUNCHERS = ("zygote", "spawn")
PROBE_CODE = "import fractions\nprint(6 * 7)"  # a stdlib import after the privilege drop, and output
UID_BLOCK = 256  # uids per sandbox instance (so max_workers <= 256)
UID_REGION = 0x40000000  # default uids live in [2^30, 2^30 + 2^28): far from any real account

_instance_counter = itertools.count()
_PROBES: dict[tuple, str | None] = {}  # (python, work_root, level) -> None if the level works, else why not
_PROBE_LOCK = threading.Lock()
log = logging.getLogger(__name__)
_FENCE = re.compile(r"^\s*```[A-Za-z0-9_+-]*[ \t]*\n(.*?)\n?```\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of the python sandbox.

    timeout_s: wall-clock limit per run, from process start (interpreter start-up included).
    memory_mb: RLIMIT_AS, the address-space limit (a memory bomb gets MemoryError or is killed).
    cpu_seconds: RLIMIT_CPU soft limit (hard = soft + 1); None -> ceil(timeout_s) + 1.
    file_size_mb: RLIMIT_FSIZE, the largest file the code may write.
    disk_mb: full isolation: size of the private tmpfs mounted on the run directory (all files together).
    max_processes: RLIMIT_NPROC, processes + threads of the run's uid (full isolation; under "basic" the limit
        applies to the trainer's uid as a whole and is therefore only as strong as that).
    max_open_files: RLIMIT_NOFILE.
    max_output_bytes: hard cap on captured stdout + stderr; a run printing more is killed (error result showing
        the beginning of its output).
    max_result_chars: the result text shown to the model is cut to this many characters (head + tail).
    isolation: "auto" | "full" | "user" | "basic" (see the module docstring).
    uid_base: first uid of this instance's block of `UID_BLOCK` private uids ("full" / "user"); None -> a block
        in [2^30, 2^30 + 2^28) derived from the process id and an instance counter.
    work_root: parent of the per-run temporary directories; None -> the system temp dir. Under "full" / "user"
        every ancestor must be traversable by others.
    python: the interpreter running the code (default: this one, so numpy / sympy are the trainer's).
    launcher: how each call's runner process starts. "zygote" (default): forked from the slot's process server,
        a small interpreter started once per slot (`sandbox_runner.serve`); a call then costs about a millisecond
        of start-up instead of a fresh interpreter's tens, and the trainer never forks itself (a fork of a
        trainer whose threads keep writing gigabytes makes both pay copy-on-write faults). "spawn": a fresh
        ``python sandbox_runner.py`` per call, the uid-wide kill by a forked ``/bin/sh`` (the reference for
        ``benchmarks/python_tool.py``). Isolation, limits and results are the same.
    """

    timeout_s: float = 10.0
    memory_mb: int = 2048
    cpu_seconds: int | None = None
    file_size_mb: int = 32
    disk_mb: int = 64
    max_processes: int = 64
    max_open_files: int = 256
    max_output_bytes: int = 1 << 20
    max_result_chars: int = 8000
    isolation: str = "auto"
    uid_base: int | None = None
    work_root: str | None = None
    python: str = sys.executable
    launcher: str = "zygote"

    def __post_init__(self):
        if self.isolation not in ISOLATION_LEVELS:
            raise ValueError(f"SandboxConfig.isolation must be one of {ISOLATION_LEVELS}, got {self.isolation!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"SandboxConfig.launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        for name in ("memory_mb", "file_size_mb", "disk_mb", "max_processes", "max_open_files", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}")


def strip_code_fence(code: str) -> str:
    """The code inside a Markdown fence (```python ... ```) if `code` is exactly one fenced block, else `code`."""
    match = _FENCE.match(code)
    return match.group(1) if match else code


def _uid_ranges() -> list[tuple[int, int]]:
    """[(first, last_exclusive)] uids mapped in this user namespace (whole 32-bit range if unknown)."""
    try:
        lines = Path("/proc/self/uid_map").read_text().split("\n")
    except OSError:
        return [(0, 2**32 - 1)]
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            first, count = int(parts[0]), int(parts[2])
            out.append((first, first + count))
    return out


def _check_uid_block(base: int, count: int) -> None:
    if not any(lo <= base and base + count <= hi for lo, hi in _uid_ranges()):
        raise ValueError(
            f"python sandbox uids [{base}, {base + count}) are not all mapped in this user namespace "
            f"(/proc/self/uid_map); pass SandboxConfig(uid_base=...) with a free mapped range"
        )
    for uid in range(base, base + count):
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            continue
        raise ValueError(
            f"python sandbox uid {uid} belongs to account {entry.pw_name!r}; pass SandboxConfig(uid_base=...) "
            f"with a range of unused uids"
        )


def _check_traversable(path: Path) -> None:
    for anc in [path, *path.parents]:
        if not os.stat(anc).st_mode & 0o001:
            raise ValueError(
                f"python sandbox work_root {str(path)!r}: {str(anc)!r} is not traversable by other users, so the "
                f"sandbox uid could not reach its run directory; choose another SandboxConfig.work_root"
            )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_SIGNAL_HINTS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed (memory or CPU limit, or by itself)",
    signal.SIGSEGV: "segmentation fault (possibly the memory limit)",
}


_BASE_ENV = {  # the runner's environment (HOME and TMPDIR: the run directory), and the process server's
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONHASHSEED": "0",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


def _kill_uid(uid: int | None) -> None:
    """SIGKILL every process of ``uid`` (None: nothing) from this process: ``kill -9 -1`` in a ``/bin/sh`` that
    runs as that uid (a fork of this process: the "spawn" launcher's way, and the fallback when a server died)."""
    if uid is not None:
        subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], env={},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       close_fds=True, check=False)


class _ProcessServer:
    """One slot's process server (launcher "zygote"): ``python -I -u -B sandbox_runner.py --serve FD`` started
    once, talking over a SOCK_SEQPACKET socket pair (`sandbox_runner.serve` gives the protocol). It runs as this
    process's user, ends when the socket closes or this process dies, and is replaced if it dies meanwhile."""

    def __init__(self, python: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-u", "-B", str(RUNNER), "--serve", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), env=_BASE_ENV, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, cfg: dict, env: dict[str, str], cwd: str, out_w: int, err_w: int) -> int:
        """Fork a runner for ``cfg`` (the runner's config); returns its pid."""
        self.send({"cfg": cfg, "env": env, "cwd": cwd}, (out_w, err_w))
        reply = self.receive()
        if "pid" not in reply:
            raise OSError(f"the sandbox's process server could not start a runner: {reply.get('error', reply)}")
        return reply["pid"]

    def receive(self, block: bool = True) -> dict | None:
        """The next message (None: none waiting, ``block=False``); ConnectionError if the server has ended."""
        try:
            data = self.sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if not data:
            raise self._ended()
        return json.loads(data)

    def send(self, message: dict, fds: tuple[int, ...] = ()) -> None:
        """Send ``message`` (with ``fds`` attached); ConnectionError if the server has ended."""
        try:
            socket.send_fds(self.sock, [json.dumps(message).encode()], list(fds))
        except OSError:
            raise self._ended() from None

    def _ended(self) -> ConnectionError:
        try:
            code = self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        return ConnectionError(f"the python sandbox's process server (pid {self.proc.pid}) ended"
                               + ("" if code is None else f" with exit code {code}"))

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _ServerRun:
    """A runner forked by a `_ProcessServer` (the server's child: it reaps it)."""

    def __init__(self, server: _ProcessServer, pid: int):
        self.server, self.pid, self._exited = server, pid, False

    def exited(self) -> bool:
        """Whether the runner has exited (not reaped); a server that ended counts as exited."""
        if not self._exited:
            try:
                self._exited = bool((self.server.receive(block=False) or {}).get("exited"))
            except ConnectionError:
                self._exited = True
        return self._exited

    def finish(self, uid: int | None) -> int:
        """Kill everything of the run (`sandbox_runner._finish`) and reap the runner; its exit code."""
        try:
            self.server.send({"finish": uid})
            while True:
                reply = self.server.receive()
                if "status" in reply:
                    return reply["status"]
        except OSError:  # the server died (ConnectionError included): kill from here
            _kill_uid(uid)
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            raise


class _SpawnedRun:
    """A runner started as a fresh interpreter (launcher "spawn"), a child of this process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def exited(self) -> bool:
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def finish(self, uid: int | None) -> int:
        """SIGKILL everything the run started, then reap the runner; its exit code.

        With a private uid ("full", "user"): ``kill(-1, SIGKILL)`` as that uid kills every process of the run
        (at "full" the cell is PID 1 of its PID namespace, whose death also makes the kernel kill and reap
        everything in it; the root runner then exits by itself). At every level the runner's process group is
        SIGKILLed, before the runner is reaped so that its process-group id cannot have been reused.
        """
        if uid is not None:
            _kill_uid(uid)
            deadline = time.monotonic() + 1.0
            while not self.exited() and time.monotonic() < deadline:
                time.sleep(0.002)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()


class PythonSandbox:
    """The ``python`` tool. ``sandbox(code) -> ToolResult``; thread-safe; see the module docstring."""

    name = "python"

    def __init__(self, config: SandboxConfig | None = None, max_workers: int = 4):
        self.config = config or SandboxConfig()
        if not 1 <= max_workers <= UID_BLOCK:
            raise ValueError(f"PythonSandbox max_workers must be in [1, {UID_BLOCK}], got {max_workers}")
        wanted = self.config.isolation
        is_root = os.geteuid() == 0
        if wanted in ("full", "user") and not is_root:
            raise ValueError(f"SandboxConfig(isolation={wanted!r}) needs root (uid switch, namespaces)")
        self.max_workers = max_workers
        self._servers: list[_ProcessServer | None] = [None] * max_workers  # "zygote": started at a slot's first run
        self.work_root = Path(self.config.work_root or tempfile.gettempdir()).resolve()
        if not self.work_root.is_dir():
            raise ValueError(f"python sandbox work_root {str(self.work_root)!r} is not a directory")
        self.uids: list[int | None] = [None] * max_workers
        if is_root and wanted != "basic":
            _check_traversable(self.work_root)
            base = self.config.uid_base
            if base is None:
                block = ((os.getpid() & 0xFFFF) << 4) | (next(_instance_counter) & 0xF)
                base = UID_REGION + block * UID_BLOCK
            _check_uid_block(base, max_workers)
            self.uids = [base + i for i in range(max_workers)]
        candidates = {"auto": ["full", "user", "basic"] if is_root else ["basic"]}.get(wanted, [wanted])
        failures = []
        for level in candidates:
            reason = None if level == "basic" else self._probe(level)
            if reason is None:
                self.level = level
                break
            failures.append(f"{level!r}: {reason}")
        else:
            raise ValueError(f"SandboxConfig(isolation={wanted!r}) does not work here: {'; '.join(failures)}")
        if failures:
            log.warning("python sandbox runs with isolation %r (%s)", self.level, "; ".join(failures))
        if self.level == "basic":
            self.uids = [None] * max_workers
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(max_workers):
            self._slots.put(slot)

    def close(self) -> None:
        """End the slots' process servers (each also ends by itself when this process exits)."""
        for slot, server in enumerate(self._servers):
            if server is not None:
                server.close()
                self._servers[slot] = None

    def _probe(self, level: str) -> str | None:
        """None if isolation `level` runs `PROBE_CODE` correctly here, else what went wrong (cached)."""
        key = (self.config.python, str(self.work_root), level)
        with _PROBE_LOCK:
            if key not in _PROBES:
                self.level = level
                try:
                    r = self._run_in_slot(PROBE_CODE, 60.0, 0, time.monotonic())
                    _PROBES[key] = None if r.ok and r.text == "42" else (r.error or r.text)[:500]
                except OSError as exc:
                    _PROBES[key] = f"{type(exc).__name__}: {exc}"
            return _PROBES[key]

    def __call__(self, input_text: str) -> ToolResult:
        return self.run(input_text)

    def run(self, code: str, timeout_s: float | None = None) -> ToolResult:
        """Execute `code` (a Markdown fence around it is removed) and return its output as a `ToolResult`.

        ok is True iff the process exited with status 0 within the limits. The text is stdout followed by
        stderr (tracebacks), plus an ``[error] ...`` line for failures that print nothing themselves
        (timeout, signals, output cap), cut to ``max_result_chars``.
        """
        timeout = self.config.timeout_s if timeout_s is None else float(timeout_s)
        slot = self._slots.get()
        start = time.monotonic()
        try:
            return self._run_in_slot(strip_code_fence(code), timeout, slot, start)
        except Exception as exc:  # noqa: BLE001 - a sandbox failure is a result, never an exception
            return error_result(f"python sandbox failure: {type(exc).__name__}: {exc}", time.monotonic() - start)
        finally:
            self._slots.put(slot)

    # -- internals --------------------------------------------------------------------------------------------

    def _runner_config(self, run_dir: str, code_path: str, timeout: float, uid: int | None) -> dict:
        cfg = self.config
        return {
            "namespaces": self.level == "full",
            "run_dir": run_dir,
            "code_path": code_path,
            "uid": uid,
            "gid": uid,
            "memory_mb": cfg.memory_mb,
            "cpu_seconds": cfg.cpu_seconds if cfg.cpu_seconds is not None else math.ceil(timeout) + 1,
            "file_size_mb": cfg.file_size_mb,
            "disk_mb": cfg.disk_mb,
            "max_processes": cfg.max_processes,
            "max_open_files": cfg.max_open_files,
        }

    @staticmethod
    def _environment(run_dir: str) -> dict[str, str]:
        return {**_BASE_ENV, "HOME": run_dir, "TMPDIR": run_dir}

    def _run_in_slot(self, code: str, timeout: float, slot: int, start: float) -> ToolResult:
        uid = self.uids[slot]
        run_dir = tempfile.mkdtemp(prefix="appo-python-", dir=self.work_root)
        try:
            code_path = os.path.join(run_dir, ".cell.py")
            with open(code_path, "w", encoding="utf-8") as f:
                f.write(code)
            if uid is not None:
                os.chmod(code_path, 0o600)  # root-only: the runner reads and deletes it before dropping
                os.chown(run_dir, uid, uid)
                os.chmod(run_dir, 0o700)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                try:
                    run = self._launch(slot, self._runner_config(run_dir, code_path, timeout, uid),
                                       self._environment(run_dir), run_dir, out_w, err_w)
                finally:
                    os.close(out_w)
                    os.close(err_w)
                try:
                    out, err, status = self._collect(out_r, err_r, run, start + timeout)
                finally:
                    returncode = run.finish(uid)
                out, err = self._drain(out_r, err_r, out, err)
            finally:
                os.close(out_r)
                os.close(err_r)
            return self._result(bytes(out), bytes(err), status, returncode, timeout, time.monotonic() - start)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _launch(self, slot: int, cfg: dict, env: dict[str, str], cwd: str, out_w: int, err_w: int):
        """Start the runner of one call with stdout / stderr on ``out_w`` / ``err_w``: a `_ServerRun` (launcher
        "zygote") or a `_SpawnedRun` ("spawn")."""
        if self.config.launcher == "spawn":
            return _SpawnedRun(subprocess.Popen(
                [self.config.python, "-I", "-u", "-B", str(RUNNER), json.dumps(cfg)], stdin=subprocess.DEVNULL,
                stdout=out_w, stderr=err_w, cwd=cwd, env=env, start_new_session=True, close_fds=True))
        for attempt in range(2):  # a server found dead (killed from outside) is replaced once
            server = self._servers[slot]
            if server is None or not server.alive():
                if server is not None:
                    server.close()
                server = self._servers[slot] = _ProcessServer(self.config.python)
            try:
                return _ServerRun(server, server.start(cfg, env, cwd, out_w, err_w))
            except ConnectionError:
                server.close()
                self._servers[slot] = None
                if attempt:
                    raise

    def _collect(self, out_fd: int, err_fd: int, run, deadline: float) -> tuple[bytearray, bytearray, str]:
        """Read stdout/stderr until both close, the runner exits, the deadline passes or the cap is hit.

        Returns (stdout, stderr, status) with status "exited" | "timeout" | "output". The runner is not reaped
        here (``run.finish`` does it, after the kills), so its pid / process-group id cannot be reused before the
        group is killed.
        """
        cap = self.config.max_output_bytes
        bufs = {out_fd: bytearray(), err_fd: bytearray()}
        total = 0
        with selectors.DefaultSelector() as sel:
            for fd in bufs:
                sel.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status = "timeout"
                    break
                if not sel.get_map():
                    status = "exited"  # both pipes closed: the process (and anything sharing them) is done
                    break
                for key, _ in sel.select(min(remaining, 0.05)):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    keep = max(0, min(len(chunk), cap - total))
                    bufs[key.fd].extend(chunk[:keep])
                    total += len(chunk)
                if total > cap:
                    status = "output"
                    break
                if run.exited():
                    status = "exited"  # orphans may still hold the pipes; they are killed next
                    break
        return bufs[out_fd], bufs[err_fd], status

    def _drain(self, out_fd: int, err_fd: int, out: bytearray, err: bytearray) -> tuple[bytearray, bytearray]:
        """After everything is dead, read what is left in the pipes (up to the cap)."""
        cap = self.config.max_output_bytes
        for fd, buf in ((out_fd, out), (err_fd, err)):
            os.set_blocking(fd, False)
            try:
                while len(out) + len(err) < cap:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    buf.extend(chunk[: cap - len(out) - len(err)])
            except BlockingIOError:
                pass  # a writer survived (basic isolation only); keep what we have
        return out, err

    def _result(self, out: bytes, err: bytes, status: str, returncode: int, timeout: float,
                seconds: float) -> ToolResult:
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        note = None
        if status == "timeout":
            error = f"timeout: execution exceeded the {timeout:g} s wall-clock limit"
            note = error
        elif status == "output":
            error = f"output limit exceeded: more than {self.config.max_output_bytes} bytes printed"
            note = error
        elif returncode == SETUP_FAILED and stderr.startswith(SETUP_PREFIX):
            error = stderr.strip()
            return error_result(error, seconds)
        elif returncode < 0:
            sig = -returncode
            error = f"{_signal_name(sig)}: {_SIGNAL_HINTS.get(sig, 'terminated by a signal')}"
            note = error
        elif returncode != 0:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            error = lines[-1].strip()[:500] if returncode == 1 and lines else f"exit code {returncode}"
            if not (returncode == 1 and lines):
                note = error
        else:
            error = None
        text = stdout
        if stderr:
            text += ("" if not text or text.endswith("\n") else "\n") + stderr
        if note:
            text += ("" if not text or text.endswith("\n") else "\n") + f"[error] {note}"
        text = truncate_middle(text.rstrip("\n"), self.config.max_result_chars)
        return ToolResult(text=text, ok=error is None, error=error, seconds=seconds)
