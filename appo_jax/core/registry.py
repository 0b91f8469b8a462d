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

**Options.** An entry may declare its knobs as a frozen dataclass, ``register(name, options=MyOptions)`` (an entry
without knobs gets :class:`NoOptions`); ``Registry.options(name)`` returns that class. :func:`make_options` builds
one from a mapping and rejects a key the class does not have (an error naming the entry and its known keys: a
misspelt knob never silently does nothing); :func:`pick_options` takes, from a larger namespace of values, the
ones the class has. Frozen dataclasses are hashable, so an options object can be a jit static argument.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping


class UnknownNameError(ValueError, KeyError):
    """A registry lookup of an unknown name (catchable as ``ValueError`` or ``KeyError``)."""


class UnknownOptionError(ValueError, TypeError):
    """An option key that the options class of an entry does not have (catchable as ``ValueError`` or
    ``TypeError``); the message names the entry and its known keys."""


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of an entry without knobs."""


def option_names(options_class: type) -> tuple[str, ...]:
    """The field names of an options dataclass, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(options_class))


def make_options(options_class: type, values: Mapping[str, Any], *, owner: str):
    """``options_class(**values)``; a key that is not a field raises :class:`UnknownOptionError` naming ``owner``
    (e.g. ``"rollout strategy 'tree'"``) and the known keys."""
    names = option_names(options_class)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UnknownOptionError(f"{owner}: unknown option(s) {', '.join(map(repr, unknown))}; known: "
                                 f"{', '.join(names) or 'none'} ({options_class.__name__})")
    return options_class(**values)


def pick_options(options_class: type, namespace: Mapping[str, Any]):
    """An ``options_class`` whose fields take the values of the same name in ``namespace`` (the fields it lacks
    keep their defaults; the namespace's other names are not this class's business)."""
    return options_class(**{name: namespace[name] for name in option_names(options_class) if name in namespace})


def _check_options_class(options_class: type) -> None:
    if not (isinstance(options_class, type) and dataclasses.is_dataclass(options_class)
            and options_class.__dataclass_params__.frozen):
        raise TypeError(f"options must be a frozen dataclass (hashable, a jit static argument), got {options_class!r}")


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
        self._options: dict[str, type] = {}

    def _load(self) -> None:
        for module in self._providers:  # the modules whose import registers the built-in entries
            importlib.import_module(module)

    def register(self, name: str, fn: Callable | None = None, *, override: bool = False,
                 options: type | None = None):
        """Add ``fn`` as ``name`` (a decorator when ``fn`` is None); ``options``: its options dataclass (frozen;
        default :class:`NoOptions`)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if options is not None:
            _check_options_class(options)

        def add(f: Callable) -> Callable:
            if name in self._items and not override:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = f
            self._options[name] = options or NoOptions
            return f

        return add if fn is None else add(fn)

    def remove(self, name: str) -> None:
        """Forget ``name`` (nothing happens when it is not registered)."""
        self._items.pop(name, None)
        self._options.pop(name, None)

    def options(self, name: str) -> type:
        """The options dataclass of ``name`` (:class:`UnknownNameError` for an unknown name)."""
        self.get(name)
        return self._options.get(name, NoOptions)

    def make_options(self, name: str, values: Mapping[str, Any]):
        """The options of ``name`` from ``values`` (:func:`make_options`: an unknown key is an error)."""
        return make_options(self.options(name), values, owner=f"{self.kind} {name!r}")

    def get(self, name: str) -> Callable:
        """The entry registered as ``name`` (:class:`UnknownNameError` listing the known names otherwise)."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


#: Token-advantage estimators: ``fn(*, options, **fields) -> [N, L]``, each with its options dataclass (see
#: ``appo_jax.core.advantages``).
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
