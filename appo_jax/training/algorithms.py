"""The algorithms: each is an `AlgorithmSpec` registered by name (docs/algorithm.md §1.7; adding one:
docs/architecture.md, "Adding an algorithm").

A spec names three registered parts and a few switches, and nothing else in the code branches on an algorithm's
name:

* ``rollout_strategy``: a rollout strategy of `appo_jax.rollout.strategies.STRATEGIES` (how rollouts are drawn, which
  rows train);
* ``advantage``: an estimator of `appo_jax.core.registry.ADVANTAGES`;
* ``loss_mode`` / ``clip_high``: a mode of `appo_jax.core.registry.POLICY_LOSSES` and its clip-high default;
* ``score``: the Branching Score mode of `appo_jax.core.branch_points.SCORE_MODES` (APPO strategies);
  ``prefix_credit`` / ``procedure_scaling``: APPO's advantage components; ``train_branches``: branch rows enter
  the loss (ARPO-style trees train on every rollout; APPO never does); ``dynamic_sampling``: DAPO's drop of groups
  whose rewards all agree (independent sampling only); ``description``: one line for people
  (``appo-jax train --list-algorithms``).

The experiment config may override the switches (``algorithm.procedure_scaling``, ``algorithm.dynamic_sampling``,
``loss.mode``, ``loss.clip_high``): `AlgorithmSpec.with_overrides` applies them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from appo_jax.core.branch_points import SCORE_MODES
from appo_jax.core.registry import ADVANTAGES, POLICY_LOSSES
from appo_jax.rollout.strategies import STRATEGIES, DynamicSampling, RolloutStrategy


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an algorithm name means (module doc)."""

    name: str
    rollout_strategy: str
    advantage: str
    loss_mode: str
    clip_high: float
    score: str = "appo"
    prefix_credit: bool = True
    procedure_scaling: str = "reward"
    train_branches: bool = False
    dynamic_sampling: bool = False
    description: str = ""

    def __post_init__(self):
        for what, value, names in (("rollout strategy", self.rollout_strategy, STRATEGIES.names()),
                                   ("advantage estimator", self.advantage, ADVANTAGES.names()),
                                   ("policy loss", self.loss_mode, POLICY_LOSSES.names()),
                                   ("branching score", self.score, list(SCORE_MODES))):
            if value not in names:
                raise ValueError(f"algorithm {self.name!r}: unknown {what} {value!r}; known: {', '.join(names)}")

    def with_overrides(self, **changes: Any) -> "AlgorithmSpec":
        """The spec with the config's explicit overrides (keys whose value is not None)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def advantage_options(self, algorithm) -> dict:
        """Keyword options of the advantage estimator (each estimator takes what it needs): from the spec and the
        config's ``algorithm`` section."""
        return dict(norm_by_std=algorithm.norm_by_std, procedure_scaling=self.procedure_scaling,
                    reward_scale_discount=algorithm.reward_scale_discount, prefix_credit=self.prefix_credit,
                    entropy_alpha=algorithm.aepo_entropy_alpha, gigpo_gamma=algorithm.gigpo_gamma,
                    gigpo_step_weight=algorithm.gigpo_step_weight)

    def strategy(self, algorithm, rollout, *, table=None, logprobs: Callable | None = None,
                 place: Callable | None = None, labeller: Callable | None = None,
                 to_host: Callable | None = None) -> RolloutStrategy:
        """The rollout strategy of this algorithm for the config's ``algorithm`` / ``rollout`` sections;
        ``table`` (branch-candidate tokens), ``logprobs(traj) -> (lc, lb)``, ``place`` / ``to_host`` (to the mesh
        and back) and ``labeller`` (decision tokens, for the oracle) serve branching strategies."""
        options = dict(n=algorithm.n, n_init=algorithm.n_init, table=table, logprobs=logprobs, score=self.score,
                       gamma=float(algorithm.omega_gamma), clip_eps=float(algorithm.omega_clip),
                       aepo_penalty=rollout.aepo_penalty, labeller=labeller, parity=algorithm.branching_parity)
        if place is not None:
            options["place"] = place
        if to_host is not None:
            options["to_host"] = to_host
        strategy = STRATEGIES.get(self.rollout_strategy)(**options)
        if self.dynamic_sampling:
            strategy = DynamicSampling(strategy, algorithm.max_resample_rounds)
        return strategy


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register_algorithm(spec: AlgorithmSpec, *, override: bool = False) -> AlgorithmSpec:
    """Make ``spec`` available as ``algorithm.name = spec.name``; a taken name needs ``override=True``."""
    if spec.name in ALGORITHMS and not override:
        raise ValueError(f"algorithm {spec.name!r} is already registered")
    ALGORITHMS[spec.name] = spec
    return spec


def get_algorithm(name: str) -> AlgorithmSpec:
    """The registered spec called ``name``; ``ValueError`` listing the known algorithms otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


_APPO = dict(rollout_strategy="appo", advantage="appo", loss_mode="future_kl", clip_high=0.28)
for _spec in (
    AlgorithmSpec("grpo", "independent", "grpo", "dual_clip", 0.2, procedure_scaling="none",
                  description="GRPO: group-normalised outcome advantages over n independent rollouts, dual-clip "
                              "PPO loss (Shao et al. 2024)"),
    AlgorithmSpec("dapo", "independent", "grpo", "ppo", 0.28, procedure_scaling="none", dynamic_sampling=True,
                  description="DAPO-style: GRPO advantages, clip-higher PPO (0.2 / 0.28) and dynamic sampling "
                              "(groups whose rewards all agree are dropped and refilled)"),
    # the paper's other baselines (docs/algorithm.md §1.9)
    AlgorithmSpec("reinforce_pp", "independent", "reinforce_pp", "ppo", 0.2, procedure_scaling="none",
                  description="Reinforce++: outcome rewards normalised over every token of the batch (no group "
                              "baseline), PPO clip (Hu 2025; the KL-in-reward form is not implemented)"),
    AlgorithmSpec("reinforce_pp_baseline", "independent", "reinforce_pp_baseline", "ppo", 0.2,
                  procedure_scaling="none",
                  description="Reinforce++ with the prompt group's mean reward subtracted before the batch "
                              "normalisation (Hu 2025)"),
    AlgorithmSpec("gppo", "independent", "grpo", "gppo", 0.28, procedure_scaling="none",
                  description="GPPO: GRPO advantages, gradient-preserving clipping (clipped tokens keep a bounded "
                              "gradient; Klear-Reasoner 2025)"),
    AlgorithmSpec("cispo", "independent", "grpo", "cispo", 0.28, procedure_scaling="none",
                  description="CISPO: GRPO advantages, policy gradient weighted by the detached importance ratio "
                              "clipped from above; no token dropped (MiniMax-M1 2025)"),
    AlgorithmSpec("gigpo", "independent", "gigpo", "dual_clip", 0.2, procedure_scaling="none",
                  description="GiGPO: episode-level GRPO plus step-level advantages of steps grouped by the "
                              "observations received before them (verl-agent 2025)"),
    AlgorithmSpec("arpo", "arpo", "arpo", "dual_clip", 0.2, procedure_scaling="none", train_branches=True,
                  description="ARPO: entropy-triggered branching after tool results, GRPO over all n rollouts "
                              "(branches train)"),
    AlgorithmSpec("aepo", "aepo", "aepo", "aepo", 0.2, procedure_scaling="none", train_branches=True,
                  description="AEPO: ARPO branching with a consecutive-branch penalty, entropy-weighted advantages, "
                              "stop-gradient clip-high loss (Dong et al. 2025)"),
    AlgorithmSpec("tree_grpo", "tree", "tree_grpo", "dual_clip", 0.2, procedure_scaling="none",
                  train_branches=True,
                  description="Tree-GRPO: trees of tool steps grown by random node expansion, GRPO over the prompt "
                              "group plus over each tree"),
    AlgorithmSpec("appo", **_APPO,
                  description="APPO: n_init rollouts branched where Z(entropy) x Z(Omega) is highest, dual-group "
                              "advantages with prefix credit, future-KL loss; only initial rows train"),
    AlgorithmSpec("appo_entropy_only", **_APPO, score="entropy",
                  description="APPO ablation: Branching Score Z(entropy) alone (Omega = 1)"),
    AlgorithmSpec("appo_omega_only", **_APPO, score="omega",
                  description="APPO ablation: Branching Score Z(Omega) alone (entropy = 1)"),
    AlgorithmSpec("appo_no_prefix_credit", **_APPO, prefix_credit=False,
                  description="APPO ablation: no prefix credit (initial rows get only their own group advantage)"),
    AlgorithmSpec("appo_no_procedure_scaling", **_APPO, procedure_scaling="none",
                  description="APPO ablation: no procedure-level reward scaling (M = 1)"),
    AlgorithmSpec("appo_no_future_kl", **{**_APPO, "loss_mode": "dual_clip"},
                  description="APPO ablation: the dual-clip loss (clip-high 0.28) instead of future-KL weighting"),
    AlgorithmSpec("appo_oracle", **_APPO, score="oracle",
                  description="APPO branching at labelled decision tokens (mini tasks only; an upper bound)"),
):
    register_algorithm(_spec)
