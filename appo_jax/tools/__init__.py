"""Tools for the multi-turn agent loop: the python sandbox, offline search engines, and the registry that runs them."""
from appo_jax.tools.bm25 import BM25Index, tokenize
from appo_jax.tools.kb_search import KbSearchBackend
from appo_jax.tools.python_sandbox import PythonSandbox, SandboxConfig
from appo_jax.tools.registry import ToolRegistry, build_registry
from appo_jax.tools.result import Tool, ToolResult, format_observation
from appo_jax.tools.search import (
    CacheSearchBackend, JsonlCorpusBackend, SearchBackend, SearchHit, SearchTool, make_search_backend,
    register_search_backend,
)

register_search_backend("kb", KbSearchBackend)  # the kb_multihop task's knowledge base (beside cache, jsonl)

__all__ = [
    "BM25Index",
    "CacheSearchBackend",
    "JsonlCorpusBackend",
    "KbSearchBackend",
    "PythonSandbox",
    "SandboxConfig",
    "SearchBackend",
    "SearchHit",
    "SearchTool",
    "Tool",
    "ToolRegistry",
    "ToolResult",
    "build_registry",
    "format_observation",
    "make_search_backend",
    "register_search_backend",
    "tokenize",
]
