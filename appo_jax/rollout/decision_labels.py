"""Decision-token labels of rollouts: which response tokens decide success (docs/mini_reproduction.md).

A generated task with known decision points (`appo_jax.data.tasks.Task.decision_spans`) names character spans
of a response text; a token is a *decision token* iff it is generated (not prompt, observation or padding) and
its characters overlap one of those spans. Character offsets come from decoding the response token by token
(the tokenizer's decode of one id; exact for the byte-level tokenizers of the mini tasks and SmolLM2 on ASCII
text).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from appo_jax.core.trajectory import Trajectory
from appo_jax.data.records import Record
from appo_jax.data.tasks import Task


def token_pieces(tokenizer, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """``(text, offsets)``: the concatenation of the tokens' decoded pieces and int [n + 1], the character offset
    where each piece starts (last entry: the total length). Text and offsets come from the same pieces, so spans
    found in the text always line up with the tokens."""
    pieces = [tokenizer.decode([int(t)]) for t in ids]
    return "".join(pieces), np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)


def label_tokens(tokenizer, ids: Sequence[int], spans: Sequence[tuple[int, int]], offsets=None) -> np.ndarray:
    """bool [n]: token i overlaps a character span [start, end) of the text of `token_pieces` (``offsets``:
    its offsets when already computed)."""
    off = token_pieces(tokenizer, ids)[1] if offsets is None else offsets
    out = np.zeros(len(ids), bool)
    for start, end in spans:
        out |= (off[:-1] < end) & (off[1:] > start)
    return out


class DecisionLabeller:
    """``labeller(traj, prompts) -> bool [N, L]``: the decision tokens of every row of ``traj`` (row r answers
    ``prompts[traj.group_id[r]]``), by ``task.decision_spans`` over the row's response text."""

    def __init__(self, task: Task, tokenizer):
        if task.decision_spans is None:
            raise ValueError(f"task {task.name!r} has no decision-token labels")
        self.task, self.tokenizer = task, tokenizer

    def row(self, record: Record, tokens: np.ndarray, response_mask: np.ndarray, gen_mask: np.ndarray) -> np.ndarray:
        """bool [L] for one row: ``tokens`` [L], ``response_mask`` (generated or observation) and ``gen_mask``."""
        n = int(response_mask.sum())
        ids = tokens[:n]
        text, offsets = token_pieces(self.tokenizer, ids)  # one decode per token, shared by spans and labels
        out = np.zeros(tokens.shape[0], bool)
        out[:n] = label_tokens(self.tokenizer, ids, self.task.decision_spans(record, text), offsets)
        return out & gen_mask

    def __call__(self, traj: Trajectory, prompts: Sequence[Record]) -> np.ndarray:
        tokens, gen, obs = (np.asarray(x) for x in (traj.tokens, traj.gen_mask, traj.obs_mask))
        group, valid = np.asarray(traj.group_id), np.asarray(traj.row_valid)
        out = np.zeros(tokens.shape, bool)
        for r in np.flatnonzero(valid):
            out[r] = self.row(prompts[int(group[r])], tokens[r], gen[r] | obs[r], gen[r])
        return out
