"""The CPU kernels' shared library: built on first use, registered with XLA, and the reason when it cannot be.

The C++ sources of this package (``cpu_panel_matmul.cc``: `appo_jax.kernels.cpu_matmul`;
``cpu_decode_attention.cc``: `appo_jax.kernels.cpu_attention`; both on ``cpu_vectors.h``) are compiled into one
library with the system's C++ compiler (``$CXX``, else ``g++``; ``-O3 -march=native``) against the FFI headers
shipped with jaxlib, into ``$APPO_JAX_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/appo_jax/kernels``), keyed by the
sources, the compiler, its flags, the jaxlib version and the CPU's vector extensions, under a file lock (one build
at a time; other processes wait for it). `kernel_status` says whether the kernels are usable and, if not, why (no
compiler, a failed build, a CPU without AVX2 + FMA, a non-CPU backend); callers fall back to XLA then.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

from appo_jax.compilation_cache import user_cache_dir

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_panel_matmul.cc", HERE / "cpu_decode_attention.cc")
HEADERS = (HERE / "cpu_vectors.h",)
CACHE_ENV = "APPO_JAX_KERNEL_CACHE"
#: FFI target -> the library's handler symbol.
TARGETS = {"appo_panel_matmul": "AppoPanelMatmul", "appo_panel_matmul_bf16": "AppoPanelMatmulBf16",
           "appo_panel_matmul_add": "AppoPanelMatmulAdd", "appo_panel_matmul_add_bf16": "AppoPanelMatmulAddBf16",
           "appo_panel_swiglu": "AppoPanelSwiglu", "appo_panel_swiglu_bf16": "AppoPanelSwigluBf16",
           "appo_decode_attention": "AppoDecodeAttention"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def kernel_cache_dir() -> Path:
    """``$APPO_JAX_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/appo_jax/kernels`` (``~/.cache/appo_jax/kernels``)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return user_cache_dir("kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1]
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "g++")


def _build(cxx: str) -> Path:
    """The shared library for these sources / compiler / jaxlib / CPU, built into the cache if it is not there."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [*(p.read_text() for p in SOURCES + HEADERS), cxx, version, " ".join(_FLAGS), jaxlib.__version__,
             " ".join(sorted(_cpu_flags().split()))]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = kernel_cache_dir() / f"appo_cpu_kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: other processes wait for it, then find the file
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(out)]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
            os.replace(out, target)  # atomic: a reader never sees a partial file
    return target


@functools.lru_cache(maxsize=1)
def kernel_status() -> tuple[bool, str]:
    """(usable, why): built (or found in the cache) and registered with XLA for the CPU, or the reason not."""
    if jax.default_backend() != "cpu":
        return False, f"the default backend is {jax.default_backend()}, not the CPU"
    flags = set(_cpu_flags().split())
    if not ({"avx512f"} <= flags or {"avx2", "fma"} <= flags):
        return False, "this CPU has neither AVX-512 nor AVX2 + FMA"
    cxx = _compiler()
    if cxx is None:
        return False, f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return False, f"building the CPU kernels failed: {err}"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True, f"built with {cxx}"


def kernel_available() -> bool:
    return kernel_status()[0]
