"""Reward functions by name: ``get_reward_fn("arpo_f1")(response, ground_truths) -> RewardOutput``.

Built in (see `appo_jax.rewards.arpo`):

    arpo_f1    format check else -1; token F1 of the last boxed answer; +0.1 with both tools  (training default)
    arpo_math  same gate and bonus, accuracy = exact match or math-verify equivalence
    f1         token F1 of the last \\boxed{} (no format gate)
    em         exact match of the last \\boxed{} (no format gate)
    math       exact match or math-verify equivalence of the last \\boxed{} (no format gate)
    judge      1.0 if the default judge ("rule") accepts the last \\boxed{}, else 0.0 (no format gate)

`reward_for_ability` maps a dataset's ability ("math" / "qa") to its default training reward; `RecordReward`
scores a response to a question record (anything with ``ability`` and ``ground_truths``) with a named reward or,
for ``"auto"``, the record's ability default.
"""
from __future__ import annotations

from typing import Callable, Sequence

from appo_jax.rewards.answers import last_boxed
from appo_jax.rewards.arpo import (
    RewardOutput, arpo_f1_reward, arpo_math_reward, em_reward, f1_reward, math_reward,
)
from appo_jax.rewards.format_check import check_format
from appo_jax.rewards.judge import make_judge
from appo_jax.rewards.qa_metrics import as_ground_truths

RewardFn = Callable[[str, Sequence[str]], RewardOutput]


def judge_reward(response: str, ground_truths: str | Sequence[str]) -> RewardOutput:
    """1.0 if the rule-based judge accepts the last ``\\boxed{}`` (ungated), else 0.0."""
    golds = as_ground_truths(ground_truths)
    fmt = check_format(response)
    prediction = last_boxed(response)
    verdict = make_judge("rule").judge("", prediction, golds)
    score = float(verdict.correct)
    return RewardOutput(score, score, prediction, fmt.ok, fmt.reason, fmt.tool_calls)


REWARD_FNS: dict[str, RewardFn] = {
    "arpo_f1": arpo_f1_reward,
    "arpo_math": arpo_math_reward,
    "f1": f1_reward,
    "em": em_reward,
    "math": math_reward,
    "judge": judge_reward,
}

_ABILITY_REWARDS = {"qa": "arpo_f1", "math": "arpo_math"}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `fn(response, ground_truths) -> RewardOutput` available as ``get_reward_fn(name)``."""
    REWARD_FNS[name] = fn


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as `name`; ``ValueError`` naming the known rewards otherwise."""
    if name not in REWARD_FNS:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARD_FNS))}")
    return REWARD_FNS[name]


def reward_for_ability(ability: str) -> str:
    """Default training reward name for a dataset ability: "qa" -> "arpo_f1", "math" -> "arpo_math"."""
    if ability not in _ABILITY_REWARDS:
        raise ValueError(f"unknown ability {ability!r}; known: {', '.join(sorted(_ABILITY_REWARDS))}")
    return _ABILITY_REWARDS[ability]


class RecordReward:
    """``reward(record, response) -> RewardOutput``: the reward named ``name`` for every record, or with
    ``"auto"`` the default of each record's ability (`reward_for_ability`). Unknown names fail at construction."""

    def __init__(self, name: str = "auto"):
        if name != "auto":
            get_reward_fn(name)
        self.name = name

    def __call__(self, record, response: str) -> RewardOutput:
        name = reward_for_ability(record.ability) if self.name == "auto" else self.name
        return get_reward_fn(name)(response, record.ground_truths)
