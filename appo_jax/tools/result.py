"""What every tool returns (`ToolResult`), the `Tool` protocol, and the ``<result>`` observation format."""
from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

from appo_jax.protocol import format_observation


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call.

    text: what the model sees inside ``<result>...</result>`` (already truncated to the tool's display limit;
        on failure it carries the error message too, so the model can react to it).
    ok: False when the call failed (timeout, exception, limit hit, unknown tool, ...).
    error: a one-line description of the failure (None when ok).
    seconds: wall-clock time of the call itself.
    """

    text: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0

    def observation(self) -> str:
        """The observation appended to the rollout: ``<result>\\n{text}\\n</result>`` (docs/protocol.md)."""
        return format_observation(self.text)


def error_result(message: str, seconds: float = 0.0) -> ToolResult:
    """A failed call whose text is ``"Error: " + message`` (what the model sees) and error ``message``."""
    return ToolResult(text=f"Error: {message}", ok=False, error=message, seconds=seconds)


def truncate_middle(text: str, max_chars: int) -> str:
    """`text` if it has at most `max_chars` characters, else its head and tail around a marker line.

    The head gets ~2/3 of the budget and the tail the rest (the end of an output — the final print or the
    exception — matters most after the beginning). The result never exceeds `max_chars` unless `max_chars` is
    smaller than the marker itself.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    dropped = len(text)
    marker = f"\n... [{dropped} characters truncated] ...\n"
    budget = max(max_chars - len(marker), 0)
    head = (2 * budget) // 3
    tail = budget - head
    dropped = len(text) - head - tail
    marker = f"\n... [{dropped} characters truncated] ...\n"
    return text[:head] + marker + (text[len(text) - tail:] if tail else "")


@runtime_checkable
class Tool(Protocol):
    """A tool the agent loop can call: ``tool(input_text) -> ToolResult``; must be thread-safe.

    Implementations should turn their own failures into ``ok=False`` results; the registry additionally turns
    any exception that escapes into an error result, so a tool can never raise into the trainer.
    """

    name: str

    def __call__(self, input_text: str) -> ToolResult: ...
