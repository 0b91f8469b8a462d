"""One way to name a policy for `eval` and `serve`: a model spec, a GGUF / HF checkpoint, or a `train` workdir.

``resolve_policy(spec)`` accepts

* what :func:`appo_jax.models.loading.load_policy` accepts: a preset name (random weights, needs ``tokenizer``),
  ``smollm2-135m-instruct``, a ``.gguf`` file, an HF directory (``config.json`` + safetensors);
* a ``train`` workdir (a directory holding the run's ``config.json`` and ``checkpoints/``): the run's model and
  tokenizer with the parameters of its latest complete checkpoint, or of step ``N`` with ``WORKDIR@N``.

Each policy carries a ``model_id`` that says exactly which weights answered: the workdir and step
(``runs/x@step30``), or the file / directory with a fingerprint of its weight files (sha256 over each file's name,
size, first and last MiB: cheap for a 15 GB checkpoint, and it changes when the weights do), or the preset with its
initialisation seed and tokenizer. Evaluation records it in every answer row and refuses to mix two ids in one
output directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from appo_jax.models.loading import load_policy, resolve_model_path
from appo_jax.training.checkpoint import load_checkpoint_params
from appo_jax.training.config import from_dict

_MIB = 1 << 20


@dataclasses.dataclass
class Policy:
    """A loaded policy: model ``config``, ``params``, ``tokenizer`` and the ``model_id`` of its weights."""

    config: Any
    params: Any
    tokenizer: Any
    model_id: str


def weights_fingerprint(paths) -> str:
    """``sha256:`` + 16 hex digits over each file's name, size and first and last MiB (module doc)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_MIB))
            if size > 2 * _MIB:
                f.seek(size - _MIB)
                digest.update(f.read(_MIB))
    return "sha256:" + digest.hexdigest()[:16]


def is_train_workdir(path: str | Path) -> bool:
    """A directory written by `appo-jax train`: its ``config.json`` and ``checkpoints/``."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def _split_step(spec: str) -> tuple[str, int | None]:
    """``"DIR@N"`` -> ``("DIR", N)`` when DIR is a train workdir; else ``(spec, None)``."""
    head, sep, tail = spec.rpartition("@")
    if sep and tail.isdigit() and is_train_workdir(head):
        return head, int(tail)
    return spec, None


def resolve_policy(spec: str, tokenizer: str = "", dtype: str = "float32", init_seed: int = 0) -> Policy:
    """The policy named by ``spec`` (module doc); ``tokenizer`` replaces the model's own (required for a random
    preset); ``dtype`` the compute dtype. ``ValueError`` / ``FileNotFoundError`` with what was expected."""
    path, step = _split_step(spec)
    if is_train_workdir(path):
        return _trained_policy(Path(path), step, tokenizer, dtype)
    if spec.endswith("@") or ("@" in spec and Path(spec.rpartition("@")[0]).is_dir()):
        raise ValueError(f"--model {spec!r}: WORKDIR@STEP needs a train workdir (config.json + checkpoints/) and an "
                         "integer step")
    model_id = policy_id(spec, tokenizer, init_seed)
    config, params, tok = load_policy(spec, tokenizer, dtype=dtype, init_seed=init_seed)
    return Policy(config, params, tok, model_id)


def policy_id(spec: str, tokenizer: str = "", init_seed: int = 0) -> str:
    """The ``model_id`` :func:`resolve_policy` gives ``spec`` (module doc), without loading any weights: a command
    can refuse a mismatch before minutes of loading."""
    path, step = _split_step(spec)
    if is_train_workdir(path):
        steps = sorted(int(p.name) for p in (Path(path) / "checkpoints").iterdir() if p.name.isdigit())
        return f"{Path(path).resolve()}@step{step if step is not None else (steps[-1] if steps else 'none')}"
    resolved = resolve_model_path(spec)
    if resolved.endswith(".gguf") and Path(resolved).is_file():
        return f"{Path(resolved).resolve()} {weights_fingerprint([resolved])}"
    if Path(resolved).is_dir():
        files = sorted(Path(resolved).glob("*.safetensors"))
        return f"{Path(resolved).resolve()} {weights_fingerprint(files)}"
    return f"{spec} (random init, seed {init_seed}, tokenizer {tokenizer or 'own'})"


def _trained_policy(workdir: Path, step: int | None, tokenizer: str, dtype: str) -> Policy:
    """The run's model (``model.name`` / ``model.tokenizer`` of its config) with checkpoint ``step``'s params."""
    cfg = from_dict(json.loads((workdir / "config.json").read_text(encoding="utf-8")))
    m = cfg.model
    config, init, tok = load_policy(m.name, tokenizer or m.tokenizer, dtype=dtype, param_dtype=m.param_dtype or None,
                                    init_seed=m.init_seed)
    params, step = load_checkpoint_params(workdir / "checkpoints", step)
    want = jax.tree.structure(init)
    if jax.tree.structure(params) != want:
        raise ValueError(f"checkpoint {workdir}@{step} does not hold the parameters of model {m.name!r} "
                         "(different tree structure)")
    params = jax.tree.map(lambda p, ref: jnp.asarray(p, ref.dtype), params, init)
    return Policy(config, params, tok, f"{workdir.resolve()}@step{step}")
