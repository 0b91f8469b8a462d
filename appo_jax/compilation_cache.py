"""JAX's persistent compilation cache for the command line (a second run of the same command skips compiling), and
a count of what this process compiled.

The CLI turns the cache on before any JAX work (``appo-jax --no-compile-cache ...`` turns it off). The directory
is, in order: ``--compile-cache-dir``, ``$APPO_JAX_COMPILE_CACHE`` (``off`` disables it), else
``$XDG_CACHE_HOME/appo_jax/jax_compilation`` (``~/.cache/appo_jax/jax_compilation``). Every compiled program is
cached, however short its compile time: the sampler's many small shape variants are what a second
``appo-jax generate`` would otherwise compile again.

`compile_counts` reads counters fed by ``jax.monitoring`` listeners (registered on import): every XLA program
this process asked for, by jitted function name, split into *compiled* (the backend compiled it) and *loaded*
(the persistent cache had it). JAX records a cache hit just before it closes the program's compile event, on the
same thread, which is how a hit is attributed to its function.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections import Counter
from pathlib import Path

import jax
import jax.monitoring

CACHE_ENV = "APPO_JAX_COMPILE_CACHE"
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_TIME_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/appo_jax/<name>`` (``~/.cache/appo_jax/<name>``): the project's default cache place."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "appo_jax" / name


def default_cache_dir() -> Path | None:
    """The cache directory from ``$APPO_JAX_COMPILE_CACHE`` / ``$XDG_CACHE_HOME`` (None when set to ``off``)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    return user_cache_dir("jax_compilation")


def enable_compilation_cache(path: str | os.PathLike | None) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (created if needed) for every later compile; None
    leaves the cache off. Returns the directory used. A directory that cannot be created raises
    ``FileNotFoundError`` naming it."""
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileNotFoundError(f"compilation cache dir {str(path)!r} cannot be created: {err}") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def active_cache_dir() -> str | None:
    """The persistent cache directory JAX uses now (None when the cache is off)."""
    return jax.config.jax_compilation_cache_dir or None


@dataclasses.dataclass(frozen=True)
class CompileCounts:
    """Programs this process asked XLA for since start: ``compiled`` / ``loaded`` (from the persistent cache) per
    jitted function name, ``compile_s`` (seconds in the backend, hits included) and ``saved_s`` (the compile
    time the cache hits saved, as recorded when the entries were written)."""

    compiled: Counter
    loaded: Counter
    compile_s: float
    saved_s: float

    def __sub__(self, other: "CompileCounts") -> "CompileCounts":
        return CompileCounts(self.compiled - other.compiled, self.loaded - other.loaded,
                             self.compile_s - other.compile_s, self.saved_s - other.saved_s)

    def describe(self) -> str:
        """``"N programs compiled (S s), M loaded from the persistent cache (saving T s)"``."""
        n, m = sum(self.compiled.values()), sum(self.loaded.values())
        text = f"{n} program(s) compiled ({self.compile_s:.1f} s)"
        if m:
            text += f", {m} loaded from the persistent compilation cache (saving {self.saved_s:.1f} s)"
        return text


class _Listener:
    def __init__(self):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.compiled, self.loaded = Counter(), Counter()
        self.compile_s = self.saved_s = 0.0

    def event(self, event: str, **_) -> None:
        if event == _CACHE_HIT:
            self.local.hit = True

    def duration(self, event: str, seconds: float, **kw) -> None:
        if event == _TIME_SAVED:
            with self.lock:
                self.saved_s += seconds
        elif event == _BACKEND_COMPILE:
            hit, self.local.hit = getattr(self.local, "hit", False), False
            with self.lock:
                (self.loaded if hit else self.compiled)[kw.get("fun_name", "?")] += 1
                self.compile_s += seconds

    def snapshot(self) -> CompileCounts:
        with self.lock:
            return CompileCounts(Counter(self.compiled), Counter(self.loaded), self.compile_s, self.saved_s)


_LISTENER = _Listener()
jax.monitoring.register_event_listener(_LISTENER.event)
jax.monitoring.register_event_duration_secs_listener(_LISTENER.duration)


def compile_counts() -> CompileCounts:
    """What this process compiled so far (module doc); subtract two snapshots for what happened in between."""
    return _LISTENER.snapshot()
