"""Flax decoder family (Llama / Qwen2 / Qwen3 / SmolLM2), presets, KV cache, HF / GGUF weights."""
from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import forward, init_params, param_logical_axes, unembed
from appo_jax.models.kv_cache import KVCache, init_cache
from appo_jax.models.presets import PRESETS, get_config

__all__ = [
    "ModelConfig", "PRESETS", "get_config", "init_params", "param_logical_axes", "forward", "unembed",
    "KVCache", "init_cache",
]
