"""ModelConfig: the hyper-parameters of the Llama / Qwen2 / Qwen3 / SmolLM decoder family.

One frozen (hashable) dataclass describes every model; it converts to and from the HF `config.json` dict of
`LlamaForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM` (both the transformers 4 `rope_theta` /
`rope_scaling` keys and the transformers 5 `rope_parameters` key are read; both are written).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

MODEL_TYPES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = (
    "none",  # no rematerialisation: every activation is saved for the backward pass
    "full",  # save only the layer inputs; recompute everything else
    "nothing_saveable",  # same as "full"
    "dots",  # save matmul outputs (jax.checkpoint_policies.checkpoint_dots)
    "dots_saveable",  # alias of "dots"
    "dots_with_no_batch_dims_saveable",  # save weight matmuls, recompute attention einsums
    "everything_saveable",  # remat wrapper that saves everything (debugging)
)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _freeze(value: Any) -> Any:
    """Hashable view of a JSON-like value (dicts -> sorted item tuples, lists -> tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters (HF names in brackets where they differ).

    vocab_size, hidden_size, intermediate_size, num_layers [num_hidden_layers], num_heads [num_attention_heads],
    num_kv_heads [num_key_value_heads], head_dim, rope_theta, rope_scaling (HF dict with "rope_type" in
    ROPE_TYPES, or None), rms_norm_eps, tie_word_embeddings, qkv_bias (Qwen2: bias on q/k/v projections),
    qk_norm (Qwen3: RMSNorm over head_dim on q and k before RoPE), max_position_embeddings, bos_token_id,
    eos_token_ids (tuple), pad_token_id, dtype (compute dtype name), param_dtype (parameter dtype name),
    remat_policy (one of REMAT_POLICIES), scan_layers (True: lax.scan over layers; False: the same stacked
    parameters, fully unrolled loop), model_type ("llama" | "qwen2" | "qwen3", used for HF export), cpu_kernels
    (the weight matrices are stored as column panels, `appo_jax.models.decoder.pack_weights`, and products of at
    most `appo_jax.kernels.cpu_matmul.KERNEL_MAX_ROWS` float32 rows, i.e. decode steps, go to the CPU kernel of
    that module; set by the sampler, never for training: the kernel has no gradient).

    Hashable (usable as a jit static argument) even though rope_scaling is a dict.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    model_type: str = "llama"
    cpu_kernels: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type={self.model_type!r}; expected one of {MODEL_TYPES}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise NotImplementedError(
                    f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}"
                )
            if rope_type != "default" and "factor" not in self.rope_scaling and rope_type != "yarn":
                raise ValueError(f"rope_scaling {self.rope_scaling!r} needs a 'factor'")
        if not isinstance(self.eos_token_ids, tuple):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    def __hash__(self):
        return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @property
    def compute_dtype(self):
        """The jnp dtype of activations."""
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        """The jnp dtype of parameters."""
        return _DTYPES[self.param_dtype]

    @property
    def rope_type(self) -> str:
        """The RoPE variant: "default" when rope_scaling is None."""
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * layer + self.vocab_size * d + d + head

    # ---------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "ModelConfig":
        """Build from an HF config.json dict (Llama / Qwen2 / Qwen3 / SmolLM / Mistral-without-sliding-window).

        `overrides` set ModelConfig fields that HF does not hold (dtype, param_dtype, remat_policy, scan_layers).
        """
        model_type = d.get("model_type", "llama")
        if model_type == "mistral":
            if d.get("sliding_window") not in (None, 0) and d.get("sliding_window", 0) < d.get(
                "max_position_embeddings", 0
            ):
                raise NotImplementedError("mistral with a sliding window is not supported")
            model_type = "llama"
        if model_type not in MODEL_TYPES:
            raise NotImplementedError(
                f"HF model_type {model_type!r} is not supported; supported: {MODEL_TYPES} (+ mistral)"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
        if d.get("mlp_bias"):
            raise NotImplementedError("mlp_bias=True is not supported")
        if d.get("attention_bias"):
            raise NotImplementedError(f"attention_bias=True is not supported for model_type {model_type!r}")
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise NotImplementedError("qwen2 use_sliding_window=True is not supported")
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict) and rope_params and all(isinstance(v, dict) for v in rope_params.values()):
            raise NotImplementedError("per-layer-type rope_parameters are not supported")
        rope_params = dict(rope_params or {})
        legacy_scaling = d.get("rope_scaling")
        if legacy_scaling:
            rope_params = {**dict(legacy_scaling), **rope_params}
        rope_theta = float(rope_params.pop("rope_theta", d.get("rope_theta", 10000.0)))
        if "type" in rope_params and "rope_type" not in rope_params:
            rope_params["rope_type"] = rope_params.pop("type")
        rope_params.pop("type", None)
        rope_scaling = rope_params if rope_params.get("rope_type", "default") != "default" else None
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        fields = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict:
        """The HF config.json dict (float32 torch dtype unless param_dtype is bfloat16)."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope_parameters.pop("type", None)
            rope_parameters["rope_type"] = self.rope_type
        eos = None if not self.eos_token_ids else (
            self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        )
        d = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",
            "use_cache": True,
        }
        if self.model_type == "llama":
            d["mlp_bias"] = False
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
            d["sliding_window"] = None
            d["max_window_layers"] = self.num_layers
        return d

    def to_json(self) -> str:
        """JSON of every ModelConfig field (not the HF format; see to_hf_dict)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)
