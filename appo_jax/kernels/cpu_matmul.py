"""Skinny float32 products for decoding on a CPU: ``x[M, K] . w[K, N]`` with a few rows, every weight read once.

A decode step multiplies a handful of rows (the batch) by every weight matrix, so it is bound by reading the
weights from memory. XLA's CPU dot reads a [K, N] matrix at 15-30 GB/s for 1-8 rows; this kernel reads the same
weights stored as column panels at the streaming bandwidth up to 4 rows, within ~15% of it at 8 (where its
multiply-adds start to bound it) and faster than XLA's dot up to 128 rows (``benchmarks/cpu_matmul.py``). The
layout (`pack_panels`):

    wp[p, k, c] = w[k, 48 p + c]    (wp [ceil(N / 48), K, 48]; columns past N are zeros)

so that one panel, all K rows of 48 columns, is one contiguous stream whose 8 x 48 sums stay in registers, and
each thread of XLA's intra-op pool owns a contiguous range of panels. `panel_matmul` is a C++ kernel
(``cpu_panel_matmul.cc``, AVX-512 or AVX2 + FMA) called through the XLA FFI:

    panel_matmul(x, wp, n)     y[m, j] = sum_k x[m, k] wp[j // 48, k, j % 48]   (j < n)

for at most `KERNEL_MAX_ROWS` rows (a decode step); more rows (a prefill) go to XLA's dot over the same panels.
x and y float32; wp float32 or bfloat16 (`WEIGHT_DTYPES`: bf16 weights are widened to float32 in registers, so a
step reads half the bytes with the same float32 arithmetic); accumulated in float32 in another order than XLA's
dot, so results agree to float32 rounding (~1e-6 relative). `panel_columns` reads columns back (a tied
embedding's rows: its LM head is ``pack_panels(E^T)``).

The kernel is built and registered by `appo_jax.kernels.build` (`kernel_status` says whether it is usable and,
if not, why); `panel_matmul` falls back to XLA's dot without it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from appo_jax.kernels.build import kernel_available

#: Columns of a panel (three AVX-512 vectors; `pack_panels`).
PANEL = 48
#: Products of at most this many rows go to the kernel, more to XLA's dot: ``python benchmarks/cpu_matmul.py --rows
#: 1,2,4,8,16,32,64,128`` (2-core AMD EPYC) had the kernel ahead at every count, 2.0-2.7x at 2-8 rows and still
#: 1.16x / 1.19x at 128 (layers / LM head); larger counts are not measured.
KERNEL_MAX_ROWS = 128
#: Weight dtypes the kernel reads (bfloat16: widened to float32 in registers, float32 accumulation).
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)


def pack_panels(w: jax.Array) -> jax.Array:
    """w [K, N] as column panels wp [ceil(N / PANEL), K, PANEL]: wp[p, k, c] = w[k, PANEL p + c], zeros past N."""
    k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
    return w.reshape(k, panels, PANEL).transpose(1, 0, 2)


def panel_columns(wp: jax.Array, columns: jax.Array) -> jax.Array:
    """Columns of the packed w (`pack_panels`): out[..., k] = w[k, columns[...]] = wp[j // PANEL, k, j % PANEL]."""
    return wp[columns // PANEL, :, columns % PANEL]


def _check(x: jax.Array, wp: jax.Array, n: int) -> None:
    if x.ndim != 2 or wp.ndim != 3 or wp.shape[2] != PANEL or wp.shape[1] != x.shape[1]:
        raise ValueError(f"panel_matmul: x [M, K] and wp [panels, K, {PANEL}], got {x.shape} and {wp.shape}")
    if not (wp.shape[0] - 1) * PANEL < n <= wp.shape[0] * PANEL:
        raise ValueError(f"panel_matmul: {wp.shape[0]} panels of {PANEL} columns do not hold n = {n} columns")


def kernel_matmul(x: jax.Array, wp: jax.Array, n: int) -> jax.Array:
    """y [M, n] = x [M, K] . w [K, n] by the kernel, for float32 x, any M (passes of 8 rows), w packed as ``wp``
    (`pack_panels`) in a `WEIGHT_DTYPES` dtype. The caller checks `kernel_available`."""
    _check(x, wp, n)
    if x.dtype != jnp.float32 or wp.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"kernel_matmul: float32 x and float32 / bfloat16 wp, got {x.dtype} and {wp.dtype}")
    target = "appo_panel_matmul" + ("_bf16" if wp.dtype == jnp.bfloat16 else "")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, wp)


def panel_matmul(x: jax.Array, wp: jax.Array, n: int) -> jax.Array:
    """y [M, n] = x [M, K] . w [K, n] for w packed as ``wp`` (`pack_panels`): `kernel_matmul` for float32 x of at
    most `KERNEL_MAX_ROWS` rows when the kernel is built (module doc), else XLA's dot in x's dtype over the same
    panels (float32 accumulation)."""
    _check(x, wp, n)
    if x.dtype == jnp.float32 and wp.dtype in WEIGHT_DTYPES and x.shape[0] <= KERNEL_MAX_ROWS and kernel_available():
        return kernel_matmul(x, wp, n)
    y = jnp.einsum("mk,pkc->mpc", x, wp.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.reshape(x.shape[0], -1)[:, :n].astype(x.dtype)
