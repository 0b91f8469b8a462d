"""Named model configs: the HF architectures of real checkpoints, plus tiny configs for tests.

A preset gives the shapes only; `appo_jax.models.loading.load_model(name)` initialises it randomly.
"""
from __future__ import annotations

from appo_jax.models.config import ModelConfig

_QWEN_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def _qwen25(hidden, inter, layers, heads, kv, tied, vocab=151936) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=hidden // heads, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, qkv_bias=True, max_position_embeddings=32768, bos_token_id=151643,
        eos_token_ids=_QWEN_EOS, pad_token_id=151643, model_type="qwen2",
    )


def _qwen3(hidden, inter, layers, heads, kv, tied) -> ModelConfig:
    return ModelConfig(
        vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        qk_norm=True, max_position_embeddings=40960, bos_token_id=151643, eos_token_ids=_QWEN_EOS,
        pad_token_id=151643, model_type="qwen3",
    )


PRESETS: dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2, model_type="llama",
    ),
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, tied=True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, tied=True),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, tied=True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, tied=False, vocab=152064),
    # meta-llama/Llama-3.1-8B-Instruct
    "llama3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), pad_token_id=128004, model_type="llama",
    ),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, tied=False),
    # The policy of the mini reproduction (experiments/mini): trained from scratch with the shipped "mini-tasks"
    # tokenizer (512 ids: 0 <|endoftext|> = padding, 1 <|im_start|>, 2 <|im_end|> = EOS).
    "mini-tasks": ModelConfig(
        vocab_size=512, hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=24, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=1024, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, model_type="llama",
    ),
    # Tiny configs for tests and CPU experiments.
    "tiny-llama": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, model_type="llama",
    ),
    "tiny-qwen2": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
        max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, model_type="qwen2",
    ),
    "tiny-qwen3": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, qk_norm=True,
        max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, model_type="qwen3",
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """The preset `name` (with ModelConfig fields in `overrides` replaced); ValueError listing the names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
