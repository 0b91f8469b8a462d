"""The tool registry (sync calls, futures, failure containment) and the `appo-jax tool` CLI."""
from __future__ import annotations

import argparse
import io
import threading
import time

import pytest

from appo_jax.tools.commands import register
from appo_jax.tools.registry import ToolRegistry, build_registry
from appo_jax.tools.result import ToolResult, format_observation, truncate_middle


class SlowEcho:
    name = "echo"

    def __init__(self, delay=0.0):
        self.delay = delay
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, text):
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.delay)
        with self._lock:
            self.active -= 1
        return ToolResult(text=text.upper(), ok=True)


class Exploding:
    name = "boom"

    def __call__(self, text):
        raise RuntimeError("kaput")


class WrongType:
    name = "wrong"

    def __call__(self, text):
        return text


def test_observation_format_and_truncation():
    assert ToolResult("42", True).observation() == "<result>\n42\n</result>" == format_observation("42")
    text = "".join(str(i % 10) for i in range(1000))
    cut = truncate_middle(text, 100)
    assert len(cut) <= 100 and "characters truncated" in cut
    head, tail = cut.split("\n... [")[0], cut.rsplit("] ...\n", 1)[1]
    assert text.startswith(head) and text.endswith(tail)
    assert int(cut.split("[")[1].split(" ")[0]) == len(text) - len(head) - len(tail)
    assert truncate_middle("short", 100) == "short"


def test_failures_become_error_results():
    reg = ToolRegistry([SlowEcho(), Exploding(), WrongType()])
    assert reg.names == ["boom", "echo", "wrong"]
    assert reg.call("echo", "hi") == ToolResult("HI", True)
    r = reg.call("boom", "x")
    assert not r.ok and r.text == "Error: tool 'boom' failed: RuntimeError: kaput"
    r = reg.call("nope", "x")
    assert not r.ok and "unknown tool 'nope'" in r.text and "echo" in r.text
    assert not reg.call("wrong", "x").ok
    assert not reg.submit("boom", "x").result().ok
    with pytest.raises(ValueError, match="already registered"):
        reg.register(SlowEcho())
    reg.close()
    r = reg.submit("echo", "late").result()
    assert not r.ok and "closed" in r.text


def test_submit_runs_concurrently_up_to_the_bound():
    tool = SlowEcho(delay=0.2)
    with ToolRegistry([tool], max_workers=3) as reg:
        futures = [reg.submit("echo", f"q{i}") for i in range(9)]
        assert [f.result().text for f in futures] == [f"Q{i}" for i in range(9)]
    assert tool.peak == 3


def test_build_registry_runs_both_tools_concurrently():
    with build_registry(python={"timeout_s": 10.0, "max_workers": 2}, search={"top_k": 2}) as reg:
        assert reg.names == ["python", "search"]
        py = reg.submit("python", "sum(range(10))")
        se = reg.submit("search", "Amy Smart film debut Campfire Tales")
        assert py.result().text == "45" and py.result().ok
        assert se.result().ok and se.result().text.startswith("Page 1: ") and "Page 3" not in se.result().text
    with pytest.raises(ValueError, match="unknown built-in tool"):
        build_registry(["calculator"])


def _cli(argv):
    parser = argparse.ArgumentParser(prog="appo-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_python(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("print('hi')\n2 + 3"))
    assert _cli(["tool", "python", "--tool-timeout", "10"]) == 0
    assert capsys.readouterr().out == "hi\n5\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("raise KeyError('k')"))
    assert _cli(["tool", "python", "--tool-timeout", "10"]) == 1
    captured = capsys.readouterr()
    assert "KeyError: 'k'" in captured.out and captured.err == "error: KeyError: 'k'\n"


def test_cli_search(capsys, tmp_path):
    assert _cli(["tool", "search", "Amy Smart film debut Campfire Tales", "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln[:7] for ln in out] == ["Page 1:", "Page 2:"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"contents": "alpha beta"}\n{"contents": "gamma"}\n')
    assert _cli(["tool", "search", "gamma", "--corpus", str(corpus)]) == 0
    assert capsys.readouterr().out == "Page 1: gamma\n"
    with pytest.raises(ValueError, match="--top-k"):
        _cli(["tool", "search", "x", "--top-k", "0"])
