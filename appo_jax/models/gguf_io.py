"""GGUF import (llama.cpp files): config from the metadata, dequantised weights, llama q/k un-permuted.

  load_gguf_config(path, **overrides) -> ModelConfig
  load_gguf(path, mesh=None, rules=None, **overrides) -> (config, params)
  load_gguf_tokenizer(path) -> transformers tokenizer (offline, from the GGUF vocabulary)

Reading a GGUF file is slow in Python (SmolLM2-135M: ~8 s to parse the metadata and dequantise, ~10 s for
transformers to convert its tokenizer), so the first load converts the file once into an HF directory (float32
safetensors, config.json, tokenizer files) under ``$APPO_MODEL_CACHE`` (default ``~/.cache/appo_jax/models``;
``off`` disables it), keyed by the file's absolute path, size and modification time; later loads read that
directory (under a second). The conversion is exact: the cached weights are the dequantised float32 values.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np

from appo_jax.compilation_cache import user_cache_dir
from appo_jax.models.config import ModelConfig
from appo_jax.models.hf_io import export_hf, load_hf, load_hf_tokenizer
from appo_jax.models.weight_map import assemble_params

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    """HF tensor name of a GGUF tensor name (blk.{i}.attn_q.weight -> model.layers.{i}.self_attn.q_proj.weight);
    None for tensors with no HF counterpart."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute` of q/k rows: within each head llama.cpp interleaves
    the two rotary halves (row order [0, d/2, 1, d/2+1, ...]); this restores the HF rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: str):
    from gguf import GGUFReader  # deferred: only GGUF imports need the gguf package

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError / struct errors / IndexError on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _config_from_reader(reader, path: str, overrides: dict) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise NotImplementedError(f"{path}: GGUF rope_freqs (llama3 RoPE factors) are not supported")

    def meta(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    rope_scaling = None
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(meta("rope.scaling.factor"))}
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            rope_scaling["original_max_position_embeddings"] = int(original)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    fields = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length")
                     or _field(reader, f"{arch}.rope.dimension_count") or hidden // heads),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        max_position_embeddings=int(meta("context_length")),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        model_type=arch,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


class GGUFSource:
    """HF-named, dequantised (float32) tensors of a GGUF file, q/k rows un-permuted for the llama
    architecture (llama.cpp permutes them; its qwen2/qwen3 converters do not)."""

    def __init__(self, path: str, reader, config: ModelConfig):
        self.path = path
        self._config = config
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # the last few dequantised tensors
        self._tensors = {}
        for tensor in reader.tensors:
            hf_name = gguf_to_hf_name(tensor.name)
            if hf_name is not None:
                self._tensors[hf_name] = tensor

    def has(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._dequantise(name)
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[name]

    def _dequantise(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize  # deferred: only GGUF imports need the gguf package

        tensor = self._tensors[name]
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(self.shape(name))
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{self.path}: cannot dequantise tensor {tensor.name} "
                             f"({tensor.tensor_type.name}): {e}") from e
        if self._config.model_type == "llama":
            if name.endswith("self_attn.q_proj.weight"):
                w = unpermute_qk(w, self._config.num_heads)
            elif name.endswith("self_attn.k_proj.weight"):
                w = unpermute_qk(w, self._config.num_kv_heads)
        return w

    def where(self, name: str) -> str:
        return f"{self.path} (GGUF tensor {self._tensors[name].name})"

    def describe(self) -> str:
        return self.path


def load_gguf_config(path: str, **overrides) -> ModelConfig:
    """ModelConfig from the GGUF metadata ({arch}.block_count, embedding_length, attention.head_count, ...)."""
    return _config_from_reader(_reader(path), path, overrides)


MODEL_CACHE_ENV = "APPO_MODEL_CACHE"
_CONVERSION_VERSION = "1"  # bump when the conversion's output changes


def gguf_cache_root() -> Path | None:
    """``$APPO_MODEL_CACHE`` (None when ``off``), else ``$XDG_CACHE_HOME/appo_jax/models``."""
    env = os.environ.get(MODEL_CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    return user_cache_dir("models")


def _cache_dir(path: str) -> Path | None:
    root = gguf_cache_root()
    if root is None:
        return None
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{_CONVERSION_VERSION}"
    return root / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def converted_gguf_dir(path: str) -> Path | None:
    """The cached HF directory of the GGUF file ``path`` (module doc), converting it on first use; None when the
    cache is off or cannot be written (then callers read the GGUF directly)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    target = _cache_dir(path)
    if target is None:
        return None
    if (target / "config.json").is_file():
        return target
    reader = _reader(path)
    config = _config_from_reader(reader, path, {"dtype": "float32", "param_dtype": "float32"})
    params = jax.device_get(assemble_params(config, GGUFSource(path, reader, config), None, None))
    tokenizer = _gguf_file_tokenizer(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError:
        return None  # an unwritable cache only costs time
    try:
        export_hf(params, config, str(tmp), tokenizer=tokenizer)
        os.replace(tmp, target)  # atomic; a concurrent conversion that finished first wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return target if (target / "config.json").is_file() else None
    return target


def load_gguf(path: str, mesh: jax.sharding.Mesh | None = None, rules=None, **overrides) -> tuple[ModelConfig, dict]:
    """(config, params) from a GGUF file: every tensor dequantised to float32 (gguf.quants.dequantize), then cast
    to config.param_dtype and placed (sharded when `mesh` is given). Read from the converted cache when enabled
    (module doc)."""
    cached = converted_gguf_dir(path)
    if cached is not None:
        config, params = load_hf(str(cached), mesh, rules, **overrides)
        return config, params
    reader = _reader(path)
    config = _config_from_reader(reader, path, overrides)
    return config, assemble_params(config, GGUFSource(path, reader, config), mesh, rules)


def _gguf_file_tokenizer(path: str):
    from transformers import AutoTokenizer  # deferred: importing transformers takes seconds

    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))


def load_gguf_tokenizer(path: str):
    """The tokenizer stored in the GGUF file, via transformers (AutoTokenizer with gguf_file=...; offline); read
    from the converted cache when enabled (module doc)."""
    cached = converted_gguf_dir(path)
    if cached is None:
        return _gguf_file_tokenizer(path)
    return load_hf_tokenizer(str(cached))
