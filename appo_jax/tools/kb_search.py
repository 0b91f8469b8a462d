"""The ``kb`` search backend: deterministic, in-process search over the `kb_multihop` knowledge base.

A query ``"REL of NAME"`` (case-insensitive) returns the fact ``The REL of NAME is X.`` among ``distractors``
wrong facts — other relations of NAME and the same relation of other entities — in an order fixed by a hash of
the query, so that reading the right page is part of the task. Any other query returns the facts that share the
most words with it (ties by fact order), or no results when none does. Constructed with the task's options
(`appo_jax.data.kb_multihop.KbOptions` fields as keyword arguments).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from appo_jax.data.kb_multihop import make_world
from appo_jax.data.loading import KB_MULTIHOP
from appo_jax.tools.search import SearchHit

_QUERY = re.compile(r"^\s*(\w+)\s+of\s+(\w+)\s*$", re.IGNORECASE)


class KbSearchBackend:
    """`SearchBackend` over the world of the `kb_multihop` task with ``options`` (module doc)."""

    name = "kb"

    def __init__(self, **options):
        self.options = KB_MULTIHOP.options(options)  # the task's own checks and list -> tuple normalisation
        self.world = make_world(self.options)
        self._names = {n.lower(): i for i, n in enumerate(self.world.names)}
        self._rels = {r: i for i, r in enumerate(self.world.relations)}
        self._facts = [(e, r, self.world.fact(e, r)) for e in range(len(self.world.names))
                       for r in range(len(self.world.relations))]

    def search(self, query: str, top_k: int):
        m = _QUERY.match(query)
        seed = int(hashlib.sha256(query.strip().lower().encode()).hexdigest(), 16) % (2**32)
        rng = np.random.default_rng(seed)
        if m is not None and m.group(1).lower() in self._rels and m.group(2).lower() in self._names:
            e, r = self._names[m.group(2).lower()], self._rels[m.group(1).lower()]
            others = [(e, r2) for r2 in range(len(self.world.relations)) if r2 != r]
            others += [(e2, r) for e2 in range(len(self.world.names)) if e2 != e]
            picks = rng.choice(len(others), min(self.options.distractors, len(others)), replace=False)
            pages = [self.world.fact(e, r)] + [self.world.fact(*others[int(i)]) for i in picks]
            order = rng.permutation(len(pages))
            return [SearchHit(pages[int(i)], 1.0 if int(i) == 0 else 0.0, "kb") for i in order][:max(top_k, 1)]
        words = set(re.findall(r"\w+", query.lower()))
        scored = [(len(words & set(re.findall(r"\w+", text.lower()))), i) for i, (_, _, text) in enumerate(self._facts)]
        scored = sorted(((s, i) for s, i in scored if s > 0), key=lambda si: (-si[0], si[1]))
        return [SearchHit(self._facts[i][2], float(s), "kb") for s, i in scored[:top_k]]
