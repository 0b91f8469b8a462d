"""The answer-judge hook for evaluation: a `Judge` protocol, a rule-based default, and a registry by name.

Another judge plugs in by implementing ``judge(question, prediction, ground_truths) -> JudgeVerdict`` and calling
``register_judge("my-judge", factory)``; evaluation code asks ``make_judge(name)`` and never needs to know which
kind it got. ``"llm"`` is the LLM judge over an OpenAI-compatible endpoint (`appo_jax.rewards.llm_judge`); a judge
that cannot decide raises :class:`JudgeError`.

`RuleBasedJudge` (name "rule", the default): correct iff the prediction matches a ground truth exactly after
normalisation (`literal_match`: numeric answers keep their signs, decimal points and fraction bars), or (``use_math``) math-verify finds them equivalent, or (``f1_threshold`` set) its token F1
reaches the threshold; ``score`` is 1.0 when correct, else the token F1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from appo_jax.rewards.math_equivalence import default_math_verifier
from appo_jax.rewards.qa_metrics import as_ground_truths, f1_score, literal_match


@dataclasses.dataclass(frozen=True)
class JudgeVerdict:
    """correct: the judge accepts the prediction. score: in [0, 1]. rationale: why (short text). raw: the judge's
    own output when it has one (an LLM judge's reply), saved next to the verdict."""

    correct: bool
    score: float
    rationale: str
    raw: str = ""


class JudgeError(RuntimeError):
    """A judge that could not give a verdict (endpoint down after its retries, a reply that does not parse);
    ``raw`` holds the reply when there was one. Evaluation marks the answer ``judge_failed`` and goes on."""

    def __init__(self, message: str, raw: str = ""):
        super().__init__(message)
        self.raw = raw


@runtime_checkable
class Judge(Protocol):
    """Decides whether a prediction answers a question, given reference answers. Must be thread-safe."""

    name: str

    def judge(self, question: str, prediction: str | None, ground_truths: Sequence[str]) -> JudgeVerdict: ...


class RuleBasedJudge:
    """Exact match, then math equivalence, then an optional F1 threshold (module docstring)."""

    name = "rule"

    def __init__(self, use_math: bool = True, f1_threshold: float | None = None):
        if f1_threshold is not None and not 0.0 < f1_threshold <= 1.0:
            raise ValueError(f"f1_threshold must be in (0, 1], got {f1_threshold}")
        self.use_math, self.f1_threshold = use_math, f1_threshold

    def judge(self, question: str, prediction: str | None, ground_truths: Sequence[str]) -> JudgeVerdict:
        golds = as_ground_truths(ground_truths)
        if prediction is None:
            return JudgeVerdict(False, 0.0, "no answer")
        if literal_match(prediction, golds):
            return JudgeVerdict(True, 1.0, "exact match after normalisation")
        if self.use_math and default_math_verifier().equal_any(prediction, golds):
            return JudgeVerdict(True, 1.0, "math-verify equivalent")
        f1 = f1_score(prediction, golds)
        if self.f1_threshold is not None and f1 >= self.f1_threshold:
            return JudgeVerdict(True, 1.0, f"token F1 {f1:.3f} >= {self.f1_threshold}")
        return JudgeVerdict(False, f1, f"no match (token F1 {f1:.3f})")


def _llm_judge(**kwargs: Any) -> Judge:
    from appo_jax.rewards.llm_judge import LLMJudge  # deferred: only an evaluation that asks for it pays the import

    return LLMJudge(**kwargs)


JUDGES: dict[str, Callable[..., Judge]] = {"rule": RuleBasedJudge, "llm": _llm_judge}


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """Make ``factory(**kwargs)`` available as ``make_judge(name, **kwargs)``."""
    JUDGES[name] = factory


def make_judge(name: str = "rule", **kwargs: Any) -> Judge:
    """Instantiate the registered judge `name`; ``ValueError`` naming the known judges otherwise."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(sorted(JUDGES))}")
    return JUDGES[name](**kwargs)
