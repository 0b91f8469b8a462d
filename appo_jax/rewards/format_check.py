"""The ARPO format check of a response (docs/protocol.md): is it a well-formed multi-turn tool transcript?

The response (everything after the prompt: generated text plus the appended ``<result>`` observations) is read as
a sequence of top-level blocks; text between blocks is allowed. A response passes iff:

* ``<think>...</think>``: every think tag is closed before any other tag opens (balanced, not nested);
* ``<search>...</search>`` / ``<python>...</python>``: every tool call is closed, and followed — after optional
  whitespace only — by a ``<result>...</result>`` block; the result's contents are not inspected for tags (a tool
  may print anything) and it ends at the first ``</result>``; a ``<result>`` that follows no tool call fails;
* ``<answer>...</answer>``: exactly one, closed, with nothing tagged after it, and containing a complete
  ``\\boxed{...}``;
* optionally, at most ``max_tool_calls`` tool calls in total.

No tag may open inside a think, tool-call or answer block.
"""
from __future__ import annotations

import dataclasses
import re

from appo_jax.protocol import TOOL_TAGS as PROTOCOL_TOOLS
from appo_jax.rewards.answers import last_boxed

TOOL_TAGS = tuple(PROTOCOL_TOOLS)  # the tools whose calls are counted
_TAG = re.compile(r"<(/?)(think|search|python|result|answer)>")
_RESULT_OPEN, _RESULT_CLOSE = "<result>", "</result>"


@dataclasses.dataclass(frozen=True)
class FormatCheck:
    """Outcome of `check_format`.

    ok: the response passes every rule. reason: "" when ok, else the first rule broken.
    tool_calls: completed calls (each followed by its result) per tool name, counted up to the failure point.
    answer: the contents of the answer block (None unless one was closed).
    """

    ok: bool
    reason: str
    tool_calls: dict[str, int]
    answer: str | None


def check_format(response: str, *, max_tool_calls: int | None = None) -> FormatCheck:
    """Check `response` against the rules in the module docstring."""
    calls = {t: 0 for t in TOOL_TAGS}
    answer: str | None = None

    def result(reason: str) -> FormatCheck:
        return FormatCheck(ok=not reason, reason=reason, tool_calls=dict(calls), answer=answer)

    state, body_start, pos = "top", 0, 0
    while True:
        m = _TAG.search(response, pos)
        if m is None:
            break
        closing, tag = m.group(1) == "/", m.group(2)
        pos = m.end()
        if state == "top":
            if answer is not None:
                return result(f"<{'/' if closing else ''}{tag}> after </answer>")
            if closing:
                return result(f"</{tag}> without a matching <{tag}>")
            if tag == "result":
                return result("<result> without a preceding tool call")
            state, body_start = tag, m.end()
            continue
        if not (closing and tag == state):
            return result(f"<{'/' if closing else ''}{tag}> inside <{state}>")
        if state == "answer":
            answer = response[body_start:m.start()]
        elif state in TOOL_TAGS:
            rest = response[pos:]
            gap = len(rest) - len(rest.lstrip())
            if not rest[gap:].startswith(_RESULT_OPEN):
                return result(f"</{state}> is not followed by a <result> block")
            end = response.find(_RESULT_CLOSE, pos + gap + len(_RESULT_OPEN))
            if end < 0:
                return result("unclosed <result>")
            calls[state] += 1
            pos = end + len(_RESULT_CLOSE)
        state = "top"
    if state != "top":
        return result(f"unclosed <{state}>")
    if answer is None:
        return result("no <answer> block")
    if last_boxed(answer) is None:
        return result("no complete \\boxed{} in the answer")
    if max_tool_calls is not None and sum(calls.values()) > max_tool_calls:
        return result(f"{sum(calls.values())} tool calls exceed the limit of {max_tool_calls}")
    return result("")
