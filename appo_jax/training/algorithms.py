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

The estimator and the strategy each take a frozen options dataclass (``ADVANTAGES.options(name)``,
``STRATEGIES.options(name)``). Its fields are filled by name from the algorithm's knobs (`AlgorithmSpec.knobs`):
the config's ``algorithm`` section (``n``, ``n_init``, ``norm_by_std``, ``arpo_beta``, ``tree_rounds``, ...), the
spec's switches, and ``algorithm.options`` for the knobs of a registered estimator or strategy that have no field
of their own; a key of ``algorithm.options`` that neither takes is an error naming the algorithm and the known
keys (`AlgorithmSpec.check_options`).

The experiment config may override the switches (``algorithm.procedure_scaling``, ``algorithm.dynamic_sampling``,
``loss.mode``, ``loss.clip_high``): `AlgorithmSpec.with_overrides` applies them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from appo_jax.core.branch_points import SCORE_MODES
from appo_jax.core.registry import ADVANTAGES, POLICY_LOSSES, option_names, pick_options
from appo_jax.rollout.strategies import STRATEGIES, DynamicSampling, RolloutStrategy, StrategyContext, make_strategy

#: The spec's switches that an estimator or a strategy may read as options (fixed by the algorithm).
SPEC_KNOBS = ("score", "prefix_credit", "procedure_scaling")


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

    def knobs(self, algorithm) -> dict:
        """Every value an option of this algorithm's estimator or strategy may take, by name: the fields of the
        config's ``algorithm`` section, then the spec's switches (:data:`SPEC_KNOBS`; ``procedure_scaling`` is the
        section's resolved by `appo_jax.training.config.algorithm_spec`), then ``algorithm.options``."""
        values = {f.name: getattr(algorithm, f.name) for f in dataclasses.fields(algorithm)
                  if f.name not in ("name", "options")}
        values.update({k: getattr(self, k) for k in SPEC_KNOBS})
        options = getattr(algorithm, "options", None) or {}
        values.update({k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})  # hashable (JSON)
        return values

    def option_keys(self) -> list[str]:
        """The option names of this algorithm's estimator and rollout strategy."""
        return sorted(set(option_names(ADVANTAGES.options(self.advantage)))
                      | set(option_names(STRATEGIES.options(self.rollout_strategy))))

    def check_options(self, algorithm) -> None:
        """``ValueError`` for a key of ``algorithm.options`` that this algorithm's estimator and strategy do not
        take (naming the algorithm and the known keys), that is a field of the section (set it there) or that the
        spec fixes (:data:`SPEC_KNOBS`)."""
        section, known = {f.name for f in dataclasses.fields(algorithm)}, self.option_keys()
        for key in getattr(algorithm, "options", None) or {}:
            if key in section:
                raise ValueError(f"algorithm.options[{key!r}]: {key} is a field of the algorithm section; set "
                                 f"algorithm.{key}")
            if key in SPEC_KNOBS:
                raise ValueError(f"algorithm.options[{key!r}]: {key} is fixed by algorithm {self.name!r} (choose the "
                                 "algorithm that sets it)")
            if key not in known:
                raise ValueError(self.unknown_key_message(repr(key), algorithm))

    def unknown_key_message(self, key: str, algorithm) -> str:
        """Why ``key`` is not an option of this algorithm, and which keys are (those with a field of the section
        are set as ``algorithm.<key>``, the others in ``algorithm.options``)."""
        section = {f.name for f in dataclasses.fields(algorithm)}
        known = self.option_keys()
        fields = [k for k in known if k in section]
        extra = [k for k in known if k not in section and k not in SPEC_KNOBS]
        return (f"algorithm {self.name!r} has no option {key} (estimator {self.advantage!r}, rollout strategy "
                f"{self.rollout_strategy!r}); known keys: {', '.join(known)} (algorithm section fields: "
                f"{', '.join(fields) or 'none'}; in algorithm.options: {', '.join(extra) or 'none'})")

    def advantage_options(self, algorithm):
        """The estimator's options dataclass (frozen, hashable: the jitted estimator's static argument) filled
        from :meth:`knobs`."""
        return pick_options(ADVANTAGES.options(self.advantage), self.knobs(algorithm))

    def strategy(self, algorithm, context: StrategyContext | None = None) -> RolloutStrategy:
        """The rollout strategy of this algorithm: its options dataclass filled from :meth:`knobs` of the config's
        ``algorithm`` section, and ``context`` (branch-candidate table, ``logprobs(params, traj) -> (lc, lb)``,
        placement on the mesh and back, decision labeller) for the strategies that need it; wrapped in
        `DynamicSampling` when the algorithm says so."""
        options = pick_options(STRATEGIES.options(self.rollout_strategy), self.knobs(algorithm))
        strategy = make_strategy(self.rollout_strategy, options, context)
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
    AlgorithmSpec("appo_no_dual_group", **{**_APPO, "advantage": "appo_no_dual_group"},
                  description="APPO ablation (Table 4, w/o dual-group): initial and branch rollouts normalised as one "
                              "group"),
    AlgorithmSpec("appo_no_procedure_scaling", **_APPO, procedure_scaling="none",
                  description="APPO ablation: no procedure-level reward scaling (M = 1)"),
    AlgorithmSpec("appo_no_future_kl", **{**_APPO, "loss_mode": "dual_clip"},
                  description="APPO ablation: the dual-clip loss (clip-high 0.28) instead of future-KL weighting"),
    AlgorithmSpec("appo_oracle", **_APPO, score="oracle",
                  description="APPO branching at labelled decision tokens (mini tasks only; an upper bound)"),
):
    register_algorithm(_spec)
