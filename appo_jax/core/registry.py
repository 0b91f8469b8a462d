"""Name -> function registries, so that an algorithm is a config choice (``advantage="appo"``,
``policy_loss="future_kl"``) instead of an ``if`` ladder in the trainer.

Three registries exist: :data:`ADVANTAGES` (token-advantage estimators, filled by
``appo_jax.core.advantages``), :data:`POLICY_LOSSES` (policy-loss modes, filled by
``appo_jax.core.losses``) and :data:`CONTROLS` (negative controls on the rewards, ``appo_jax.core.controls``). Looking a name up imports its provider module first, so
``get_advantage("appo")`` works without importing ``advantages`` yourself. Extra entries can be added
from anywhere with ``@ADVANTAGES.register("my_estimator")``.

A :data:`POLICY_LOSSES` entry is a *token loss* (the calling convention is in ``appo_jax.core.losses``)::

    loss_t, stats = fn(lp, lp_old, A, m, *, clip_low, clip_high, clip_ratio_c, decay_rate, fkl_clip,
                       fkl_high_only, fkl_weight, safety_thresh)     # take what you use, then **_

``lp``, ``lp_old``, ``A`` ``[N, L]`` float (sanitised: finite, 0 where the mask ``m`` is false; ``lp_old`` and ``A``
detached), ``m`` ``[N, L]`` bool; ``loss_t`` ``[N, L]``; ``stats`` a dict with any of ``"dual"`` (bool ``[N, L]``),
``"fkl_weight"`` (``[N, L]``), ``"drop_rows"`` (bool ``[N]``). ``appo_jax.core.losses.policy_loss(..., mode=name)``
(or :func:`get_policy_loss`) wraps it with what every mode shares: importance sampling, KL and entropy terms,
aggregation and metrics. So ``@POLICY_LOSSES.register("reinforce")`` on ``lambda lp, lp_old, A, m, **_: (-A * lp,
{})`` makes ``loss.mode="reinforce"`` a valid, trainable config.
"""
from __future__ import annotations

import functools
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
#: Policy-loss modes, token losses: ``fn(lp, lp_old, A, m, **mode_options) -> (loss_t, stats)`` (module doc).
POLICY_LOSSES = Registry("policy loss mode", provider="appo_jax.core.losses")
#: Negative controls: ``fn(rewards [N], group_ids [N], kind [N], key) -> rewards [N]`` (``appo_jax.core.controls``).
CONTROLS = Registry("negative control", provider="appo_jax.core.controls")


def get_advantage(name: str) -> Callable:
    """The advantage estimator registered as ``name`` (else ``UnknownNameError`` listing the known names)."""
    return ADVANTAGES.get(name)


def get_policy_loss(name: str) -> Callable:
    """The full loss of mode ``name``: ``policy_loss(logp, old_logp, advantages, mask, **options) -> (loss,
    metrics)`` with ``mode=name`` bound (the token loss wrapped, module doc); an unknown name raises
    ``UnknownNameError`` listing the known names."""
    # deferred: appo_jax.core.losses imports this module (a cycle at the top)
    from appo_jax.core.losses import policy_loss

    POLICY_LOSSES.get(name)
    return functools.partial(policy_loss, mode=name)
