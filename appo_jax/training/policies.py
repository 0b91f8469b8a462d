"""The policies an iteration reads, owned by one object: current, reference and lagged (docs/algorithm.md §1.1).

* current: the train state's parameters, which the caller passes to every call that needs them
  (`Policies.current_and_baseline(params, traj)`, `Policies.iteration_done(params)`): nothing here holds them;
* reference: the KL term's pi_ref and the ``reference`` Omega baseline (the initial policy, or a given model;
  after cold-start SFT, the SFT result);
* lagged: copies of the current parameters of the last ``omega_lag`` iterations, for the ``lagged`` baseline.

``algorithm.omega_baseline`` picks the behaviour log-probs lb of Omega from a table of methods:
``sampler`` (the log-probs the sampler recorded), ``lagged`` (the policy of ``omega_lag`` iterations ago; the
current policy until that many iterations exist, i.e. Omega = 1 and entropy-only ranking) or ``reference``.
Log-probs are computed by one jitted, micro-batched function on the run's `Placement`.
"""
from __future__ import annotations

from collections import deque

import jax
import jax.numpy as jnp

from appo_jax.core.trajectory import Trajectory
from appo_jax.models.logprobs import make_logprob_fn
from appo_jax.parallel.placement import Placement

OMEGA_BASELINES = ("sampler", "lagged", "reference")


@jax.jit
def copy_tree(tree):
    """Fresh device buffers with the values of ``tree`` (so a later donation of ``tree`` cannot delete them)."""
    return jax.tree.map(jnp.copy, tree)


class Policies:
    """Current, reference and lagged parameters and their log-probs (module doc). ``reference`` None means no
    reference is kept (KL coefficient 0 and a baseline other than ``reference``)."""

    def __init__(self, model_config, placement: Placement, *, chunk: int, temperature: float, micro_rows: int,
                 baseline: str, lag: int, reference=None):
        if baseline not in OMEGA_BASELINES:
            raise ValueError(f"algorithm.omega_baseline={baseline!r}; expected one of {', '.join(OMEGA_BASELINES)}")
        self.placement = placement
        self._logprob_fn = make_logprob_fn(model_config, chunk=chunk, temperature=temperature, micro_rows=micro_rows)
        self._baseline = {"sampler": self._sampler_baseline, "lagged": self._lagged_baseline,
                          "reference": self._reference_baseline}[baseline]
        self.keeps_lagged = baseline == "lagged"
        self.reference = reference
        self.lagged: deque = deque(maxlen=lag)

    # -- log-probs -----------------------------------------------------------------------------------------------
    def logprobs(self, params, traj: Trajectory) -> jax.Array:
        """``log pi_params(a_t | s_t)`` ``[N, L]`` of the responses of ``traj`` (rows on the placement)."""
        p = self.placement
        with p.context():
            return self._logprob_fn(params, p.rows(traj.prompt_tokens), p.rows(traj.prompt_mask),
                                    p.rows(traj.tokens), p.rows(traj.response_mask))

    def current_and_baseline(self, params, traj: Trajectory) -> tuple[jax.Array, jax.Array]:
        """``(lc, lb)`` of ``traj``: the log-probs under the current parameters ``params`` and the behaviour
        baseline of Omega (a `appo_jax.rollout.strategies.LogProbs` callback)."""
        lc = self.logprobs(params, traj)
        return lc, self._baseline(traj, lc)

    def reference_logprobs(self, traj: Trajectory) -> jax.Array | None:
        """Reference-policy log-probs of ``traj`` (None without a reference)."""
        return None if self.reference is None else self.logprobs(self.reference, traj)

    def _sampler_baseline(self, traj, lc):
        return self.placement.rows(traj.behavior_logp)

    def _lagged_baseline(self, traj, lc):
        return self.logprobs(self.lagged[0], traj) if len(self.lagged) == self.lagged.maxlen else lc

    def _reference_baseline(self, traj, lc):
        return self.reference_logprobs(traj)

    # -- updates and checkpoints ---------------------------------------------------------------------------------
    def iteration_done(self, params) -> None:
        """Keep a copy of this iteration's (pre-update) current parameters ``params`` for the ``lagged``
        baseline."""
        if self.keeps_lagged:
            self.lagged.append(copy_tree(params))

    def checkpoint_extras(self, with_reference: bool) -> dict:
        """What a checkpoint must hold besides the train state: the lagged copies (``lagged``) and, when asked
        (the reference changed from the loaded one, e.g. after SFT), the reference (``reference``)."""
        extra = {}
        if self.lagged:
            extra["lagged"] = {str(i): p for i, p in enumerate(self.lagged)}
        if with_reference and self.reference is not None:
            extra["reference"] = self.reference
        return extra

    def restore_target(self, lagged_count: int, with_reference: bool, like) -> dict:
        """The pytree structure `checkpoint_extras` wrote, for restoring (``like``: params of the right shapes)."""
        target = {}
        if lagged_count:
            target["lagged"] = {str(i): like for i in range(lagged_count)}
        if with_reference and self.reference is not None:
            target["reference"] = self.reference
        return target

    def restore(self, extras: dict) -> None:
        """Take the lagged copies and the reference from restored ``extras``."""
        if "reference" in extras:
            self.reference = extras["reference"]
        self.lagged.clear()
        for i in range(len(extras.get("lagged", {}))):
            self.lagged.append(extras["lagged"][str(i)])
