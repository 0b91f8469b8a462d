"""`ToolRegistry`: the one interface the agent loop uses to run tools, synchronously or as futures.

    registry = build_registry()                      # python sandbox + offline search
    result = registry.call("search", "capital of France")          # ToolResult(text, ok, error, seconds)
    future = registry.submit("python", "print(2 + 2)")            # concurrent.futures.Future[ToolResult]
    observation = result.observation()                # "<result>\\n...\\n</result>"

Calls never raise: an unknown tool name, an exception escaping a tool, or a shut-down registry all come back as
``ok=False`` results whose text starts with ``Error:``. ``submit`` runs calls on a bounded thread pool
(``max_workers``), so slow tools (python) overlap with decoding and with each other; the python sandbox bounds its
own concurrency further (its ``max_workers`` slots).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Iterable, Mapping

from appo_jax.tools.python_sandbox import PythonSandbox, SandboxConfig
from appo_jax.tools.result import Tool, ToolResult, error_result
from appo_jax.tools.search import SearchTool, make_search_backend


class ToolRegistry:
    """Tools by name plus a bounded worker pool. Thread-safe; use as a context manager or call `close`."""

    def __init__(self, tools: Iterable[Tool] = (), max_workers: int = 8):
        if max_workers < 1:
            raise ValueError(f"ToolRegistry max_workers must be >= 1, got {max_workers}")
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)
        self.max_workers = max_workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def register(self, tool: Tool, name: str | None = None) -> None:
        """Add `tool` under `name` (default ``tool.name``); a name can be registered once."""
        key = name or tool.name
        if key in self._tools:
            raise ValueError(f"tool {key!r} is already registered")
        self._tools[key] = tool

    @property
    def names(self) -> list[str]:
        """Registered tool names, sorted."""
        return sorted(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def call(self, name: str, input_text: str) -> ToolResult:
        """Run tool `name` on `input_text` in the calling thread; every failure becomes an error result."""
        start = time.monotonic()
        tool = self._tools.get(name)
        if tool is None:
            return error_result(f"unknown tool {name!r} (available: {', '.join(self.names) or 'none'})")
        try:
            result = tool(input_text)
        except Exception as exc:  # noqa: BLE001 - tools must never raise into the trainer
            return error_result(f"tool {name!r} failed: {type(exc).__name__}: {exc}", time.monotonic() - start)
        if not isinstance(result, ToolResult):
            return error_result(f"tool {name!r} returned {type(result).__name__}, not ToolResult",
                                time.monotonic() - start)
        return result

    def submit(self, name: str, input_text: str) -> concurrent.futures.Future:
        """Schedule ``call(name, input_text)`` on the pool; the future always resolves to a `ToolResult`."""
        with self._lock:
            if self._closed:
                future: concurrent.futures.Future = concurrent.futures.Future()
                future.set_result(error_result("the tool registry is closed"))
                return future
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="appo-tool")
            return self._pool.submit(self.call, name, input_text)

    def close(self, wait: bool = True) -> None:
        """Stop accepting work and shut the pool down (pending calls finish when `wait`), then close the tools
        that hold processes (the python sandbox's process servers; after pending calls only when `wait`)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait)
        if wait:
            for tool in self._tools.values():
                getattr(tool, "close", lambda: None)()

    def __enter__(self) -> "ToolRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_registry(names: Iterable[str] = ("python", "search"), *, max_workers: int = 8,
                   python: Mapping[str, Any] | None = None, search: Mapping[str, Any] | None = None) -> ToolRegistry:
    """A registry with the built-in tools `names`.

    python: keyword arguments of `SandboxConfig` plus ``max_workers`` (sandbox slots, default 4).
    search: ``backend`` (a registered backend name, default "cache"), ``backend_kwargs`` (dict), and the
        `SearchTool` options ``top_k``, ``max_page_chars``, ``max_result_chars``.
    """
    tools: list[Tool] = []
    for name in names:
        if name == "python":
            opts = dict(python or {})
            slots = opts.pop("max_workers", 4)
            tools.append(PythonSandbox(SandboxConfig(**opts), max_workers=slots))
        elif name == "search":
            opts = dict(search or {})
            backend = make_search_backend(opts.pop("backend", "cache"), **opts.pop("backend_kwargs", {}))
            tools.append(SearchTool(backend, **opts))
        else:
            raise ValueError(f"unknown built-in tool {name!r}; built-in tools: python, search")
    return ToolRegistry(tools, max_workers=max_workers)
