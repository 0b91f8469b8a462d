"""Okapi BM25 over an in-memory list of documents, with a simple deterministic tokenizer.

    tokens(text) = NFKC + casefold, then maximal runs of letters/digits; every CJK / kana / hangul character is
                   a token of its own (so Chinese text is searchable without a segmenter)
    idf(t)       = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))                     (never negative)
    score(q, d)  = sum_{t in set(tokens(q))} idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))

with N documents, df(t) the number of documents containing t, tf(t,d) the count of t in d, |d| the token count of d
and avgdl the mean |d|. Ranking is by score descending, ties by document index ascending; documents with score 0
(no query term) are never returned. Scores are summed in a fixed order, so results are reproducible bit for bit.
"""
from __future__ import annotations

import collections
import re
import unicodedata
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+")
_CJK_CHAR = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def tokenize(text: str) -> list[str]:
    """The BM25 tokens of `text` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WORD.findall(_CJK_CHAR.sub(r" \1 ", text))


class BM25Index:
    """An immutable BM25 index over `documents` (strings); `k1`, `b` as in the module docstring."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = float(k1), float(b)
        self.num_docs = len(documents)
        lengths = np.zeros(self.num_docs, np.float64)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, doc in enumerate(documents):
            counts = collections.Counter(tokenize(doc))
            lengths[i] = sum(counts.values())
            for term, tf in counts.items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(tf)
        avgdl = float(lengths.mean()) if self.num_docs and lengths.mean() > 0 else 1.0
        self._norm = self.k1 * (1.0 - self.b + self.b * lengths / avgdl)
        self._postings = {
            t: (np.asarray(ids, np.int64), np.asarray(tfs, np.float64)) for t, (ids, tfs) in postings.items()
        }

    def idf(self, term: str) -> float:
        """ln(1 + (N - df + 0.5) / (df + 0.5)) for a token `term` (df = 0 for unknown terms)."""
        df = len(self._postings[term][0]) if term in self._postings else 0
        return float(np.log1p((self.num_docs - df + 0.5) / (df + 0.5)))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`: float64 [num_docs]."""
        out = np.zeros(self.num_docs, np.float64)
        for term in dict.fromkeys(tokenize(query)):  # unique, in order of first occurrence
            if term not in self._postings:
                continue
            ids, tf = self._postings[term]
            out[ids] += self.idf(term) * tf * (self.k1 + 1.0) / (tf + self._norm[ids])
        return out

    def top_k(self, query: str, k: int) -> list[tuple[int, float]]:
        """The best `k` (document index, score) pairs with score > 0: score descending, then index ascending."""
        scores = self.scores(query)
        hit = np.flatnonzero(scores > 0)
        order = hit[np.lexsort((hit, -scores[hit]))][: max(k, 0)]
        return [(int(i), float(scores[i])) for i in order]
