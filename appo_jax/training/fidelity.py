"""Fidelity to the official APPO implementation (AMAP-ML/APPO, docs/official_differences.md): the config values
that switch every switchable difference to the official behaviour, in one place.

``OFFICIAL`` maps ``section.field`` to its official value; `official_fidelity` applies it to a config. The
defaults of this project stay its own (each difference and why is in the document); ``experiments/official.py``
and the mini grid's ``appo_official`` method are the configs that use it.
"""
from __future__ import annotations

from appo_jax.training.config import ExperimentConfig, set_value

#: ``section.field`` -> official value (docs/official_differences.md, "config line" column).
OFFICIAL = {
    "algorithm.branching_parity": "official",  # Z over loss-mask tokens with std + 1e-6, whitespace filter, L - 1
    "rollout.entropy": "official_topk",        # H from vLLM's top-10 log-probs (+ the sampled token), unnormalised
    "rollout.entropy_k": "10",
}


def official_fidelity(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with every value of `OFFICIAL` set (in place; returned for chaining)."""
    for key, value in OFFICIAL.items():
        set_value(cfg, key, value)
    return cfg
