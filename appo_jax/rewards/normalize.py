"""SQuAD-style answer normalisation and the tokens F1 / EM are computed on.

    normalize_answer(s) = white_space_fix(remove_articles(remove_punc(lower(NFKC(s)))))

* lower: ``str.lower`` after Unicode NFKC (full-width characters become ASCII, ligatures split);
* remove_punc: every ASCII punctuation character (``string.punctuation``, as SQuAD) and every Unicode character
  of category P* (curly quotes, CJK punctuation, dashes) is deleted;
* remove_articles: whole words ``a``, ``an``, ``the`` are replaced by a space — unless that would leave nothing
  (so a gold answer "A", a multiple-choice letter, stays "a" instead of becoming empty and matching everything);
* white_space_fix: runs of whitespace become one space, ends stripped.

`answer_tokens` splits the normalised text on whitespace and, in addition, makes every CJK / kana / hangul
character its own token (Chinese answers have no spaces; otherwise a whole sentence would be one token).
"""
from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)
_CJK_CHAR = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def _is_punct(c: str) -> bool:
    return c in _ASCII_PUNCT or unicodedata.category(c).startswith("P")


def normalize_answer(text: str) -> str:
    """The normalised form of `text` (module docstring)."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(c for c in text if not _is_punct(c))
    without_articles = " ".join(_ARTICLES.sub(" ", text).split())
    return without_articles if without_articles else " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Tokens of ``normalize_answer(text)``: whitespace-separated, each CJK character a token of its own."""
    return _CJK_CHAR.sub(r" \1 ", normalize_answer(text)).split()
