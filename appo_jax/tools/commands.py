"""``appo-jax tool python|search``: run one tool call by hand and print what the model would see.

    echo 'import math; math.factorial(20)' | appo-jax tool python --tool-timeout 5
    appo-jax tool search "Amy Smart film debut" --top-k 3 [--corpus FILE.json|FILE.jsonl] [--data-dir DIR]

The result text goes to stdout; for a failed call the one-line error also goes to stderr and the exit code is 1.
"""
from __future__ import annotations

import argparse
import sys

from appo_jax.tools.python_sandbox import PythonSandbox, SandboxConfig
from appo_jax.tools.result import ToolResult
from appo_jax.tools.search import CacheSearchBackend, SearchTool, backend_for_corpus


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tool`` with its ``python`` and ``search`` subcommands."""
    tool = subparsers.add_parser(
        "tool", help="run a tool (python sandbox, search) by hand",
        description="Run one tool call by hand and print the text the model would see (a failed call: exit "
                    "code 1 and its error on stderr).")
    sub = tool.add_subparsers(dest="tool", required=True, metavar="TOOL")

    py = sub.add_parser("python", help="run python code read from stdin in the sandbox",
                        description="Run the python code read from stdin in the sandbox of the python tool and print "
                                    "its output (stdout, and the value of a last expression).")
    py.add_argument("--tool-timeout", type=float, default=10.0, help="python tool wall-clock limit (s)")
    py.add_argument("--memory-mb", type=int, default=2048, help="address-space limit in MiB")
    py.add_argument("--isolation", choices=("auto", "full", "user", "basic"), default="auto",
                    help="sandbox isolation level (default: auto, the strongest that works here)")
    py.set_defaults(func=_python)

    se = sub.add_parser("search", help="query the offline search engine",
                        description="Query the offline search engine (the shipped query cache or a corpus file) and "
                                    "print the pages the search tool would return.")
    se.add_argument("query", help="the search query")
    se.add_argument("--top-k", type=int, default=10, help="number of pages")
    se.add_argument("--corpus", default=None,
                    help="query cache (.json) or document corpus (.jsonl); "
                         "default: <data dir>/search/search_cache.json")
    se.add_argument("--data-dir", default=None,
                    help="data dir holding search/ (default: $APPO_DATA_DIR, else the shipped data)")
    se.add_argument("--max-page-chars", type=int, default=600, help="cut each page to this many characters")
    se.set_defaults(func=_search)


def _emit(result: ToolResult) -> int:
    print(result.text)
    if not result.ok:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    return 0


def _python(args: argparse.Namespace) -> int:
    config = SandboxConfig(timeout_s=args.tool_timeout, memory_mb=args.memory_mb, isolation=args.isolation)
    return _emit(PythonSandbox(config, max_workers=1).run(sys.stdin.read()))


def _search(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.corpus is not None:
        backend = backend_for_corpus(args.corpus)
    else:
        backend = CacheSearchBackend(data_dir=args.data_dir)
    return _emit(SearchTool(backend, top_k=args.top_k, max_page_chars=args.max_page_chars)(args.query))
