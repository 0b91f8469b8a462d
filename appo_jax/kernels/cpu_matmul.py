"""Skinny float32 matrix products for decoding on a CPU: ``x[M, K] . w`` with a few rows, every weight read once.

A decode step multiplies a handful of rows (the batch) by every weight matrix, so it is bound by reading the
weights from memory. XLA's CPU dot streams them well for one row but reads them 1.2-1.4x slower than this kernel
at 2-8 rows (`KERNEL_ROWS`, ``benchmarks/cpu_matmul.py``). `skinny_matmul` is a C++ kernel
(``cpu_skinny_matmul.cc``, AVX-512 or AVX2 + FMA, on XLA's intra-op thread pool) called through the XLA FFI:

    skinny_matmul(x, w)                   y[m, n] = sum_k x[m, k] w[k, n]     (w [K, N]: the model's kernels)
    skinny_matmul(x, w, w_transposed=True)  y[m, n] = sum_k x[m, k] w[n, k]   (w [N, K]: a tied embedding)

x and y float32; w float32 or bfloat16 (`WEIGHT_DTYPES`: bf16 weights are widened to float32 in registers, so a
step reads half the bytes with the same float32 arithmetic); accumulated in float32 in another order than XLA's
dot, so results agree to float32 rounding (~1e-6 relative).

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``; ``-O3
-march=native``) against the FFI headers shipped with jaxlib, into ``$APPO_JAX_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/appo_jax/kernels``), keyed by the source, the compiler, its flags, the jaxlib version and the
CPU's vector extensions. `kernel_status` says whether it is usable and, if not, why (no compiler, a failed
build, a CPU without AVX2 + FMA, a non-CPU backend); callers fall back to XLA's dot then.
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
import jax.numpy as jnp
import jaxlib

from appo_jax.compilation_cache import user_cache_dir

SOURCE = Path(__file__).with_name("cpu_skinny_matmul.cc")
CACHE_ENV = "APPO_JAX_KERNEL_CACHE"
#: The row counts for which `use_kernel` says yes: where the kernel read the weights faster than XLA's dot in
#: ``python benchmarks/cpu_matmul.py`` (2-core AMD EPYC, AVX-512; GB/s kernel vs XLA): [N, K] weights (a tied
#: embedding) at 2-8 rows (24.8 vs 17.8 at 2, 19.1 vs 14.5 at 8), [K, N] at 2-4 rows (25.0 vs 21.0 at 2, 24.0 vs
#: 19.7 at 4). One row (27.5 vs 29.8 and 28.1 vs 32.2: XLA's dot streams as fast) and [K, N] with 5-8 rows (15.7
#: vs 16.7 at 8) stay with XLA.
KERNEL_ROWS = {False: range(2, 5), True: range(2, 9)}
_SYMBOLS = {"appo_skinny_kn": "AppoSkinnyKn", "appo_skinny_nk": "AppoSkinnyNk",
            "appo_skinny_kn_bf16": "AppoSkinnyKnBf16", "appo_skinny_nk_bf16": "AppoSkinnyNkBf16"}
#: Weight dtypes the kernel reads (bfloat16: widened to float32 in registers, float32 accumulation).
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)
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
    """The shared library for this source / compiler / jaxlib / CPU, built into the cache if it is not there."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, " ".join(_FLAGS), jaxlib.__version__,
                                    " ".join(sorted(_cpu_flags().split()))]).encode()).hexdigest()[:16]
    target = kernel_cache_dir() / f"cpu_skinny_matmul-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: other processes wait for it, then find the file
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
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
        return False, f"building {SOURCE.name} failed: {err}"
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True, f"built with {cxx}"


def kernel_available() -> bool:
    return kernel_status()[0]


def use_kernel(rows: int, *, w_transposed: bool = False, weight_dtype=jnp.float32) -> bool:
    """Whether a product of ``rows`` rows should go to the kernel, it being built: float32 weights at
    `KERNEL_ROWS`, bfloat16 weights at 1-8 rows (XLA's dot would widen every weight to float32 first)."""
    rows_ok = rows in (range(1, 9) if jnp.dtype(weight_dtype) == jnp.bfloat16 else KERNEL_ROWS[w_transposed])
    return rows_ok and kernel_available()


def skinny_matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool = False) -> jax.Array:
    """float32 ``x[M, K] . w[K, N]`` (``w_transposed``: ``x . w[N, K]^T``) by the kernel (module doc), for any M
    (passes of 8 rows over the weights). The caller checks `kernel_available` (or `use_kernel`)."""
    if x.ndim != 2 or w.ndim != 2 or x.dtype != jnp.float32 or w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"skinny_matmul: float32 x [M, K] and float32 / bfloat16 w, got {x.shape} {x.dtype} and "
                         f"{w.shape} {w.dtype}")
    k_axis, n_axis = (1, 0) if w_transposed else (0, 1)
    if w.shape[k_axis] != x.shape[1]:
        raise ValueError(f"skinny_matmul: x {x.shape} and w {w.shape} (w_transposed={w_transposed}) do not contract")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[n_axis]), jnp.float32)
    target = "appo_skinny_" + ("nk" if w_transposed else "kn") + ("_bf16" if w.dtype == jnp.bfloat16 else "")
    return jax.ffi.ffi_call(target, out)(x, w)
