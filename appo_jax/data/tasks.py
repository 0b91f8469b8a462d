"""Generated tasks: datasets made deterministically from a seed instead of read from a file.

A `Task` names its splits, makes ``count`` records of a split from a seed, and can write cold-start SFT traces
for its records (tool-use transcripts in the protocol of docs/protocol.md, with the tool outputs produced by
actually running the tools). Tasks are loaded like any dataset (`appo_jax.data.loading.load_dataset`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from appo_jax.data.records import Record


@dataclasses.dataclass(frozen=True)
class Task:
    """A generated dataset. ``generate(split, count, seed) -> list[Record]``; ``sft_traces(records, tools) ->
    examples`` (``{"messages", "segments"}``, see `appo_jax.training.sft`; ``tools`` has ``call(name, input)``);
    ``default_count``: records made when no limit is given."""

    name: str
    splits: tuple[str, ...]
    generate: Callable[[str, int, int], list[Record]]
    sft_traces: Callable[[Sequence[Record], Any], list[dict]] | None = None
    default_count: int = 64

    def records(self, split: str, count: int | None = None, seed: int = 0) -> list[Record]:
        """``count`` (default `default_count`) records of ``split``; ``ValueError`` for a split it lacks."""
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has the splits {', '.join(self.splits)}, not {split!r}")
        return self.generate(split, self.default_count if count is None else count, seed)
