"""A resumable, deterministic iterator over the training prompts.

The iterator visits the prompts in epochs; epoch ``e`` uses the permutation
``np.random.default_rng([seed, e]).permutation(n)`` (identity when not shuffling). Its whole state is
``(epoch, index)``: saved in every checkpoint, so a resumed run draws exactly the prompts the uninterrupted
run would have drawn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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
