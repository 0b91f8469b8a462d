"""The ``search`` tool: offline, deterministic search engines behind a pluggable `SearchBackend` interface.

Backends (registry by name, `make_search_backend`):

* ``"cache"`` (default): the shipped query cache ``<data dir>/search/search_cache.json``, a JSON object
  ``query -> "Page 1: ...\\nPage 2: ..."``. A query whose normalised form (`normalize_query`) equals a cached
  query returns that query's pages, in order (an *exact hit*); any other query — and a cached query whose entry
  has no pages ("No search results found.") — is answered by BM25 over all cached pages, each page one document
  (identical pages de-duplicated, first occurrence kept).
* ``"jsonl"``: BM25 over a JSONL corpus, one document per line with a ``"contents"`` or ``"text"`` field (and an
  optional ``"title"``), e.g. a Wikipedia dump in the Search-R1 format.

Real web search plugs in by registering any object with ``name`` and ``search(query, top_k) -> list[SearchHit]``.
Indexes are built lazily on first use and shared by every backend instance over the same file.

`SearchTool` turns a backend into a tool: the result text is ``Page 1: ...\\nPage 2: ...`` (top-k pages, each cut
to ``max_page_chars``), or ``No search results found.``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from appo_jax.data.paths import resolve_data_dir
from appo_jax.tools.bm25 import BM25Index
from appo_jax.tools.result import ToolResult, error_result, truncate_middle

CACHE_RELPATH = Path("search") / "search_cache.json"
NO_RESULTS = "No search results found."
_PAGE_SPLIT = re.compile(r"(?m)^Page \d+:[ \t]*")
_QUERY_PREFIX = re.compile(r"^\s*search query\s*:\s*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One retrieved page: its text, its score (``inf`` for an exact cache hit) and where it came from."""

    text: str
    score: float
    source: str


@runtime_checkable
class SearchBackend(Protocol):
    """A search engine: ``search(query, top_k)`` returns at most `top_k` hits, best first. Must be thread-safe."""

    name: str

    def search(self, query: str, top_k: int) -> list[SearchHit]: ...


def normalize_query(query: str) -> str:
    """The key for exact cache hits: NFKC, casefolded, a leading ``search query:`` removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", query).casefold()
    return " ".join(_QUERY_PREFIX.sub("", text).split())


def split_pages(value: str) -> list[str]:
    """The pages of a cached result ``"Page 1: a\\nPage 2: b"`` -> ``["a", "b"]`` (no pages -> ``[]``)."""
    parts = _PAGE_SPLIT.split(value)
    return [p.strip() for p in parts[1:] if p.strip()]


def format_pages(hits: list[SearchHit], max_page_chars: int) -> str:
    """``Page i: text`` lines (i from 1), each page cut to `max_page_chars` (with " ..."); `NO_RESULTS` if none."""
    if not hits:
        return NO_RESULTS
    lines = []
    for i, hit in enumerate(hits, 1):
        text = " ".join(hit.text.split())
        if max_page_chars > 0 and len(text) > max_page_chars:
            text = text[:max_page_chars].rstrip() + " ..."
        lines.append(f"Page {i}: {text}")
    return "\n".join(lines)


# -- shared lazy indexes ---------------------------------------------------------------------------------------

_INDEX_LOCK = threading.Lock()
_INDEXES: dict[tuple, Any] = {}


def _shared(key: tuple, build: Callable[[], Any]) -> Any:
    """Build-once cache of loaded corpora / indexes, keyed by file identity and parameters."""
    with _INDEX_LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = build()
        return _INDEXES[key]


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def default_cache_path(data_dir: str | os.PathLike | None = None) -> Path:
    """``<data dir>/search/search_cache.json`` with the data dir resolved by `appo_jax.data.paths`."""
    path = resolve_data_dir(data_dir) / CACHE_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"search cache {str(path)!r} not found (expected {CACHE_RELPATH} in the data dir)")
    return path


@dataclasses.dataclass(frozen=True)
class _CacheCorpus:
    exact: dict[str, tuple[str, list[str]]]  # normalised query -> (original query, pages)
    pages: list[str]
    page_source: list[str]
    index: BM25Index


def _load_cache_corpus(path: Path, k1: float, b: float) -> _CacheCorpus:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"search cache {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError(f"search cache {str(path)!r} must be a JSON object mapping query strings to result strings")
    exact: dict[str, tuple[str, list[str]]] = {}
    pages: list[str] = []
    source: list[str] = []
    seen: set[str] = set()
    for query, value in raw.items():
        query_pages = split_pages(value)
        exact.setdefault(normalize_query(query), (query, query_pages))
        for page in query_pages:
            if page not in seen:
                seen.add(page)
                pages.append(page)
                source.append(query)
    return _CacheCorpus(exact, pages, source, BM25Index(pages, k1=k1, b=b))


class CacheSearchBackend:
    """Exact hits from the query cache, else BM25 over its pages (module docstring). Deterministic, thread-safe."""

    name = "cache"

    def __init__(self, path: str | os.PathLike | None = None, *, data_dir: str | os.PathLike | None = None,
                 k1: float = 1.5, b: float = 0.75):
        self.path = Path(path).expanduser().resolve() if path is not None else default_cache_path(data_dir)
        if not self.path.is_file():
            raise FileNotFoundError(f"search cache {str(self.path)!r} not found")
        self.k1, self.b = k1, b

    @property
    def corpus(self) -> _CacheCorpus:
        """The loaded cache and its BM25 index (built on first use, shared across instances)."""
        return _shared(("cache", *_file_key(self.path), self.k1, self.b),
                       lambda: _load_cache_corpus(self.path, self.k1, self.b))

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        corpus = self.corpus
        exact = corpus.exact.get(normalize_query(query))
        if exact is not None and exact[1]:
            return [SearchHit(p, math.inf, exact[0]) for p in exact[1][:top_k]]
        return [SearchHit(corpus.pages[i], s, corpus.page_source[i]) for i, s in corpus.index.top_k(query, top_k)]


def _load_jsonl_corpus(path: Path, k1: float, b: float) -> tuple[list[str], list[str], BM25Index]:
    docs, ids = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {err}") from err
            text = row.get("contents", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: each line needs a string 'contents' or 'text' field")
            title = row.get("title")
            docs.append(f"{title}: {text}" if isinstance(title, str) and title else text)
            ids.append(str(row.get("id", lineno)))
    return docs, ids, BM25Index(docs, k1=k1, b=b)


class JsonlCorpusBackend:
    """BM25 over a JSONL document corpus (``contents`` / ``text``, optional ``title`` and ``id``)."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, *, k1: float = 1.5, b: float = 0.75):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"search corpus {str(self.path)!r} not found")
        self.k1, self.b = k1, b

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        docs, ids, index = _shared(("jsonl", *_file_key(self.path), self.k1, self.b),
                                   lambda: _load_jsonl_corpus(self.path, self.k1, self.b))
        return [SearchHit(docs[i], s, ids[i]) for i, s in index.top_k(query, top_k)]


SEARCH_BACKENDS: dict[str, Callable[..., SearchBackend]] = {
    "cache": CacheSearchBackend,
    "jsonl": JsonlCorpusBackend,
}


def register_search_backend(name: str, factory: Callable[..., SearchBackend]) -> None:
    """Make `factory(**kwargs)` available as ``make_search_backend(name, **kwargs)`` (e.g. a web-search client)."""
    SEARCH_BACKENDS[name] = factory


def make_search_backend(name: str = "cache", **kwargs: Any) -> SearchBackend:
    """Instantiate the registered backend `name` with `kwargs`; ``ValueError`` naming the known ones otherwise."""
    if name not in SEARCH_BACKENDS:
        raise ValueError(f"unknown search backend {name!r}; known: {', '.join(sorted(SEARCH_BACKENDS))}")
    return SEARCH_BACKENDS[name](**kwargs)


def backend_for_corpus(path: str | os.PathLike | None) -> SearchBackend:
    """The backend for a corpus file: ``*.jsonl`` -> "jsonl", anything else (or None: the default) -> "cache"."""
    if path is not None and str(path).endswith(".jsonl"):
        return JsonlCorpusBackend(path)
    return CacheSearchBackend(path)


class SearchTool:
    """The ``search`` tool: ``tool(query) -> ToolResult`` with ``Page i: ...`` text from `backend`."""

    name = "search"

    def __init__(self, backend: SearchBackend | None = None, *, top_k: int = 10, max_page_chars: int = 600,
                 max_result_chars: int = 8000):
        if top_k < 1:
            raise ValueError(f"SearchTool top_k must be >= 1, got {top_k}")
        self.backend = backend if backend is not None else CacheSearchBackend()
        self.top_k, self.max_page_chars, self.max_result_chars = top_k, max_page_chars, max_result_chars

    def __call__(self, input_text: str) -> ToolResult:
        start = time.monotonic()
        query = " ".join(input_text.split())
        if not query:
            return error_result("empty search query", time.monotonic() - start)
        try:
            hits = self.backend.search(query, self.top_k)
        except Exception as exc:  # noqa: BLE001 - a backend failure is a result, never an exception
            return error_result(f"search backend {self.backend.name!r} failed: {type(exc).__name__}: {exc}",
                                time.monotonic() - start)
        text = truncate_middle(format_pages(hits, self.max_page_chars), self.max_result_chars)
        return ToolResult(text=text, ok=True, error=None, seconds=time.monotonic() - start)
