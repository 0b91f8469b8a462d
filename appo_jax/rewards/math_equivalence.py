"""Math answer equivalence with `math-verify`, safe to call from any thread.

math-verify bounds its parse / compare steps with ``signal.alarm``, which only works in the main thread of the
main interpreter (elsewhere it raises ``ValueError``). `MathVerifier.equal` therefore picks a strategy per call:

* main thread: math-verify in-process with its own signal timeouts (``ceil(timeout_s)`` seconds per step);
* other threads, ``off_main_thread="process"`` (default): the comparison is sent to a pool of worker processes
  (`appo_jax.rewards.math_worker`, at most ``max_workers``, started lazily, ~1-2 s each); the caller waits at most
  ``timeout_s``; on timeout the worker is killed (replaced on demand) and the answer counts as not equal;
* other threads, ``off_main_thread="inline"``: math-verify in the calling thread with its timeouts *disabled*
  — fastest, but a pathological expression can block that thread indefinitely.

``equal(prediction, gold)`` is True iff math-verify finds the two answer strings equivalent (both are parsed as
``\\boxed{...}``; unparsable -> False). Timeouts and errors give False, never an exception.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from appo_jax.rewards.math_worker import verify_equal

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("math_worker.py")
OFF_MAIN_THREAD = ("process", "inline")
WORKER_START_TIMEOUT_S = 120.0


class _Worker:
    """One math_worker.py process with line-oriented JSON pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0, close_fds=True,
        )
        self._buf = b""
        if self._readline(time.monotonic() + WORKER_START_TIMEOUT_S) != b"ready":
            self.kill()
            raise RuntimeError("math-verify worker process failed to start (is math-verify installed?)")

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ask(self, prediction: str, gold: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None if it did not answer within `timeout_s` (or died)."""
        try:
            self.proc.stdin.write((json.dumps({"p": prediction, "g": gold}) + "\n").encode())
        except OSError:
            return None
        line = self._readline(time.monotonic() + timeout_s)
        return None if line is None else bool(json.loads(line)["equal"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


class MathVerifier:
    """Thread-safe math-verify equivalence with a time limit (module docstring)."""

    def __init__(self, timeout_s: float = 5.0, off_main_thread: str = "process", max_workers: int = 2):
        if off_main_thread not in OFF_MAIN_THREAD:
            raise ValueError(f"off_main_thread must be one of {OFF_MAIN_THREAD}, got {off_main_thread!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.timeout_s, self.off_main_thread, self.max_workers = float(timeout_s), off_main_thread, max_workers
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_workers)
        self._closed = False

    def equal(self, prediction: str | None, gold: str) -> bool:
        """True iff `prediction` is mathematically equivalent to `gold` (None / timeout / error -> False)."""
        if prediction is None or not prediction.strip() or not str(gold).strip():
            return False
        if threading.current_thread() is threading.main_thread():
            return self._inline(prediction, str(gold), self.timeout_s)
        if self.off_main_thread == "inline":
            return self._inline(prediction, str(gold), None)
        return self._in_worker(prediction, str(gold))

    def equal_any(self, prediction: str | None, golds: Sequence[str]) -> bool:
        """True iff `prediction` is equivalent to at least one of `golds`."""
        return any(self.equal(prediction, g) for g in golds)

    @staticmethod
    def _inline(prediction: str, gold: str, timeout_s: float | None) -> bool:
        try:
            return verify_equal(prediction, gold, timeout_s)
        except Exception:  # noqa: BLE001 - math-verify failures mean "not shown equal"
            log.debug("math-verify failed on %r vs %r", prediction, gold, exc_info=True)
            return False

    def _in_worker(self, prediction: str, gold: str) -> bool:
        with self._slots:
            for _attempt in range(2):  # one retry when a worker turns out to be dead
                try:
                    worker = self._idle.get_nowait()
                except queue.Empty:
                    worker = _Worker()
                if worker.proc.poll() is not None:
                    worker.kill()
                    continue
                verdict = worker.ask(prediction, gold, self.timeout_s)
                if verdict is None:
                    worker.kill()
                    if worker.proc.returncode == -9:  # we killed it: a timeout, not a crash
                        log.warning("math-verify timed out after %.1f s on %.200r", self.timeout_s, prediction)
                        return False
                    continue
                if self._closed:
                    worker.kill()
                else:
                    self._idle.put(worker)
                return verdict
        return False

    def close(self) -> None:
        """Stop the idle worker processes (busy ones stop when their call returns)."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


_DEFAULT: MathVerifier | None = None
_DEFAULT_LOCK = threading.Lock()


def default_math_verifier() -> MathVerifier:
    """The process-wide `MathVerifier` (5 s, process workers off the main thread), created on first use."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MathVerifier()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def math_equal(prediction: str | None, gold: str) -> bool:
    """`MathVerifier.equal` of the default verifier."""
    return default_math_verifier().equal(prediction, gold)
