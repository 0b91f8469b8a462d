"""Token F1 and exact match against one or several ground truths (SQuAD definitions on `answer_tokens`).

    common      = multiset intersection of tokens(pred) and tokens(gold)
    precision   = |common| / |tokens(pred)|,  recall = |common| / |tokens(gold)|
    token_f1    = 2 * precision * recall / (precision + recall)      (0 when |common| = 0)
                  both token lists empty -> 1.0; exactly one empty -> 0.0
    f1_score    = max over ground truths of token_f1
    exact_match = 1.0 if normalize_answer(pred) == normalize_answer(gold) for some ground truth, else 0.0
    literal_match = exact_match, except that when either side holds a digit the two are compared as written
                  (case-folded, without whitespace and ``$``): the SQuAD normalisation drops punctuation, which
                  would make -6 equal 6, 1.5 equal 15 and 3/4 equal 34

A prediction of None (no answer could be extracted) scores 0 against everything.
"""
from __future__ import annotations

import collections
from typing import Sequence

from appo_jax.rewards.normalize import answer_tokens, normalize_answer


def as_ground_truths(ground_truths: str | int | Sequence[str | int]) -> list[str]:
    """A single answer or a sequence of aliases -> ``list[str]``; empty is an error (nothing to score against)."""
    if isinstance(ground_truths, (str, int)):
        items = [str(ground_truths)]
    else:
        items = [str(g) for g in ground_truths]
    if not items:
        raise ValueError("ground_truths is empty: at least one reference answer is needed")
    return items


def token_f1(prediction: str, ground_truth: str) -> float:
    """SQuAD token F1 between one prediction and one ground truth (module docstring)."""
    pred, gold = answer_tokens(prediction), answer_tokens(ground_truth)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2.0 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, ground_truths: str | Sequence[str]) -> float:
    """Max token F1 of `prediction` over `ground_truths` (0.0 for a None prediction)."""
    golds = as_ground_truths(ground_truths)
    if prediction is None:
        return 0.0
    return max(token_f1(prediction, g) for g in golds)


def exact_match(prediction: str | None, ground_truths: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised ground truth, else 0.0 (None -> 0.0)."""
    golds = as_ground_truths(ground_truths)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _compact(text: str) -> str:
    return "".join(text.split()).replace("$", "").casefold()


def literal_match(prediction: str | None, ground_truths: str | Sequence[str]) -> float:
    """`exact_match` that keeps signs, decimal points and fraction bars of numeric answers (module docstring):
    the exact-match step before math-verify in the math reward and the rule judge."""
    golds = as_ground_truths(ground_truths)
    if prediction is None:
        return 0.0
    for gold in golds:
        if any(c.isdigit() for c in prediction + gold):
            if _compact(prediction) == _compact(gold):
                return 1.0
        elif normalize_answer(prediction) == normalize_answer(gold):
            return 1.0
    return 0.0
