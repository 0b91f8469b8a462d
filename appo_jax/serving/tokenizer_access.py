"""`SharedTokenizer`: the server's one tokenizer, used from the HTTP thread and the scheduler thread under a lock.

Prompts are encoded as the rest of the package does: chat messages with
`appo_jax.data.encoding.encode_prompt` (the tokenizer's chat template, generation prompt appended, no extra
special tokens), a completion prompt string with ``tokenizer.encode(text)`` (the tokenizer's default special
tokens, as ``appo-jax generate`` without ``--chat``). Generated text is ``decode(ids, skip_special_tokens=True,
clean_up_tokenization_spaces=False)`` (no clean-up, so the text of a prefix of the ids is a prefix of the text).

For log-probs: ``token_text`` is one token decoded alone (special tokens kept; half of a multi-byte character
decodes to U+FFFD) and ``token_bytes`` its exact UTF-8 bytes: for a byte-level BPE vocabulary (GPT-2 style, as
SmolLM2's) the token string mapped back through the byte-to-unicode table, for SentencePiece byte tokens
(``<0xE6>``) that byte, else the UTF-8 of ``token_text``.
"""
from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from typing import Any

from appo_jax.data.encoding import encode_prompt

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes map to themselves, the others to U+0100 + i."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class SharedTokenizer:
    """Thread-safe access to ``tokenizer`` (module doc)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        with self._lock:
            probe = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a b", add_special_tokens=False))
        self.byte_level = any("\u0120" in str(t) for t in probe)  # GPT-2 maps the space byte to U+0120

    def encode_chat(self, messages: list[dict]) -> list[int]:
        with self._lock:
            return list(encode_prompt(self.tokenizer, messages))

    def encode_text(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer.encode(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        with self._lock:
            return [self.tokenizer.decode([int(t)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    for t in ids]

    def token_bytes(self, ids: Sequence[int]) -> list[list[int]]:
        """The exact bytes of each token (module doc)."""
        with self._lock:
            pieces = self.tokenizer.convert_ids_to_tokens([int(t) for t in ids])
            texts = [self.tokenizer.decode([int(t)], skip_special_tokens=False) for t in ids]
        table = _unicode_to_byte()
        out = []
        for piece, text in zip(pieces, texts):
            match = _BYTE_TOKEN.fullmatch(piece or "")
            if match:
                out.append([int(match.group(1), 16)])
            elif self.byte_level and piece and all(c in table for c in piece):
                out.append([table[c] for c in piece])
            else:
                out.append(list(text.encode("utf-8")))
        return out

    def text_offsets(self, ids: Sequence[int], start: int) -> list[int]:
        """Character offset in the generated text of each token ``ids[start:]``: the length of the text of the
        tokens before it (quadratic in the length; only computed when log-probs are asked for)."""
        return [len(self.detokenize(ids[:i])) for i in range(start, len(ids))]
