"""The mapping between our params tree and HF tensor names / layouts, and sharded assembly of params from any
named-tensor source (an HF safetensors directory, a dequantised GGUF file).

HF layout (torch Linear weight = [out, in]) -> ours:
  model.embed_tokens.weight [V, D]                   -> embed_tokens/embedding [V, D]
  lm_head.weight [V, D]                              -> lm_head/kernel [D, V]            (untied only)
  model.norm.weight [D]                              -> norm/scale [D]
  model.layers.{i}.self_attn.q_proj.weight [H*hd, D] -> layers/self_attn/q_proj/kernel [L, D, H, hd]
  model.layers.{i}.self_attn.q_proj.bias [H*hd]      -> layers/self_attn/q_proj/bias [L, H, hd]
  (k_proj / v_proj likewise with KV heads), o_proj.weight [D, H*hd] -> o_proj/kernel [L, H, hd, D],
  q_norm / k_norm .weight [hd], mlp.{gate,up}_proj.weight [F, D] -> [L, D, F], mlp.down_proj.weight [D, F]
  -> [L, F, D], input_layernorm / post_attention_layernorm .weight [D] -> [L, D].
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import init_params, param_logical_axes
from appo_jax.parallel.rules import DEFAULT_RULES, logical_to_spec


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One params leaf: its HF tensor name (with {i} for the layer index when `stacked`), the HF shape of one
    tensor, and the per-tensor conversions HF -> ours and ours -> HF."""

    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    stacked: bool


class WeightShapeError(ValueError):
    """A checkpoint tensor whose shape does not match the config (message names the tensor and both shapes)."""


class MissingWeightError(KeyError):
    """A tensor the config needs is absent from the checkpoint."""

    def __str__(self):
        return str(self.args[0])


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _proj_in(heads, hd, d):
    """[heads*hd, D] -> [D, heads, hd] and back."""
    return (lambda w: w.T.reshape(d, heads, hd)), (lambda k: k.reshape(d, heads * hd).T)


def hf_layout(config: ModelConfig) -> dict[tuple[str, ...], LeafSpec]:
    """Our leaf path -> LeafSpec for every parameter of `config`."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    h, kv, v = config.num_heads, config.num_kv_heads, config.vocab_size
    layout = {
        ("embed_tokens", "embedding"): LeafSpec("model.embed_tokens.weight", (v, d), _identity, _identity, False),
        ("norm", "scale"): LeafSpec("model.norm.weight", (d,), _identity, _identity, False),
    }
    if not config.tie_word_embeddings:
        layout[("lm_head", "kernel")] = LeafSpec("lm_head.weight", (v, d), _transpose, _transpose, False)

    def layer(path, name, shape, to_ours=_identity, to_hf=_identity):
        layout[("layers", *path)] = LeafSpec(f"model.layers.{{i}}.{name}", shape, to_ours, to_hf, True)

    layer(("input_layernorm", "scale"), "input_layernorm.weight", (d,))
    layer(("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", (d,))
    for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
        layer(("self_attn", proj, "kernel"), f"self_attn.{proj}.weight", (heads * hd, d), *_proj_in(heads, hd, d))
        if config.qkv_bias:
            layer(("self_attn", proj, "bias"), f"self_attn.{proj}.bias", (heads * hd,),
                  lambda b, heads=heads: b.reshape(heads, hd), lambda b, heads=heads: b.reshape(heads * hd))
    layer(("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", (d, h * hd),
          lambda w: w.T.reshape(h, hd, d), lambda k: k.reshape(h * hd, d).T)
    if config.qk_norm:
        layer(("self_attn", "q_norm", "scale"), "self_attn.q_norm.weight", (hd,))
        layer(("self_attn", "k_norm", "scale"), "self_attn.k_norm.weight", (hd,))
    layer(("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (f, d), _transpose, _transpose)
    layer(("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (f, d), _transpose, _transpose)
    layer(("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (d, f), _transpose, _transpose)
    return layout


def _hf_names(spec: LeafSpec, num_layers: int) -> list[str]:
    return [spec.hf_name.format(i=i) for i in range(num_layers)] if spec.stacked else [spec.hf_name]


def check_source(config: ModelConfig, source) -> None:
    """Raise MissingWeightError / WeightShapeError (naming the tensor, the file and both shapes) unless
    `source` (has / shape / where) holds every tensor of `config` with the expected shape."""
    for spec in hf_layout(config).values():
        for name in _hf_names(spec, config.num_layers):
            if not source.has(name):
                raise MissingWeightError(
                    f"tensor {name!r} needed by the config is missing from {source.describe()}"
                )
            got = tuple(source.shape(name))
            if got != spec.hf_shape:
                raise WeightShapeError(
                    f"tensor {name!r} in {source.where(name)} has shape {got}, but the config expects "
                    f"{spec.hf_shape} (check config.json against the weights)"
                )


def get_path(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def assemble_params(config: ModelConfig, source, mesh: jax.sharding.Mesh | None = None,
                    rules: Mapping | None = None) -> dict:
    """Params of `config` read from `source` (an object with has / shape / get / where / describe over HF
    tensor names), cast to config.param_dtype. With a mesh every leaf is built with
    jax.make_array_from_callback under its NamedSharding, so each device (and host) only reads and converts the
    slices it holds; without one, leaves go to the default device."""
    check_source(config, source)
    dtype = np.dtype(config.params_dtype)
    axes = param_logical_axes(config)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    params: dict = {}
    for path, spec in hf_layout(config).items():
        shape = tuple(get_path(shapes, path).shape)

        def fetch(index, spec=spec, shape=shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if not spec.stacked:
                return np.ascontiguousarray(spec.to_ours(source.get(spec.hf_name))[index]).astype(dtype)
            layers = range(config.num_layers)[index[0]]
            parts = [spec.to_ours(source.get(spec.hf_name.format(i=i)))[index[1:]] for i in layers]
            return np.ascontiguousarray(np.stack(parts)).astype(dtype)

        if mesh is None:
            leaf = jnp.asarray(fetch(()))
        else:
            spec_ = logical_to_spec(get_path(axes, path), mesh, rules or DEFAULT_RULES, shape)
            sharding = jax.sharding.NamedSharding(mesh, spec_)
            leaf = jax.make_array_from_callback(shape, sharding, fetch)
        _set_path(params, path, leaf)
    return params


def _host_array(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def hf_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF tensor name, array in HF layout and the params' dtype) for every parameter, layer by layer."""
    for path, spec in hf_layout(config).items():
        array = _host_array(get_path(params, path))
        if spec.stacked:
            for i in range(config.num_layers):
                yield spec.hf_name.format(i=i), np.ascontiguousarray(spec.to_hf(array[i]))
        else:
            yield spec.hf_name, np.ascontiguousarray(spec.to_hf(array))
