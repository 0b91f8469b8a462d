"""The text of one request's generated tokens: incremental detokenization, stop strings and streaming hold-back.

Text is always the decode of the *whole* generated id list (``detokenize(ids)``), never a concatenation of
per-token pieces: a byte-level BPE token can carry half of a multi-byte character (decoded alone it is U+FFFD)
and merged tokens decode differently from their parts. What is handed out is the new suffix of that text.

Stop strings: after each batch of new tokens the text is searched (from a little before the previously searched
end, so a stop string spanning tokens is found). The generation ends at the first token whose text completes a
stop string (as if the text were checked after every token): the tokens are kept up to that one, later tokens
are dropped, and the text is cut *before* that stop string (the earliest-starting one if that token completes
several).

Hold-back: while the generation runs, trailing text that could still become a stop string (a suffix of the text
that is a proper prefix of a stop string) and a trailing U+FFFD (an incomplete multi-byte character) are not
handed out yet; `take(final=True)` flushes everything.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"


class GeneratedText:
    """Generated token ids and their text, with ``stop`` strings (module doc). Not thread-safe."""

    def __init__(self, detokenize: Callable[[list[int]], str], stop: Sequence[str] = ()):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._detokenize = detokenize
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = 0   # characters of `text` handed out by `take`
        self._searched = 0  # characters of `text` already searched for stop strings

    def extend(self, new_ids: Sequence[int]) -> int | None:
        """Add generated tokens. When the text now holds a stop string: cut the text before it, drop the tokens
        after the one that completes it and return how many of ``new_ids`` were kept; else None."""
        if self.stopped:
            raise ValueError("GeneratedText.extend after a stop string ended the generation")
        before = len(self.ids)
        self.ids.extend(int(t) for t in new_ids)
        self.text = self._detokenize(self.ids)
        if self._find_stop(self.text, self._searched) is None:
            self._searched = len(self.text)
            return None
        for keep in range(before + 1, len(self.ids) + 1):  # the first token that completes a stop string
            text = self.text if keep == len(self.ids) else self._detokenize(self.ids[:keep])
            hit = self._find_stop(text, self._searched)
            if hit is not None:
                break
        del self.ids[keep:]
        self.text = text[:hit[0]]
        self.stopped = True
        return keep - before

    def _find_stop(self, text: str, searched: int) -> tuple[int, str] | None:
        """(start index, stop string) of the earliest stop string in ``text`` that was not wholly inside the
        first ``searched`` characters, or None."""
        best = None
        for stop in self.stop:
            # a few characters of slack: the last searched characters may have been an incomplete U+FFFD
            i = text.find(stop, max(0, searched - len(stop) - 4))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        return best

    def take(self, final: bool) -> str:
        """The text not handed out yet, minus the hold-back unless ``final`` (module doc)."""
        end = len(self.text)
        if not final:
            while end > self._emitted and self.text[end - 1] == _INCOMPLETE:
                end -= 1
            end -= self._held_for_stop(self.text[:end])
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted:end]
        self._emitted = end
        return out

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        held = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held
