"""Offline search: BM25 against a from-the-formula reference, the query-cache engine, backends, the search tool."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appo_jax.data.paths import resolve_data_dir
from appo_jax.tools import search as search_mod
from appo_jax.tools.bm25 import BM25Index, tokenize
from appo_jax.tools.search import (
    NO_RESULTS, CacheSearchBackend, JsonlCorpusBackend, SearchHit, SearchTool, backend_for_corpus,
    default_cache_path, format_pages, make_search_backend, normalize_query, register_search_backend, split_pages,
)


def _reference_bm25(docs, query, k1=1.5, b=0.75):
    """BM25 written out term by term with Python loops (the module docstring's formula)."""
    toks = [tokenize(d) for d in docs]
    n = len(docs)
    avgdl = sum(len(t) for t in toks) / n if n and sum(len(t) for t in toks) else 1.0
    out = []
    for t_doc in toks:
        s = 0.0
        for term in set(tokenize(query)):
            df = sum(1 for t in toks if term in t)
            tf = t_doc.count(term)
            if tf == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t_doc) / avgdl))
        out.append(s)
    return np.array(out)


def test_tokenize():
    assert tokenize("Hello, World! x_y 3.14") == ["hello", "world", "x", "y", "3", "14"]
    assert tokenize("ＡＢＣ café") == ["abc", "café"]  # NFKC + casefold
    assert tokenize("上海黄金 2024年") == ["上", "海", "黄", "金", "2024", "年"]


WORDS = st.sampled_from(["apple", "banana", "cherry", "date", "elder", "fig", "grape"])


@settings(max_examples=25)
@given(st.lists(st.lists(WORDS, max_size=12).map(" ".join), min_size=1, max_size=8),
       st.lists(WORDS, min_size=1, max_size=4).map(" ".join),
       st.floats(0.0, 3.0), st.floats(0.0, 1.0))
def test_bm25_matches_reference(docs, query, k1, b):
    index = BM25Index(docs, k1=k1, b=b)
    np.testing.assert_allclose(index.scores(query), _reference_bm25(docs, query, k1, b), rtol=1e-10, atol=1e-12)
    ranked = index.top_k(query, len(docs))
    scores = index.scores(query)
    # every matching document, by score descending then index (exact ties can differ from the reference by ulps)
    expected = sorted((i for i in range(len(docs)) if scores[i] > 0), key=lambda i: (-scores[i], i))
    assert [i for i, _ in ranked] == expected
    assert {i for i, _ in ranked} == set(np.flatnonzero(_reference_bm25(docs, query, k1, b) > 0))
    assert index.top_k(query, 1) == ranked[:1]


def test_bm25_ranks_matching_document_first_and_validates():
    docs = ["the cat sat on the mat", "dogs chase cats", "quantum chromodynamics of gluons", "the the the"]
    index = BM25Index(docs)
    assert index.top_k("gluons quantum", 2)[0][0] == 2
    assert index.top_k("zebra", 3) == []
    with pytest.raises(ValueError, match="k1"):
        BM25Index(docs, b=2.0)


def test_query_normalisation_and_page_split():
    assert normalize_query("  Search Query:  Who  IS\tX? ") == "who is x?"
    assert split_pages("Page 1: a b\nPage 2: c\nd\nPage 3: ") == ["a b", "c\nd"]
    assert split_pages("No search results found.") == []
    hits = [SearchHit("x" * 10, 1.0, "s"), SearchHit("  y\n z ", 0.5, "s")]
    assert format_pages(hits, 4) == "Page 1: xxxx ...\nPage 2: y z"
    assert format_pages([], 4) == NO_RESULTS


@pytest.fixture(scope="module")
def cache_path():
    return default_cache_path()


@pytest.fixture(scope="module")
def cache(cache_path):
    return json.loads(cache_path.read_text())


def test_default_cache_path_resolution(cache_path, monkeypatch, tmp_path):
    assert cache_path == resolve_data_dir() / "search" / "search_cache.json"
    monkeypatch.setenv("APPO_DATA_DIR", str(cache_path.parent.parent))
    assert default_cache_path() == cache_path
    (tmp_path / "search").mkdir()
    with pytest.raises(FileNotFoundError, match="search_cache.json"):
        default_cache_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        default_cache_path(tmp_path / "missing")


def test_exact_hit_returns_cached_pages(cache_path, cache):
    backend = CacheSearchBackend(cache_path)
    query = "Amy Smart film debut Campfire Tales"
    hits = backend.search("  amy SMART film debut   campfire tales ", 20)
    assert [h.text for h in hits] == split_pages(cache[query])
    assert all(h.score == math.inf and h.source == query for h in hits)
    # "search query: " prefixed keys are hit without the prefix
    prefixed = next(k for k in cache if k.startswith("search query: ") and split_pages(cache[k]))
    hits = backend.search(prefixed[len("search query: "):], 3)
    assert [h.text for h in hits] == split_pages(cache[prefixed])[:3]
    # the tool's text reproduces the cached entry when pages are short enough
    tool = SearchTool(backend, top_k=20, max_page_chars=10_000)
    assert tool(query).text == cache[query]


def test_bm25_fallback_ranks_page_with_query_terms_first(cache_path):
    backend = CacheSearchBackend(cache_path)
    hits = backend.search("1997 anthology horror film directed by Matt Cooper", 5)
    assert hits[0].text.startswith("Feb 28, 1997 · Campfire Tales is a 1997 American anthology horror film")
    assert all(math.isfinite(h.score) and h.score > 0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # an exact key whose entry has no pages falls back to BM25 as well
    hits = backend.search("molecular formula of ascorbic acid", 3)
    assert hits and all(math.isfinite(h.score) for h in hits)


def test_search_is_deterministic_across_fresh_engines(cache_path):
    queries = ["who founded the company", "Yayoi Kusama autobiography", "capital of Australia", "上海 黄金"]
    first = [CacheSearchBackend(cache_path).search(q, 10) for q in queries]
    again = [CacheSearchBackend(cache_path).search(q, 10) for q in queries]
    search_mod._INDEXES.clear()  # force a rebuild of the index from the file
    rebuilt = [CacheSearchBackend(cache_path).search(q, 10) for q in queries]
    assert first == again == rebuilt
    assert all(first)


def test_jsonl_backend_and_registry(tmp_path, monkeypatch):
    corpus = tmp_path / "wiki.jsonl"
    rows = [{"id": "d1", "title": "Paris", "contents": "Paris is the capital of France."},
            {"id": "d2", "text": "Canberra is the capital of Australia."},
            {"id": "d3", "contents": "Bananas are yellow."}]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    backend = make_search_backend("jsonl", path=corpus)
    hits = backend.search("capital of Australia", 2)
    assert [h.source for h in hits] == ["d2", "d1"]
    assert isinstance(backend_for_corpus(corpus), JsonlCorpusBackend)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        JsonlCorpusBackend(bad).search("x", 1)
    with pytest.raises(ValueError, match="unknown search backend"):
        make_search_backend("bing")

    class EchoBackend:
        name = "echo"

        def search(self, query, top_k):
            return [SearchHit(f"result for {query}", 1.0, "echo")][:top_k]

    monkeypatch.setattr(search_mod, "SEARCH_BACKENDS", dict(search_mod.SEARCH_BACKENDS))
    register_search_backend("echo", EchoBackend)
    assert SearchTool(make_search_backend("echo"))("hi").text == "Page 1: result for hi"


def test_search_tool_results_and_errors(cache_path):
    tool = SearchTool(CacheSearchBackend(cache_path), top_k=3, max_page_chars=50)
    r = tool("Campfire Tales director")
    assert r.ok and r.error is None
    lines = r.text.split("\n")
    assert [ln.split(":")[0] for ln in lines] == ["Page 1", "Page 2", "Page 3"]
    assert all(len(ln) <= len("Page 1: ") + 50 + 4 for ln in lines)
    assert tool("zzqxj vvkw").text == NO_RESULTS
    empty = tool("   ")
    assert not empty.ok and empty.text.startswith("Error:")

    class Broken:
        name = "broken"

        def search(self, query, top_k):
            raise ConnectionError("offline")

    r = SearchTool(Broken())("q")
    assert not r.ok and "ConnectionError: offline" in r.error
