"""Name -> function registries, so that an algorithm is a config choice (``advantage="appo"``,
``policy_loss="future_kl"``) instead of an ``if`` ladder in the trainer.

Three registries exist: :data:`ADVANTAGES` (token-advantage estimators, filled by
``appo_jax.core.advantages``), :data:`POLICY_LOSSES` (policy-loss modes, filled by
``appo_jax.core.losses``) and :data:`CONTROLS` (negative controls on the rewards, ``appo_jax.core.controls``). Looking a name up imports its provider module first, so
``get_advantage("appo")`` works without importing ``advantages`` yourself. Extra entries can be added
from anywhere with ``@ADVANTAGES.register("my_estimator")``.
"""
from __future__ import annotations

import importlib
from typing import Callable


class UnknownNameError(ValueError, KeyError):
    """A registry lookup of an unknown name (catchable as ``ValueError`` or ``KeyError``)."""


class Registry:
    """A small ``name -> callable`` map with clear errors.

    ``register(name)`` is a decorator (or ``register(name, fn)`` a call); registering a taken name raises
    ``ValueError`` unless ``override=True``. ``get(name)`` raises :class:`UnknownNameError` whose message
    names the registry and lists every known name.
    """

    def __init__(self, kind: str, provider: str | tuple[str, ...] | None = None):
        self.kind = kind
        self._providers = (provider,) if isinstance(provider, str) else tuple(provider or ())
        self._items: dict[str, Callable] = {}

    def _load(self) -> None:
        for module in self._providers:  # the modules whose import registers the built-in entries
            importlib.import_module(module)

    def register(self, name: str, fn: Callable | None = None, *, override: bool = False):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(f: Callable) -> Callable:
            if name in self._items and not override:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = f
            return f

        return add if fn is None else add(fn)

    def get(self, name: str) -> Callable:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


#: Token-advantage estimators: ``fn(**fields) -> [N, L]`` (see ``appo_jax.core.advantages``).
ADVANTAGES = Registry("advantage estimator", provider=("appo_jax.core.advantages", "appo_jax.core.gigpo"))
#: Policy losses: ``fn(logp, old_logp, advantages, mask, **options) -> (loss, metrics)``.
POLICY_LOSSES = Registry("policy loss", provider="appo_jax.core.losses")
#: Negative controls: ``fn(rewards [N], group_ids [N], kind [N], key) -> rewards [N]`` (``appo_jax.core.controls``).
CONTROLS = Registry("negative control", provider="appo_jax.core.controls")


def get_advantage(name: str) -> Callable:
    """The advantage estimator registered as ``name`` (else ``UnknownNameError`` listing the known names)."""
    return ADVANTAGES.get(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name`` (else ``UnknownNameError`` listing the known names)."""
    return POLICY_LOSSES.get(name)
