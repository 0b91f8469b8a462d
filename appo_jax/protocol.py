"""The multi-turn tool protocol's text conventions, defined once (docs/protocol.md).

Tags: ``<think>``, ``<search>query</search>``, ``<python>code</python>``, ``<result>...</result>``,
``<answer>... \\boxed{...} ...</answer>``. Generation stops at a tool close tag or ``</answer>`` (`STOP_STRINGS`);
a tool call's output comes back as `format_observation`. Every layer that writes or reads protocol text uses
these: the tool loop (which stop ended a segment, a stop straddling a branch prefix's end), the sampler (its
incremental stop search looks back `stop_lookback` tokens), the tools (their results become observations), the
generated tasks' SFT traces and the rewards' format check.
"""
from __future__ import annotations

from typing import Iterable

TOOL_TAGS = {"python": ("<python>", "</python>"), "search": ("<search>", "</search>")}
ANSWER_CLOSE = "</answer>"
STOP_STRINGS = tuple(close for _, close in TOOL_TAGS.values()) + (ANSWER_CLOSE,)


def format_observation(text: str) -> str:
    """``"<result>\\n" + text + "\\n</result>"`` — the exact observation appended after a tool call."""
    return f"<result>\n{text}\n</result>"


def stop_lookback(stop_strings: Iterable[str]) -> int:
    """Tokens a text ending in one of ``stop_strings`` can need to complete it: each token decodes to >= 1
    character, with slack for byte tokens (a stop string may start that many tokens before the last one)."""
    return 2 * max((len(s) for s in stop_strings), default=0) + 8


#: Look-back of the protocol's stop strings.
STOP_LOOKBACK = stop_lookback(STOP_STRINGS)


def find_stop(text: str) -> tuple[int, str] | None:
    """``(index, stop)`` of the stop string of :data:`STOP_STRINGS` that completes first in ``text``, or None."""
    best = None
    for stop in STOP_STRINGS:
        i = text.find(stop)
        if i >= 0 and (best is None or i + len(stop) < best[0] + len(best[1])):
            best = (i, stop)
    return best


def parse_segment_end(text: str) -> tuple[str, str | None] | None:
    """Classify a segment that ends with a stop string and extract its tool call.

    The stop is the stop string that completes first in ``text``. Returns ``("answer", None)`` for
    ``</answer>``; ``(name, input)`` for a tool close tag, where ``input`` is the stripped text between the last
    opening tag before the close tag and the close tag, or ``None`` when there is no opening tag; ``None`` when
    ``text`` contains no stop string.
    """
    best = find_stop(text)
    if best is None:
        return None
    i, stop = best
    if stop == ANSWER_CLOSE:
        return ("answer", None)
    name = next(n for n, (_, close) in TOOL_TAGS.items() if close == stop)
    j = text.rfind(TOOL_TAGS[name][0], 0, i)
    return (name, None if j < 0 else text[j + len(TOOL_TAGS[name][0]):i].strip())
