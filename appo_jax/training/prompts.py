"""Training prompts: dataset records -> tokenised :class:`~appo_jax.rollout.engine.PromptItem` s, and a
resumable, deterministic prompt iterator.

The iterator visits the prompts in epochs; epoch ``e`` uses the permutation
``np.random.default_rng([seed, e]).permutation(n)`` (identity when not shuffling). Its whole state is
``(epoch, index)``: saved in every checkpoint, so a resumed run draws exactly the prompts the uninterrupted
run would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from appo_jax.rollout.engine import PromptItem


@dataclass
class PromptRecord:
    """One question for training / evaluation: chat ``messages``, ``ground_truths``, ``ability``, ``source``."""

    messages: list[dict]
    ground_truths: list[str]
    ability: str = "qa"
    source: str = ""
    id: str = ""


def load_records(name: str, *, data_dir: str = "", limit: int = 0, seed: int = 0) -> list[PromptRecord]:
    """Records of dataset ``name``: ``toy_arithmetic`` (generated, see ``toy_task``) or a registered dataset of
    ``appo_jax.data`` (its only split). ``limit`` > 0 keeps the first ``limit`` records."""
    if name == "toy_arithmetic":
        from appo_jax.training.toy_task import arithmetic_records
        return arithmetic_records(limit or 64, seed=seed)
    from appo_jax.data import get_spec, load_split
    spec = get_spec(name)
    records = load_split(spec.name, spec.split, data_dir or None, limit or None)
    return [PromptRecord(list(r.prompt), list(r.ground_truths), r.ability, r.data_source, r.id) for r in records]


def encode_prompts(records: Sequence[PromptRecord], tokenizer, *, max_prompt_len: int, reward: str = "auto",
                   system_prompt: str = "") -> tuple[list[PromptItem], int]:
    """Chat-template and tokenise each record; returns ``(items, dropped)`` where prompts longer than
    ``max_prompt_len`` tokens are dropped (counted). ``reward="auto"`` picks the ability's default reward."""
    from appo_jax.data.templates import apply_chat_template
    from appo_jax.rewards.registry import get_reward_fn, reward_for_ability
    if reward != "auto":
        get_reward_fn(reward)  # unknown name -> ValueError listing the rewards
    items, dropped = [], 0
    for r in records:
        messages = [dict(m) for m in r.messages]
        if system_prompt:
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = system_prompt
            else:
                messages.insert(0, {"role": "system", "content": system_prompt})
        text = apply_chat_template(tokenizer, messages)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        name = reward_for_ability(r.ability) if reward == "auto" else reward
        items.append(PromptItem(list(ids), list(r.ground_truths), r.source, name))
    return items, dropped


class PromptIterator:
    """Deterministic, resumable batches of prompts (module doc)."""

    def __init__(self, items: Sequence, *, seed: int = 0, shuffle: bool = True):
        if not items:
            raise ValueError("no training prompts (the dataset is empty or every prompt is longer than "
                             "rollout.max_prompt_len)")
        self.items = list(items)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.items)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next(self, count: int) -> list:
        """The next ``count`` prompts (crossing epoch boundaries as needed)."""
        out = []
        while len(out) < count:
            if self.index >= len(self.items):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), len(self.items) - self.index)
            out.extend(self.items[i] for i in self._order[self.index:self.index + take])
            self.index += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
