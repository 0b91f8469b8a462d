"""Outcome rewards of a full response: the ARPO reward and its plain (ungated) evaluation variants.

ARPO convention (docs/protocol.md), for a response and its ground truths G:

    R = -1                                  if check_format(response) fails
    R = acc + 0.1 * [acc > 0 and the response used both search and python]      otherwise
    acc = accuracy(last \\boxed{} of the answer block, G)

with accuracy = max token F1 over G ("arpo_f1") or math equivalence ("arpo_math": 1 if the prediction matches a
ground truth exactly after normalisation or by math-verify, else 0). The ungated variants ("f1", "em", "math")
score the last ``\\boxed{}`` of the whole response (0 when there is none) and ignore the format.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from appo_jax.rewards.answers import last_boxed
from appo_jax.rewards.format_check import check_format
from appo_jax.rewards.math_equivalence import default_math_verifier
from appo_jax.rewards.qa_metrics import as_ground_truths, exact_match, f1_score, literal_match

FORMAT_PENALTY = -1.0
TOOL_BONUS = 0.1

Accuracy = Callable[[str | None, list[str]], float]


@dataclasses.dataclass(frozen=True)
class RewardOutput:
    """A scored response.

    score: the reward. accuracy: the answer score before bonus / penalty. prediction: the extracted answer
    (None if none). format_ok / reason: the format check (``reason`` is "" when ok). tool_calls: completed
    calls per tool. bonus: the multi-tool bonus added.
    """

    score: float
    accuracy: float
    prediction: str | None
    format_ok: bool
    reason: str
    tool_calls: dict[str, int]
    bonus: float = 0.0


def math_accuracy(prediction: str | None, ground_truths: list[str]) -> float:
    """1.0 if `prediction` equals a ground truth (`literal_match`: signs, decimals and fractions kept) or math-verify
    finds them equivalent, else 0.0."""
    if prediction is None:
        return 0.0
    if literal_match(prediction, ground_truths):
        return 1.0
    return float(default_math_verifier().equal_any(prediction, ground_truths))


def arpo_reward(response: str, ground_truths: str | Sequence[str], *, accuracy: Accuracy = f1_score,
                tool_bonus: float = TOOL_BONUS, max_tool_calls: int | None = None) -> RewardOutput:
    """The ARPO reward of `response` (module docstring); `accuracy(prediction, golds)` scores the answer."""
    golds = as_ground_truths(ground_truths)
    fmt = check_format(response, max_tool_calls=max_tool_calls)
    if not fmt.ok:
        return RewardOutput(FORMAT_PENALTY, 0.0, None, False, fmt.reason, fmt.tool_calls)
    prediction = last_boxed(fmt.answer)
    acc = float(accuracy(prediction, golds))
    used_both = fmt.tool_calls["search"] > 0 and fmt.tool_calls["python"] > 0
    bonus = tool_bonus if acc > 0 and used_both else 0.0
    return RewardOutput(acc + bonus, acc, prediction, True, "", fmt.tool_calls, bonus)


def answer_reward(response: str, ground_truths: str | Sequence[str], *, accuracy: Accuracy) -> RewardOutput:
    """Ungated: ``accuracy(last \\boxed{} of the response, golds)``; the format check is reported, not applied."""
    golds = as_ground_truths(ground_truths)
    fmt = check_format(response)
    prediction = last_boxed(response)
    acc = float(accuracy(prediction, golds))
    return RewardOutput(acc, acc, prediction, fmt.ok, fmt.reason, fmt.tool_calls)


def arpo_f1_reward(response: str, ground_truths: str | Sequence[str]) -> RewardOutput:
    """ARPO reward with token-F1 accuracy (the default training reward)."""
    return arpo_reward(response, ground_truths, accuracy=f1_score)


def arpo_math_reward(response: str, ground_truths: str | Sequence[str]) -> RewardOutput:
    """ARPO reward with math-equivalence accuracy (`math_accuracy`)."""
    return arpo_reward(response, ground_truths, accuracy=math_accuracy)


def f1_reward(response: str, ground_truths: str | Sequence[str]) -> RewardOutput:
    """Token F1 of the last ``\\boxed{}`` (ungated)."""
    return answer_reward(response, ground_truths, accuracy=f1_score)


def em_reward(response: str, ground_truths: str | Sequence[str]) -> RewardOutput:
    """Exact match of the last ``\\boxed{}`` (ungated)."""
    return answer_reward(response, ground_truths, accuracy=exact_match)


def math_reward(response: str, ground_truths: str | Sequence[str]) -> RewardOutput:
    """Math equivalence of the last ``\\boxed{}`` (ungated)."""
    return answer_reward(response, ground_truths, accuracy=math_accuracy)
