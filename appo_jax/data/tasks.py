"""Generated tasks: datasets made deterministically from a seed instead of read from a file.

A `Task` names its splits, makes ``count`` records of a split from a seed and its difficulty options, can write
cold-start SFT traces for its records (tool-use transcripts in the protocol of docs/protocol.md, with the tool
outputs produced by actually running the tools), and — for the tasks with known decision points — labels the
decision tokens of any response (docs/mini_reproduction.md). Tasks are loaded like any dataset
(`appo_jax.data.loading.load_dataset`); ``NAME:SPLIT`` selects a split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import sys
from typing import Any, Callable, Mapping, Sequence

from appo_jax import protocol
from appo_jax.data.records import Record


def hash_split(text: str) -> str:
    """``"heldout"`` for one question in five (by the SHA-256 of its text), else ``"train"``: disjoint splits that
    do not depend on how many questions are drawn or in which order."""
    return "heldout" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0 else "train"


def check_options(task: str, ranges: dict[str, tuple[Any, float, float]], pairs: dict[str, tuple] | None = None
                  ) -> None:
    """Difficulty options in range: ``ranges`` maps a knob to ``(value, lo, hi)`` (``lo <= value <= hi``),
    ``pairs`` a (min, max) knob to ``(value, lo, hi)`` (``lo <= min <= max <= hi``); ``ValueError`` naming the
    task, the knob, the value and the range otherwise."""
    for name, (value, lo, hi) in ranges.items():
        if not lo <= value <= hi:
            raise ValueError(f"{task} {name} must be in [{lo}, {hi}], got {value}")
    for name, ((a, b), lo, hi) in (pairs or {}).items():
        if not lo <= a <= b <= hi:
            raise ValueError(f"{task} {name} must satisfy {lo} <= min <= max <= {hi}, got {(a, b)}")


@dataclasses.dataclass(frozen=True)
class Task:
    """A generated dataset.

    ``generate(split, count, seed, options) -> list[Record]``; ``sft_traces(records, tools, options, seed) ->
    examples`` (``{"messages", "segments"}``, see `appo_jax.training.sft`; ``tools`` has ``call(name, input)``);
    ``options_type``: the frozen dataclass of its difficulty knobs (None: no knobs); ``decision_spans(record,
    response) -> [(start, end)]``: character spans of the response's decision tokens (None: not labelled);
    ``search_backend``: the registered search backend its tool loop needs (``""``: the default), built with the
    task's options as keyword arguments; ``default_count``: records made when no count is given."""

    name: str
    splits: tuple[str, ...]
    generate: Callable[[str, int, int, Any], list[Record]]
    sft_traces: Callable[[Sequence[Record], Any, Any, int], list[dict]] | None = None
    default_count: int = 64
    options_type: type | None = None
    decision_spans: Callable[[Record, str], list[tuple[int, int]]] | None = None
    search_backend: str = ""

    def options(self, overrides: Mapping[str, Any] | None = None):
        """The task's options with ``overrides`` applied (lists become tuples); ``ValueError`` naming an unknown
        knob or a task without knobs."""
        overrides = dict(overrides or {})
        if self.options_type is None:
            if overrides:
                raise ValueError(f"task {self.name!r} has no options, got {sorted(overrides)}")
            return None
        known = {f.name for f in dataclasses.fields(self.options_type)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"task {self.name!r} has no option(s) {unknown}; its options: {', '.join(sorted(known))}")
        return self.options_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})

    def records(self, split: str, count: int | None = None, seed: int = 0,
                options: Mapping[str, Any] | None = None) -> list[Record]:
        """``count`` (default `default_count`) records of ``split``; ``ValueError`` for a split it lacks."""
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has the splits {', '.join(self.splits)}, not {split!r}")
        return self.generate(split, self.default_count if count is None else count, seed, self.options(options))

    def traces(self, records: Sequence[Record], tools: Any, options: Mapping[str, Any] | None = None,
               seed: int = 0) -> list[dict]:
        """SFT demonstrations of ``records`` (``ValueError`` for a task without traces)."""
        if self.sft_traces is None:
            raise ValueError(f"task {self.name!r} has no SFT traces")
        return self.sft_traces(records, tools, self.options(options), seed)

    def fingerprint(self, options: Mapping[str, Any] | None = None) -> str:
        """A hash of what the task's records and SFT traces depend on: the source of the modules defining its
        generator, traces and search backend's options, the protocol's observation format, and the resolved
        ``options`` (a change to any of them gives another fingerprint)."""
        modules = {fn.__module__ for fn in (self.generate, self.sft_traces, self.decision_spans) if fn is not None}
        h = hashlib.sha256(self.name.encode())
        for name in sorted(modules | {protocol.__name__}):
            h.update(inspect.getsource(sys.modules[name]).encode())
        opts = self.options(options)
        h.update(repr(None if opts is None else dataclasses.asdict(opts)).encode())
        return h.hexdigest()[:16]

    def backend_kwargs(self, options: Mapping[str, Any] | None = None) -> dict:
        """Keyword arguments of the task's search backend: its options as a dict."""
        opts = self.options(options)
        return {} if opts is None else dataclasses.asdict(opts)
