"""HF checkpoint directories: import (config.json + *.safetensors, sharded index) and export (transformers-loadable).

  load_hf_config(path, **overrides) -> ModelConfig
  load_hf(path, mesh=None, rules=None, **overrides) -> (config, params)
  export_hf(params, config, out_dir, tokenizer=None, max_shard_bytes=...) -> out_dir
  load_hf_tokenizer(path) -> the directory's transformers tokenizer, or None when it has no tokenizer files
"""
from __future__ import annotations

import glob
import json
import math
import os

import jax
import numpy as np

from appo_jax.models.config import ModelConfig
from appo_jax.models.safetensors_file import SafetensorsFile, write_file
from appo_jax.models.weight_map import get_path, assemble_params, hf_layout, hf_tensors

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

#: ``tokenizer_class`` values that name the tokenizers-library backend itself (transformers 5 writes
#: ``TokenizersBackend``, 4 ``PreTrainedTokenizerFast``): `load_hf_tokenizer` builds them as
#: ``PreTrainedTokenizerFast``, the class AutoTokenizer resolves them to, without importing AutoTokenizer's
#: registry of every model's tokenizer (2-5 s of imports in each process that loads a tokenizer).
FAST_BACKEND_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class HFDirSource:
    """The tensors of an HF directory: model.safetensors.index.json's weight_map if present, else every
    *.safetensors file. Headers are validated on construction (missing / corrupt files are named)."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path}: corrupt safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not os.path.exists(os.path.join(path, name))]
            if missing:
                raise FileNotFoundError(f"{index_path} lists weight files that do not exist: {missing}")
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                others = [p for p in os.listdir(path) if p.endswith((".bin", ".pt", ".pth", ".gguf"))]
                hint = f" (found {others}; only safetensors are read from HF dirs)" if others else ""
                raise FileNotFoundError(f"no *.safetensors weight files in {path}{hint}")
        self._files = {name: SafetensorsFile(os.path.join(path, name)) for name in files}
        self._where: dict[str, SafetensorsFile] = {}
        for st in self._files.values():
            for name in st.names:
                self._where[name] = st

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str):
        return self._where[name].get(name)

    def where(self, name: str) -> str:
        return self._where[name].path

    def describe(self) -> str:
        return f"{self.path} (files: {', '.join(self._files)})"


def load_hf_config(path: str, **overrides) -> ModelConfig:
    """ModelConfig from `path`/config.json; `overrides` set non-HF fields (dtype, param_dtype, remat_policy,
    scan_layers)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF model directory not found: {path}")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            d = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{config_path} not found (an HF model dir needs config.json)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from e
    try:
        return ModelConfig.from_hf_dict(d, **overrides)
    except KeyError as e:
        raise ValueError(f"{config_path} lacks the required key {e}") from e


def load_hf(path: str, mesh: jax.sharding.Mesh | None = None, rules=None, **overrides) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF directory; with `mesh`, params are created directly as sharded arrays
    (each device reads only its slice). Errors name the missing / corrupt file or the mismatched tensor."""
    config = load_hf_config(path, **overrides)
    params = assemble_params(config, HFDirSource(path), mesh, rules)
    return config, params


def export_hf(params: dict, config: ModelConfig, out_dir: str, tokenizer=None,
              max_shard_bytes: int = 4 * 1024**3) -> str:
    """Write config.json, generation_config.json and model.safetensors (or model-0000k-of-0000n.safetensors
    + model.safetensors.index.json above `max_shard_bytes`) in the params' dtype, plus the tokenizer if given;
    loadable with transformers AutoModelForCausalLM.from_pretrained(out_dir). Sharded / multi-host params are
    gathered; only process 0 writes."""
    write = jax.process_index() == 0
    if write:
        os.makedirs(out_dir, exist_ok=True)
    # Plan the shards from the shapes so that each shard is written (and freed) as soon as it is complete.
    itemsize = {path: get_path(params, path).dtype.itemsize for path in hf_layout(config)}
    shard_of: dict[str, int] = {}
    num_shards, size, total = 1, 0, 0
    for path, spec in hf_layout(config).items():
        nbytes = math.prod(spec.hf_shape) * itemsize[path]
        for i in range(config.num_layers if spec.stacked else 1):
            if size and size + nbytes > max_shard_bytes:
                num_shards, size = num_shards + 1, 0
            shard_of[spec.hf_name.format(i=i)] = num_shards - 1
            size += nbytes
            total += nbytes
    fnames = ["model.safetensors"] if num_shards == 1 else [
        f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)
    ]
    pending: dict[str, np.ndarray] = {}
    current, dtypes = 0, set()
    for name, array in hf_tensors(params, config):  # every process takes part (gathers of sharded leaves)
        dtypes.add(array.dtype.name)
        if shard_of[name] != current:
            if write:
                write_file(os.path.join(out_dir, fnames[current]), pending)
            pending, current = {}, shard_of[name]
        pending[name] = array
    if not write:
        return out_dir
    write_file(os.path.join(out_dir, fnames[current]), pending)
    if num_shards > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {name: fnames[k] for name, k in shard_of.items()}}, f, indent=2)
    hf = config.to_hf_dict()
    hf["dtype"] = "bfloat16" if "bfloat16" in dtypes else "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_hf_tokenizer(path: str):
    """The tokenizer of HF directory ``path`` (None when it has none of `TOKENIZER_FILES`): a
    ``tokenizer.json`` whose ``tokenizer_config.json`` names a `FAST_BACKEND_CLASSES` class (our GGUF conversions,
    the shipped tokenizers) loads as ``transformers.PreTrainedTokenizerFast``, anything else through
    ``AutoTokenizer`` (model-specific tokenizer classes, sentencepiece files); either way the object
    ``AutoTokenizer.from_pretrained(path)`` returns."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        tokenizer_class = None
    if tokenizer_class in FAST_BACKEND_CLASSES and os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast  # deferred: transformers' tokenizer base only

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer  # deferred: importing AutoTokenizer takes seconds

    return AutoTokenizer.from_pretrained(path)
