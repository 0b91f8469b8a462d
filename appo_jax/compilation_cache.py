"""JAX's persistent compilation cache for the command line: a second run of the same command skips compiling.

The CLI turns the cache on before any JAX work (``appo-jax --no-compile-cache ...`` turns it off). The directory
is, in order: ``--compile-cache-dir``, ``$APPO_JAX_COMPILE_CACHE`` (``off`` disables it), else
``$XDG_CACHE_HOME/appo_jax/jax_compilation`` (``~/.cache/appo_jax/jax_compilation``). Every compiled program is
cached, however short its compile time: the sampler's many small shape variants are what a second
``appo-jax generate`` would otherwise compile again.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

CACHE_ENV = "APPO_JAX_COMPILE_CACHE"


def default_cache_dir() -> Path | None:
    """The cache directory from ``$APPO_JAX_COMPILE_CACHE`` / ``$XDG_CACHE_HOME`` (None when set to ``off``)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "appo_jax" / "jax_compilation"


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
