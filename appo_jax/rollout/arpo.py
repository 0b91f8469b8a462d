"""ARPO / AEPO entropy-triggered branching after tool results (docs/algorithm.md §1.7), as :class:`LoopHooks`.

Per prompt group: ``n_init`` initial rollouts run through the tool loop. For every rollout the hooks see

* the first segment's first ``probe_len`` (20) generated tokens: ``H_init = mean(H) / ln|V|``;
* after each tool result, the new segment's first ``probe_len`` generated tokens: ``H = mean(H) / ln|V|``,
  ``dH = H - H_init`` and the branch probability

      p = clip(alpha + beta * dH, 0, 1)                      (alpha = 0.5, beta = 0.2)
      p = p * max(0, 1 - penalty * c)                        (AEPO: c = consecutive branching rounds so far)

  With probability ``p`` (one uniform draw per rollout and round) the rollout is copied ``beam - 1`` times
  (default 1) from its response right after the tool result: each copy re-samples the segment from there
  (``branch_pos`` = the last observation token). No copy is made once the group holds ``n`` rollouts.

A copy inherits ``H_init`` and the consecutive-branch counter (AEPO: ``c + 1`` for the copy and the parent when
the round branched, reset to 0 when it did not) and may branch again at its own later tool results. When every
rollout of a group has finished and the group still holds fewer than ``n`` rollouts, it is topped up with fresh
independent rollouts (kind init), which may branch as well, so every group ends with exactly ``n`` rows.

The whole scheme is one call of the engine's primitive with these hooks (:func:`arpo_rollouts`); the strategies
``arpo`` and ``aepo`` (:class:`ArpoBranching`, options :class:`ArpoOptions` / :class:`AepoOptions`: the
``algorithm`` section's ``arpo_alpha``, ``arpo_beta``, ``arpo_beam`` and, for AEPO, ``aepo_penalty``) are
registered here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import numpy as np

from appo_jax.core.trajectory import KIND_BRANCH, KIND_INIT
from appo_jax.data.records import Record
from appo_jax.rollout.agent_loop import Prefix, Rollout, RolloutRequest
from appo_jax.rollout.engine import RolloutBatch, RolloutEngine
from appo_jax.rollout.strategies import STRATEGIES, EveryRowTrains, check_budget


@dataclass(frozen=True)
class ArpoConfig:
    """alpha / beta of the branch probability, ``beam`` (copies per branching round = beam - 1) and the AEPO
    consecutive-branch ``penalty`` (0 = plain ARPO, 0.05 = AEPO)."""

    alpha: float = 0.5
    beta: float = 0.2
    beam: int = 2
    penalty: float = 0.0


def branch_probability(h: float, h_init: float, consecutive: int, cfg: ArpoConfig) -> float:
    """``clip(alpha + beta * (h - h_init), 0, 1) * max(0, 1 - penalty * consecutive)`` (entropies already
    normalised by ln|V|)."""
    p = min(max(cfg.alpha + cfg.beta * (h - h_init), 0.0), 1.0)
    return p * max(0.0, 1.0 - cfg.penalty * consecutive)


class ArpoHooks:
    """The branching scheme of the module doc for ``num_groups`` groups of ``n`` rollouts.

    ``make_request(group, local, prefix, parent_local, branch_pos, kind)`` builds the request for row ``local``
    of ``group`` (``prefix`` None for a fresh rollout); the hooks store their own state in ``request.meta``
    under keys ``arpo_*``. ``seed`` drives the branching draws, which depend only on (seed, group, local row,
    round). ``vocab_size`` gives the ln|V| normalisation.
    """

    def __init__(self, num_groups: int, n: int, n_init: int, vocab_size: int, cfg: ArpoConfig, seed: int,
                 make_request: Callable[..., RolloutRequest]):
        if not 1 <= n_init <= n:
            raise ValueError(f"ARPO needs 1 <= n_init <= n, got n_init={n_init}, n={n}")
        if cfg.beam < 2:
            raise ValueError(f"ARPO beam must be >= 2 (beam - 1 copies per round), got {cfg.beam}")
        self.n, self.cfg, self.seed = n, cfg, int(seed)
        self.log_vocab = math.log(vocab_size)
        self.make_request = make_request
        self.count = [n_init] * num_groups     # rows created per group
        self.pending = [n_init] * num_groups   # rows not finished yet

    def initial_requests(self, groups: Sequence[int] | None = None) -> list[RolloutRequest]:
        """The ``n_init`` fresh rollouts of every group (or of ``groups``), rows ``0 .. n_init - 1``."""
        groups = range(len(self.count)) if groups is None else groups
        return [self._fresh(g, j) for g in groups for j in range(self.count[g])]

    def _fresh(self, g: int, local: int) -> RolloutRequest:
        req = self.make_request(g, local, None, -1, -1, KIND_INIT)
        req.meta.update(arpo_round=0, arpo_consecutive=0)
        return req

    def on_probe(self, request: RolloutRequest, prefix: Prefix, mean_entropy: float, first: bool):
        """Record ``H_init`` on the first probe; after a tool result, copy the rollout with the branch probability
        (module doc). Returns the copies' requests."""
        h = mean_entropy / self.log_vocab
        if first:
            request.meta["arpo_h_init"] = h
            return []
        g, local = request.meta["group"], request.meta["local"]
        rnd = request.meta["arpo_round"] = request.meta.get("arpo_round", 0) + 1
        c = request.meta.get("arpo_consecutive", 0)
        h_init = request.meta.get("arpo_h_init", h)
        p = branch_probability(h, h_init, c, self.cfg)
        u = np.random.default_rng([self.seed, g, local, rnd]).random()
        copies = min(self.cfg.beam - 1, self.n - self.count[g]) if u < p else 0
        request.meta["arpo_consecutive"] = c + 1 if copies > 0 else 0
        out = []
        for _ in range(copies):
            child = self.make_request(g, self.count[g], prefix, local, len(prefix) - 1, KIND_BRANCH)
            child.meta.update(arpo_h_init=h_init, arpo_round=rnd, arpo_consecutive=c + 1)
            self.count[g] += 1
            self.pending[g] += 1
            out.append(child)
        return out

    def on_finish(self, rollout: Rollout):
        """When the last pending rollout of a group finishes, top the group up to ``n`` with fresh rollouts."""
        g = rollout.request.meta["group"]
        self.pending[g] -= 1
        out = []
        if self.pending[g] == 0:
            while self.count[g] < self.n:
                out.append(self._fresh(g, self.count[g]))
                self.count[g] += 1
                self.pending[g] += 1
        return out


def arpo_rollouts(engine: RolloutEngine, prompts: Sequence[Record], n: int, n_init: int, key, cfg: ArpoConfig,
                  progress=None) -> RolloutBatch:
    """ARPO groups of ``n`` rows (module doc; AEPO: ``cfg.penalty`` > 0) in one call of the engine's primitive:
    row ``g * n + j``, ``parent`` a row of the same group, the branching draws seeded from ``key``."""
    seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))

    def make(g, local, prefix, parent_local, branch_pos, kind):
        return engine.request(key, prompts[g], g, local, prefix=prefix, kind=kind,
                              parent=-1 if parent_local < 0 else g * n + parent_local, branch_pos=branch_pos)

    hooks = ArpoHooks(len(prompts), n, n_init, engine.vocab_size, cfg, seed, make)
    requests = hooks.initial_requests(engine.own_groups(len(prompts)))
    return engine.rollout(requests, len(prompts), n, hooks=hooks, progress=progress)


@dataclass(frozen=True)
class ArpoOptions:
    """ARPO's knobs (the ``algorithm`` section's fields of the same names): ``n`` rows per group, ``n_init``
    initial rollouts, ``arpo_alpha`` / ``arpo_beta`` of the branch probability and ``arpo_beam`` (copies per
    branching round = beam - 1)."""

    n: int = 16
    n_init: int = 8
    arpo_alpha: float = ArpoConfig.alpha
    arpo_beta: float = ArpoConfig.beta
    arpo_beam: int = ArpoConfig.beam

    def __post_init__(self):
        check_budget(self.n, self.n_init)

    def config(self) -> ArpoConfig:
        """The hooks' :class:`ArpoConfig` (no consecutive-branch penalty)."""
        return ArpoConfig(self.arpo_alpha, self.arpo_beta, self.arpo_beam, 0.0)


@dataclass(frozen=True)
class AepoOptions(ArpoOptions):
    """AEPO's knobs: ARPO's plus ``aepo_penalty``, the consecutive-branch penalty (0.05)."""

    aepo_penalty: float = 0.05

    def config(self) -> ArpoConfig:
        """The hooks' :class:`ArpoConfig` with the penalty."""
        return ArpoConfig(self.arpo_alpha, self.arpo_beta, self.arpo_beam, self.aepo_penalty)


@dataclass
class ArpoBranching(EveryRowTrains):
    """ARPO / AEPO (docs/algorithm.md §1.7): groups of ``n`` rows grown by entropy-triggered copies after tool
    results (:func:`arpo_rollouts`; the penalty is AEPO's when the options are :class:`AepoOptions`); every row
    trains."""

    options: ArpoOptions = field(default_factory=ArpoOptions)
    branches = True

    def draw(self, engine, prompts, key, progress):
        """:func:`arpo_rollouts` with the options' knobs."""
        o = self.options
        return arpo_rollouts(engine, prompts, o.n, o.n_init, key, o.config(), progress)


STRATEGIES.register("arpo", ArpoBranching, options=ArpoOptions)
STRATEGIES.register("aepo", ArpoBranching, options=AepoOptions)
