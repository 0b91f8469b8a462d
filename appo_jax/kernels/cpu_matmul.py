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

    panel_matmul(x, wp, n)               y[m, j] = sum_k x'[m, k] wp[j // 48, k, j % 48]   (j < n)
    panel_matmul(x, wp, n, residual=r)   y[m, j] = r[m, j] + sum_k x[m, k] wp[j // 48, k, j % 48]
    panel_swiglu(x, wgu, n)              y[m, j] = silu(g[m, j]) u[m, j],
                                         g / u[m, j] = sum_k x'[m, k] wgu[j // 48, 0 / 1, k, j % 48]

    x' = x, or with norm=(s, eps) rms_norm(x, s, eps) (`rms_norm`: the decoder's RMSNorm) in the kernel's prologue

for at most `KERNEL_MAX_ROWS` rows (a decode step); more rows (a prefill) go to XLA's dot over the same panels.
The norm, the residual and the SwiGLU product are the kernel's prologue and epilogue (no XLA op and no pass
over memory of their own: such small ops took ~4.5 of a 25 ms SmolLM2 step at batch 8); `pack_swiglu` stores a
gate's and an up projection's panels p side by side, so one thread streams both and multiplies in place.
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
import numpy as np

from appo_jax.kernels.build import kernel_available

#: Columns of a panel (three AVX-512 vectors; `pack_panels`).
PANEL = 48
#: Products of at most this many rows go to the kernel, more to XLA's dot: ``python benchmarks/cpu_matmul.py --rows
#: 1,2,4,8,16,32,64,128`` (2-core AMD EPYC) had the kernel ahead at every count, 2.0-2.7x at 2-8 rows and still
#: 1.16x / 1.19x at 128 (layers / LM head); larger counts are not measured.
KERNEL_MAX_ROWS = 128
#: Weight dtypes the kernel reads (bfloat16: widened to float32 in registers, float32 accumulation).
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype=None) -> jax.Array:
    """scale * (x / sqrt(mean(x^2, -1) + eps)): statistics in float32, the normalised x cast to ``dtype`` (default
    x's) before the scale (HF order)."""
    dtype = x.dtype if dtype is None else dtype
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * normed.astype(dtype)


def pack_panels(w: jax.Array) -> jax.Array:
    """w [K, N] as column panels wp [ceil(N / PANEL), K, PANEL]: wp[p, k, c] = w[k, PANEL p + c], zeros past N."""
    k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
    return w.reshape(k, panels, PANEL).transpose(1, 0, 2)


def pack_swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gate, up [K, N] as wgu [ceil(N / PANEL), 2, K, PANEL]: wgu[p, 0] / wgu[p, 1] = `pack_panels` (gate / up)[p]."""
    if gate.shape != up.shape:
        raise ValueError(f"pack_swiglu: gate and up must have one shape, got {gate.shape} and {up.shape}")
    return jnp.stack([pack_panels(gate), pack_panels(up)], axis=1)


def panel_columns(wp: jax.Array, columns: jax.Array) -> jax.Array:
    """Columns of the packed w (`pack_panels`): out[..., k] = w[k, columns[...]] = wp[j // PANEL, k, j % PANEL]."""
    return wp[columns // PANEL, :, columns % PANEL]


def _check(x: jax.Array, wp: jax.Array, n: int, parts: int = 1) -> None:
    shape = "[panels, K, 48]" if parts == 1 else f"[panels, {parts}, K, 48]"
    if (x.ndim != 2 or wp.ndim != 3 + (parts > 1) or wp.shape[-1] != PANEL or wp.shape[-2] != x.shape[1]
            or (parts > 1 and wp.shape[1] != parts)):
        raise ValueError(f"panel products: x [M, K] and wp {shape}, got {x.shape} and {wp.shape}")
    if not (wp.shape[0] - 1) * PANEL < n <= wp.shape[0] * PANEL:
        raise ValueError(f"panel products: {wp.shape[0]} panels of {PANEL} columns do not hold n = {n} columns")


#: (scale [K], eps): x's rows go through `rms_norm` first (the kernel's prologue).
Norm = tuple[jax.Array, float]


def _kernel_dtypes(x: jax.Array, wp: jax.Array, residual: jax.Array | None = None) -> bool:
    return (x.dtype == jnp.float32 and wp.dtype in WEIGHT_DTYPES
            and (residual is None or residual.dtype == jnp.float32))


def _call(target: str, x: jax.Array, wp: jax.Array, n: int, residual: jax.Array | None = None,
          norm: Norm | None = None) -> jax.Array:
    if not _kernel_dtypes(x, wp, residual):
        raise ValueError(f"{target}: float32 x (and residual) and float32 / bfloat16 wp, got {x.dtype} and "
                         f"{wp.dtype}")
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    suffix = "_bf16" if wp.dtype == jnp.bfloat16 else ""
    if residual is not None:
        if residual.shape != out.shape:
            raise ValueError(f"{target}: the residual must be [M, n] = {out.shape}, got {residual.shape}")
        return jax.ffi.ffi_call(target + "_add" + suffix, out)(x, wp, residual)
    scale, eps = norm if norm is not None else (jnp.zeros((0,), jnp.float32), 0.0)
    if norm is not None and scale.shape != (x.shape[1],):
        raise ValueError(f"{target}: the norm scale must be [K] = [{x.shape[1]}], got {scale.shape}")
    return jax.ffi.ffi_call(target + suffix, out)(x, scale.astype(jnp.float32), wp, eps=np.float32(eps))


def kernel_matmul(x: jax.Array, wp: jax.Array, n: int, residual: jax.Array | None = None,
                  norm: Norm | None = None) -> jax.Array:
    """y [M, n] = (residual [M, n] +) x' [M, K] . w [K, n] by the kernel, for float32 x and residual, any M (passes
    of 8 rows), w packed as ``wp`` (`pack_panels`) in a `WEIGHT_DTYPES` dtype, x' = ``rms_norm(x, *norm)`` or x
    (a residual or a norm, not both). The caller checks `kernel_available`."""
    _check(x, wp, n)
    if residual is not None and norm is not None:
        raise ValueError("kernel_matmul: a residual or a norm, not both")
    return _call("appo_panel_matmul", x, wp, n, residual, norm)


def kernel_swiglu(x: jax.Array, wgu: jax.Array, n: int, norm: Norm | None = None) -> jax.Array:
    """y [M, n] = silu(x' . gate) * (x' . up) by the kernel, for float32 x, any M, gate / up [K, n] packed as
    ``wgu`` (`pack_swiglu`), x' = ``rms_norm(x, *norm)`` or x. The caller checks `kernel_available`."""
    _check(x, wgu, n, parts=2)
    return _call("appo_panel_swiglu", x, wgu, n, norm=norm)


def _use_kernel(x: jax.Array, wp: jax.Array, residual: jax.Array | None = None) -> bool:
    return _kernel_dtypes(x, wp, residual) and x.shape[0] <= KERNEL_MAX_ROWS and kernel_available()


def _xla_panels(x: jax.Array, wp: jax.Array, n: int) -> jax.Array:
    """float32 x . w over the panels wp [panels, K, 48] by XLA's dot (x's dtype in, float32 accumulation)."""
    y = jnp.einsum("mk,pkc->mpc", x, wp.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.reshape(x.shape[0], -1)[:, :n]


def panel_matmul(x: jax.Array, wp: jax.Array, n: int, residual: jax.Array | None = None,
                 norm: Norm | None = None) -> jax.Array:
    """y [M, n] = (residual +) x' [M, K] . w [K, n] for w packed as ``wp`` (`pack_panels`), x' = ``rms_norm(x,
    *norm)`` or x: `kernel_matmul` for float32 x (and residual) of at most `KERNEL_MAX_ROWS` rows when the kernel
    is built (module doc), else XLA's dot in x's dtype over the same panels (float32 accumulation), the residual
    added in its dtype."""
    _check(x, wp, n)
    if residual is not None and norm is not None:
        raise ValueError("panel_matmul: a residual or a norm, not both")
    if _use_kernel(x, wp, residual):
        return kernel_matmul(x, wp, n, residual, norm)
    x = x if norm is None else rms_norm(x, *norm)
    y = _xla_panels(x, wp, n).astype(x.dtype)
    return y if residual is None else residual + y.astype(residual.dtype)


def panel_swiglu(x: jax.Array, wgu: jax.Array, n: int, norm: Norm | None = None) -> jax.Array:
    """y [M, n] = silu(x' . gate) * (x' . up) for gate / up packed as ``wgu`` (`pack_swiglu`), x' = ``rms_norm(x,
    *norm)`` or x: `kernel_swiglu` where `panel_matmul` would use the kernel, else XLA's dots in x's dtype (float32
    accumulation) and the product in x's dtype."""
    _check(x, wgu, n, parts=2)
    if _use_kernel(x, wgu):
        return kernel_swiglu(x, wgu, n, norm)
    x = x if norm is None else rms_norm(x, *norm)
    gate, up = (_xla_panels(x, wgu[:, i], n).astype(x.dtype) for i in range(2))
    return jax.nn.silu(gate) * up
