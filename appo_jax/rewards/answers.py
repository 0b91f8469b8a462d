"""Pull the final answer out of a response: ``\\boxed{...}`` contents (nested braces) and the ``<answer>`` block."""
from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at ``text[start] == "{"`` and the index after its closing brace.

    Braces nest; a backslash escapes the next character (``\\{`` and ``\\}`` are literal braces, as in LaTeX
    set notation). None when the group is never closed.
    """
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def find_boxed(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` in `text`, in order, stripped.

    ``\\boxed {x}`` (space before the brace) counts; so does the brace-less ``\\boxed 5`` form (its argument
    runs to the next whitespace, ``$`` or end of text). Unclosed boxes are skipped.
    """
    out = []
    pos = 0
    while True:
        m = _BOX.search(text, pos)
        if m is None:
            return out
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            group = _braced(text, j)
            if group is not None:
                out.append(group[0].strip())
                pos = group[1]
                continue
        elif j > m.end():
            arg = re.match(r"[^\s$]+", text[j:])
            if arg is not None:
                out.append(arg.group(0))
                pos = j + arg.end()
                continue
        pos = m.end()


def last_boxed(text: str) -> str | None:
    """The contents of the last complete ``\\boxed{...}`` in `text` (nested braces kept), or None."""
    boxes = find_boxed(text)
    return boxes[-1] if boxes else None


def answer_blocks(text: str) -> list[str]:
    """The contents of every ``<answer>...</answer>`` block, in order."""
    return _ANSWER.findall(text)
