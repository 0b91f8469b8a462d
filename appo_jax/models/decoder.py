"""The Llama / Qwen2 / Qwen3 / SmolLM decoder as pure functions of a plain params pytree (Flax Linen inside).

Public API (docs/architecture.md, "Model"):
  init_params(config, rng) -> params            plain nested dict of arrays (layers stacked on axis 0)
  param_logical_axes(config) -> axes            same tree, leaves = tuples of logical axis names
  forward(params, tokens, positions, *, config, token_mask=None, cache=None, return_hidden=False)
      -> (float32 logits [B, T, V] | final-normed hidden [B, T, D], new_cache)
  unembed(params, hidden, *, config) -> float32 logits [..., V]
  unstack_layers(params) -> params              the layers as one subtree per layer (forward accepts both)
  pack_weights(params, config) -> params        unstacked, matrices as column panels (``cpu_kernels``)
  init_cache(config, batch, max_len) -> KVCache   (re-exported from kv_cache)

Parameter tree (names follow HF so that import/export is a rename):
  embed_tokens/embedding [V, D]; norm/scale [D]; lm_head/kernel [D, V] (untied only);
  layers/{input_layernorm/scale [L, D], post_attention_layernorm/scale [L, D],
          self_attn/{q_proj/kernel [L, D, H, hd], q_proj/bias [L, H, hd] (qkv_bias), k_proj/kernel [L, D, KV, hd],
                     v_proj/kernel [L, D, KV, hd], o_proj/kernel [L, H, hd, D], q_norm/scale, k_norm/scale [L, hd]},
          mlp/{gate_proj/kernel [L, D, F], up_proj/kernel [L, D, F], down_proj/kernel [L, F, D]}}.
Unstacked (`unstack_layers`): ``layers`` replaced by ``layers_0`` .. ``layers_{L-1}``, the same subtree without the
leading L axis. XLA's CPU backend materialises every slice of a stacked weight (a copy per layer and call) before
its dot; the sampler can keep its weights unstacked (`appo_jax.rollout.sampler.Sampler`, ``unstack_weights``).
Packed (``ModelConfig.cpu_kernels``, `pack_weights`): unstacked, and every matrix stored as the column panels
that the CPU kernel streams (`appo_jax.kernels.cpu_matmul.pack_panels`): a Dense kernel [*in, *out] as
[ceil(prod(out) / 48), prod(in), 48], lm_head/kernel as [ceil(V / 48), D, 48], a tied embed_tokens/embedding as
the panels of its transpose (rows looked up as columns). Fewer, larger kernel calls a step: a layer's q/k/v are
one matrix, self_attn/qkv_proj/{kernel [ceil((H + 2 KV) hd / 48), D, 48], bias [(H + 2 KV) hd]}; its gate and
up projections' panels lie side by side, mlp/gate_up_proj/kernel [ceil(F / 48), 2, D, 48] (`pack_swiglu`: the
SwiGLU product is the kernel's epilogue); o_proj and down_proj add the residual in theirs. The sampler keeps
such a copy for decoding on a CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import meta

from appo_jax.kernels.build import kernel_available
from appo_jax.kernels.cpu_attention import decode_attention
from appo_jax.kernels.cpu_matmul import pack_panels, pack_swiglu, panel_columns, panel_matmul, panel_swiglu, rms_norm
from appo_jax.models.config import ModelConfig
from appo_jax.models.kv_cache import KVCache, init_cache
from appo_jax.models.rope import apply_rope, rope_cos_sin

__all__ = ["init_params", "param_logical_axes", "forward", "unembed", "unstack_layers", "pack_weights", "init_cache",
           "KVCache", "Decoder"]

_INIT = nn.initializers.normal(stddev=0.02)
_MASK_VALUE = -1e30  # finite: a query with no visible key gets a uniform (finite) distribution, never NaN


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    """y = scale * (x / sqrt(mean(x^2, -1) + eps)); statistics in float32, result cast to the compute dtype
    before the scale (HF order)."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "norm"

    #: Return `Normed` (x and the scale, for a product that normalises in its prologue) instead of the result.
    deferred: bool = False

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", _partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
        if self.deferred:
            return Normed(x, scale, self.eps)
        return rms_norm(x, scale, self.eps, self.dtype)


class Normed(NamedTuple):
    """RMSNorm(x) not yet computed (``RMSNorm(deferred=True)``, ``cpu_kernels``): the packed q/k/v and gate/up
    products normalise x's rows in the kernel's prologue (`panel_matmul` / `panel_swiglu` ``norm``)."""

    x: jax.Array
    scale: jax.Array
    eps: float


class Dense(nn.Module):
    """y = (residual +) x . kernel (+ bias), contracting the last `n_in` axes of x with the leading axes of kernel
    [*in_shape, *features]; computed in `dtype`. With ``cpu_kernels`` the kernel is stored as column panels of its
    [prod(in_shape), prod(features)] matrix (`appo_jax.kernels.cpu_matmul.pack_panels`) and multiplied by
    `panel_matmul` (the CPU kernel for few float32 rows: the same sums in another order, the residual added in its
    epilogue). (Own module rather than nn.DenseGeneral, whose flattened-kernel initializer breaks logical
    partitioning of multi-axis kernels.)"""

    features: tuple[int, ...]
    axes: tuple[str, ...]
    bias_axes: tuple[str, ...] | None
    n_in: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    cpu_kernels: bool = False

    @nn.compact
    def __call__(self, x, residual=None):
        in_shape = x.shape[x.ndim - self.n_in:]
        lead = x.shape[:x.ndim - self.n_in]
        if self.cpu_kernels:
            k, n = math.prod(in_shape), math.prod(self.features)
            kernel = self.param("kernel", _packed(_INIT, k, n), None, self.param_dtype)
            rows = math.prod(lead)
            flat = panel_matmul(x.reshape(rows, k).astype(self.dtype), kernel, n,
                                None if residual is None else residual.reshape(rows, n))
            y, residual = flat.reshape(*lead, *self.features), None
        else:
            kernel = self.param("kernel", _partitioned(_INIT, self.axes), (*in_shape, *self.features),
                                self.param_dtype)
            x_letters = "abcdefgh"[: x.ndim - self.n_in]
            in_letters = "ijkl"[: self.n_in]
            out_letters = "mnop"[: len(self.features)]
            y = jnp.einsum(f"{x_letters}{in_letters},{in_letters}{out_letters}->{x_letters}{out_letters}",
                           x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_axes is not None:
            bias = self.param("bias", _partitioned(nn.initializers.zeros, self.bias_axes), self.features,
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y if residual is None else residual + y


def _packed(init, k: int, n: int, transposed: bool = False):
    """An initializer of the column panels of a [k, n] matrix drawn by ``init`` (``transposed``: of the transpose
    of an [n, k] matrix, a tied embedding); the shape argument is ignored."""
    def packed_init(key, _shape, dtype):
        w = init(key, (n, k) if transposed else (k, n), dtype)
        return pack_panels(w.T if transposed else w)
    return packed_init


def _dense(features, axes, bias_axes=None, *, config, name, n_in=1):
    features = (features,) if isinstance(features, int) else tuple(features)
    return Dense(features, axes, bias_axes, n_in, config.compute_dtype, config.params_dtype, config.cpu_kernels,
                 name=name)


def dot_product_attention(q, k, v, mask):
    """Masked softmax attention with grouped-query heads.

    q [B, T, H, hd], k/v [B, S, KV, hd] (query head h uses kv head h // (H / KV)), mask bool [B, T, S].
    out[b, t, h] = sum_s softmax_s(q.k / sqrt(hd) masked to -1e30)[s] * v[b, s, h // G]; scores, softmax in
    float32; returns [B, T, H, hd] in q's dtype. Memory O(B * H * T * S).
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(hd**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, hd).astype(q.dtype)


def _decode_kernel(config: ModelConfig, q, k_cache) -> bool:
    """Whether attention over the cache goes to the CPU kernel (`appo_jax.kernels.cpu_attention`): ``cpu_kernels``,
    one query token per row (a decode step), float32 and the kernel built (decided at trace time)."""
    return (config.cpu_kernels and q.shape[1] == 1 and q.dtype == k_cache.dtype == jnp.float32
            and kernel_available())


class _PackedQKV(nn.Module):
    """q [.., H, hd], k / v [.., KV, hd] = norm(x) . [Wq | Wk | Wv] (+ [bq | bk | bv]) for h = `Normed` (x, norm):
    the three projections as one matrix [D, (H + 2 KV) hd] in column panels (``cpu_kernels``; `pack_weights`), one
    `panel_matmul` with the norm in its prologue."""

    config: ModelConfig

    @nn.compact
    def __call__(self, h: Normed):
        cfg = self.config
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)
        n = sum(heads) * cfg.head_dim
        kernel = self.param("kernel", _packed(_INIT, cfg.hidden_size, n), None, cfg.params_dtype)
        lead = h.x.shape[:-1]
        y = panel_matmul(h.x.reshape(-1, cfg.hidden_size).astype(cfg.compute_dtype), kernel, n,
                         norm=(h.scale, h.eps)).reshape(*lead, n)
        if cfg.qkv_bias:
            y = y + self.param("bias", nn.initializers.zeros, (n,), cfg.params_dtype).astype(cfg.compute_dtype)
        q, k, v = jnp.split(y, [heads[0] * cfg.head_dim, (heads[0] + heads[1]) * cfg.head_dim], axis=-1)
        return tuple(a.reshape(*lead, count, cfg.head_dim) for a, count in zip((q, k, v), heads))


class Attention(nn.Module):
    """GQA self-attention with RoPE, optional qkv bias (Qwen2) and per-head q/k RMSNorm before RoPE (Qwen3), of
    x = the normed residual stream (a `Normed` with ``cpu_kernels``); returns residual + attention output.

    With a cache (k_cache/v_cache [L, B, S, KV, hd] plus the layer index and write slots) the new keys/values are
    scattered at (layer, b, slot[b, t]) and the queries attend over the layer's S slots; without, over the T new
    tokens. `mask` [B, T, S or T] is the full visibility mask. With ``cpu_kernels``, q/k/v are one product
    (`_PackedQKV`), one query token per row attends over the cache in the CPU kernel (`_decode_kernel`: the same sums
    without copying the window) and the residual is added in o_proj's kernel."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, residual, cos, sin, mask, k_cache, v_cache, layer, slot):
        cfg = self.config
        if cfg.cpu_kernels:
            q, k, v = _PackedQKV(cfg, name="qkv_proj")(x)
        else:
            bias_q = ("heads", "head_dim") if cfg.qkv_bias else None
            bias_kv = ("kv_heads", "head_dim") if cfg.qkv_bias else None
            q = _dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), bias_q, config=cfg,
                       name="q_proj")(x)
            k = _dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), bias_kv, config=cfg,
                       name="k_proj")(x)
            v = _dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), bias_kv, config=cfg,
                       name="v_proj")(x)
        if cfg.qk_norm:
            norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, "head_dim")
            q = norm(name="q_norm")(q)
            k = norm(name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        if k_cache is not None:
            rows = jnp.arange(q.shape[0])[:, None]
            k_cache = k_cache.at[layer, rows, slot].set(k.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[layer, rows, slot].set(v.astype(v_cache.dtype), mode="drop")
        if k_cache is not None and _decode_kernel(cfg, q, k_cache):
            out = decode_attention(q[:, 0], k_cache, v_cache, layer, mask[:, 0])[:, None]
        else:
            k_att, v_att = (k_cache[layer], v_cache[layer]) if k_cache is not None else (k, v)
            out = dot_product_attention(q, k_att.astype(q.dtype), v_att.astype(q.dtype), mask)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = _dense(cfg.hidden_size, ("heads", "head_dim", "embed"), config=cfg, name="o_proj", n_in=2)(out, residual)
        return out, k_cache, v_cache


class _PackedSwiGLU(nn.Module):
    """silu(norm(x) . Wg) * (norm(x) . Wu) for h = `Normed` (x, norm), with Wg and Wu [D, F] packed side by side
    (``cpu_kernels``; `pack_swiglu`): one `panel_swiglu` with the norm in its prologue."""

    config: ModelConfig

    @nn.compact
    def __call__(self, h: Normed):
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size

        def init(key, _shape, dtype):
            return pack_swiglu(*(_INIT(k, (d, f), dtype) for k in jax.random.split(key)))

        kernel = self.param("kernel", init, None, cfg.params_dtype)
        y = panel_swiglu(h.x.reshape(-1, d).astype(cfg.compute_dtype), kernel, f, norm=(h.scale, h.eps))
        return y.reshape(*h.x.shape[:-1], f)


class MLP(nn.Module):
    """SwiGLU: residual + down(silu(gate(x)) * up(x)), x the normed residual stream. With ``cpu_kernels`` x is a
    `Normed`, gate and up are one kernel call over their panels side by side (``gate_up_proj``, `panel_swiglu`: the
    norm in its prologue, the product in its epilogue) and the residual is added in down's."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, residual):
        cfg = self.config
        f = cfg.intermediate_size
        if cfg.cpu_kernels:
            h = _PackedSwiGLU(cfg, name="gate_up_proj")(x)
        else:
            gate = _dense(f, ("embed", "mlp"), config=cfg, name="gate_proj")(x)
            up = _dense(f, ("embed", "mlp"), config=cfg, name="up_proj")(x)
            h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(cfg.hidden_size, ("mlp", "embed"), config=cfg, name="down_proj")(h, residual)


class DecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)). Scanned: carry = (x, k_cache, v_cache)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, ctx):
        cfg = self.config
        x, k_cache, v_cache = carry
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype,
                                 deferred=cfg.cpu_kernels)  # cpu_kernels: in the products' prologue
        h = norm(name="input_layernorm")(x)
        x, k_cache, v_cache = Attention(cfg, name="self_attn")(
            h, x, ctx["cos"], ctx["sin"], ctx["mask"], k_cache, v_cache, layer, ctx.get("slot")
        )
        x = MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x), x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, k_cache, v_cache), None


def _remat_policy(name: str):
    if name in ("full", "nothing_saveable"):
        return None
    if name in ("dots", "dots_saveable"):
        return jax.checkpoint_policies.checkpoint_dots
    return getattr(jax.checkpoint_policies, name)


class _LMHead(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        if cfg.cpu_kernels:
            return self.param("kernel", _packed(_INIT, cfg.hidden_size, cfg.vocab_size), None, cfg.params_dtype)
        return self.param(
            "kernel", _partitioned(_INIT, ("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), cfg.params_dtype
        )


class _PanelEmbed(nn.Module):
    """A tied embedding E [V, D] stored as the column panels of E^T (``cpu_kernels``: the LM head's layout);
    looks rows up as columns (`panel_columns`), in the compute dtype."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param("embedding", _packed(_INIT, cfg.hidden_size, cfg.vocab_size, transposed=True),
                                    None, cfg.params_dtype)

    def __call__(self, tokens):
        return panel_columns(self.embedding, tokens).astype(self.config.compute_dtype)


def _project(hidden, weight, config: ModelConfig):
    """float32 logits [..., V]: hidden [..., D] times embedding[V, D]^T (tied) or kernel [D, V] (untied), accumulated
    in float32; with ``cpu_kernels`` the weight is the column panels of that [D, V] matrix (`panel_matmul`)."""
    if config.cpu_kernels:
        lead = hidden.shape[:-1]
        logits = panel_matmul(hidden.reshape(math.prod(lead), -1), weight, config.vocab_size)
        return logits.reshape(*lead, config.vocab_size).astype(jnp.float32)
    weight = weight.astype(hidden.dtype)
    spec = "...d,vd->...v" if config.tie_word_embeddings else "...d,dv->...v"
    return jnp.einsum(spec, hidden, weight, preferred_element_type=jnp.float32)


class Decoder(nn.Module):
    """The full causal LM; see `forward` for the contract. ``unstacked``: its layers are the submodules
    ``layers_0`` .. ``layers_{L-1}`` (parameters of `unstack_layers`) instead of one scanned ``layers``."""

    config: ModelConfig
    unstacked: bool = False

    @nn.compact
    def __call__(self, tokens, positions, token_mask=None, cache: KVCache | None = None, return_hidden=False):
        cfg = self.config
        b, t = tokens.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), jnp.bool_)
        token_mask = token_mask.astype(jnp.bool_)
        if cfg.cpu_kernels and cfg.tie_word_embeddings:
            embed = _PanelEmbed(cfg, name="embed_tokens")
        else:
            embed = nn.Embed(
                cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                embedding_init=_partitioned(_INIT, ("vocab", "embed")), name="embed_tokens",
            )
        x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(positions, cfg)
        ctx = {"cos": cos, "sin": sin}
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
            ctx["mask"] = causal[None] & token_mask[:, None, :]
            k_cache = v_cache = None
            new_valid = new_end = None
        else:
            s = cache.max_len
            slot = cache.end[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
            rows = jnp.arange(b)[:, None]
            new_valid = cache.valid.at[rows, slot].set(token_mask, mode="drop")
            ctx["mask"] = new_valid[:, None, :] & (jnp.arange(s)[None, None, :] <= slot[:, :, None])
            ctx["slot"] = slot
            k_cache, v_cache = cache.k, cache.v
            new_end = jnp.where(token_mask.any(axis=1), cache.end + t, cache.end).astype(jnp.int32)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers or self.unstacked,
                                 policy=_remat_policy(cfg.remat_policy))
        if self.unstacked:
            carry = (x, k_cache, v_cache)
            for i in range(cfg.num_layers):
                carry, _ = layer_cls(cfg, name=f"layers_{i}")(carry, i, ctx)
            x, k_cache, v_cache = carry
        else:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast),
                length=cfg.num_layers,
                unroll=1 if cfg.scan_layers else cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x, k_cache, v_cache), _ = scanned(cfg, name="layers")(
                (x, k_cache, v_cache), jnp.arange(cfg.num_layers, dtype=jnp.int32), ctx
            )
        hidden = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name="norm")(x)
        new_cache = None if cache is None else KVCache(k=k_cache, v=v_cache, valid=new_valid, end=new_end)
        if return_hidden:
            return hidden, new_cache
        weight = embed.embedding if cfg.tie_word_embeddings else _LMHead(cfg, name="lm_head")()
        logits = _project(hidden, weight, cfg)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), new_cache


def _dummy_inputs():
    return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (normal(0.02) matrices, unit norm scales, zero biases) in config.param_dtype, as a plain
    nested dict (partitioning metadata removed). Works under jax.jit / jax.eval_shape."""
    variables = Decoder(config).init(rng, *_dummy_inputs())
    return meta.unbox(variables["params"])


def param_logical_axes(config: ModelConfig) -> dict:
    """The params tree with each leaf replaced by its tuple of logical axis names (no computation done),
    e.g. layers/self_attn/q_proj/kernel -> ("layers", "embed", "heads", "head_dim")."""
    boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.PRNGKey(0), *_dummy_inputs()))["params"]
    return jax.tree.map(
        lambda leaf: tuple(leaf.names) if isinstance(leaf, meta.Partitioned) else (None,) * leaf.ndim,
        boxed,
        is_leaf=lambda leaf: isinstance(leaf, meta.Partitioned),
    )


def forward(
    params: dict,
    tokens: jnp.ndarray,
    positions: jnp.ndarray,
    *,
    config: ModelConfig,
    token_mask: jnp.ndarray | None = None,
    cache: KVCache | None = None,
    return_hidden: bool = False,
):
    """Run the decoder on tokens int32 [B, T] at RoPE positions int32 [B, T].

    Without a cache: causal attention over the T tokens; token_mask (bool [B, T], default all True) masks padded
    keys. With a cache: the T tokens of row b are written at slots end[b] .. end[b]+T-1 (those with
    token_mask False are written but marked invalid); each new token attends to the valid slots <= its own slot;
    new_end[b] = end[b] + T if any(token_mask[b]) else end[b]. Writes past the last slot are dropped (callers
    keep end + T <= S).
    Returns (out, new_cache): out = float32 logits [B, T, V], or with return_hidden the final-normed hidden
    states [B, T, D] in the compute dtype; new_cache is None without a cache. ``params`` may hold its layers
    stacked (``layers``) or unstacked (`unstack_layers`): the same function either way.
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
        raise ValueError(f"tokens and positions must both be [B, T]; got {tokens.shape} and {positions.shape}")
    if cache is not None and cache.batch != tokens.shape[0]:
        raise ValueError(f"cache has {cache.batch} rows but tokens has batch {tokens.shape[0]}")
    if config.cpu_kernels and "qkv_proj" not in params.get("layers_0", {}).get("self_attn", {}):
        raise ValueError("forward: a config with cpu_kernels takes packed params; give pack_weights(params, config)")
    return Decoder(config, unstacked="layers" not in params).apply({"params": params}, tokens, positions,
                                                                  token_mask, cache, return_hidden)


def unstack_layers(params: dict) -> dict:
    """``params`` with ``layers`` (every leaf stacked on axis 0 over the L layers) replaced by ``layers_0`` ..
    ``layers_{L-1}``, leaf ``layers_i/...`` = ``layers/...[i]`` (copies; module doc). Unstacked params pass
    through."""
    if "layers" not in params:
        return params
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)})
    return out


def _fuse_layer(layer: dict) -> dict:
    """One plain layer's q/k/v as ``self_attn/qkv_proj`` (kernel: the panels of [Wq | Wk | Wv] as [D, (H + 2 KV)
    hd]; bias: [bq | bk | bv]) and gate / up as ``mlp/gate_up_proj/kernel`` (`pack_swiglu`)."""
    attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
    parts = [attn.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
    d = parts[0]["kernel"].shape[0]
    qkv = {"kernel": pack_panels(jnp.concatenate([p["kernel"].reshape(d, -1) for p in parts], axis=1))}
    if "bias" in parts[0]:
        qkv["bias"] = jnp.concatenate([p["bias"].reshape(-1) for p in parts])
    attn["qkv_proj"] = qkv
    mlp["gate_up_proj"] = {"kernel": pack_swiglu(mlp.pop("gate_proj")["kernel"], mlp.pop("up_proj")["kernel"])}
    return {**layer, "self_attn": attn, "mlp": mlp}


def pack_weights(params: dict, config: ModelConfig) -> dict:
    """Plain ``params`` (stacked or not; `init_params` / `load_model` layout) in the layout of ``config`` with
    ``cpu_kernels`` (module doc): unstacked; each layer's q/k/v one matrix and gate / up side by side
    (`_fuse_layer`); every other Dense kernel [*in, *out] as the column panels of its [prod(in), prod(out)] matrix,
    the untied LM head's [D, V] kernel as its panels, a tied embedding E [V, D] as the panels of E^T
    (`pack_panels`); the rest unchanged. Params packed already are refused."""
    params = unstack_layers(params)
    if "qkv_proj" in params.get("layers_0", {}).get("self_attn", {}):
        raise ValueError("pack_weights: the params are packed already")
    params = {k: _fuse_layer(v) if k.startswith("layers_") else v for k, v in params.items()}
    cfg = dataclasses.replace(config, cpu_kernels=True)
    target = jax.eval_shape(lambda: Decoder(cfg, unstacked=True).init(jax.random.PRNGKey(0), *_dummy_inputs()))

    def pack(path, leaf, want):
        names = tuple(p.key for p in path)
        if names[-2:] == ("embed_tokens", "embedding") and config.tie_word_embeddings:
            out = pack_panels(leaf.T)
        elif names[-1] == "kernel" and names[-2] not in ("qkv_proj", "gate_up_proj"):
            out = pack_panels(leaf.reshape(want.shape[1], -1))
        else:
            out = leaf
        if out.shape != want.shape:
            raise ValueError(f"pack_weights: {'/'.join(names)} {leaf.shape} does not fit the model's layout")
        return out

    want = meta.unbox(target["params"])
    if jax.tree.structure(params) != jax.tree.structure(want):
        raise ValueError("pack_weights: the params' tree does not fit the model's layout (another architecture)")
    return jax.tree_util.tree_map_with_path(pack, params, want)


def unembed(params: dict, hidden: jnp.ndarray, *, config: ModelConfig) -> jnp.ndarray:
    """float32 logits [..., V] = hidden [..., D] @ W, W = embed_tokens.embedding^T if tied else lm_head.kernel
    (inputs in hidden's dtype, float32 accumulation)."""
    if config.tie_word_embeddings:
        return _project(hidden, params["embed_tokens"]["embedding"], config)
    return _project(hidden, params["lm_head"]["kernel"], config)
