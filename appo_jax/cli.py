"""The `appo-jax` command line: generate | rollout | train | eval | serve | plan | bench | tool | data.

Each area owns its subcommands in a `commands` module exposing ``register(subparsers)`` (and, for sub-commands
of ``appo-jax bench``, ``register_bench(bench_subparsers)``); handlers take the parsed ``args`` and return an exit
code. Errors meant for users (``ValueError``, ``FileNotFoundError``) are
printed as one clear line instead of a traceback (set ``APPO_JAX_TRACEBACK=1`` to see it). JAX's persistent
compilation cache is on for every command (`appo_jax.compilation_cache`; ``--no-compile-cache`` turns it off).

Every parser's ``--help`` shows each option's default (`HelpFormatter`). ``appo-jax bench`` lists the speed
scripts of ``benchmarks/`` (`benchmark_scripts`; ``appo-jax bench list`` prints them as JSON lines); its
sub-commands (``bench sampler``) come from the areas.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
from pathlib import Path

from appo_jax.compilation_cache import default_cache_dir, enable_compilation_cache

COMMAND_MODULES = (
    "appo_jax.rollout.commands",
    "appo_jax.training.commands",
    "appo_jax.serving.commands",
    "appo_jax.evaluation.commands",
    "appo_jax.tools.commands",
    "appo_jax.data.commands",
    "appo_jax.training.plan_commands",
)

#: The speed scripts (``python benchmarks/NAME.py``): next to the package in a source checkout.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The ``--help`` of every `appo-jax` parser: a description / epilog with line breaks (examples) is kept as
    written, a one-paragraph one is wrapped; each option's default is appended, ``(default: X)``, unless its help
    already names it, it is a switch (``store_true``) or it has none (None: the help says what then happens)."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip("\n"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def parsers(parser: argparse.ArgumentParser):
    """``parser`` and every sub-parser below it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias names its parser twice
                yield from parsers(sub)


def benchmark_scripts(directory: Path = BENCHMARKS_DIR) -> list[dict]:
    """One dict per script of ``benchmarks/`` (sorted): ``name``, ``purpose`` (its docstring's first line) and the
    ``command`` that runs it from the repository root; [] when the directory is absent (an installed package)."""
    scripts = []
    for path in sorted(directory.glob("*.py")) if directory.is_dir() else []:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        scripts.append({"name": path.stem, "purpose": doc.strip().split("\n", 1)[0],
                        "command": f"python benchmarks/{path.name}"})
    return scripts


def _bench_list(args) -> int:
    scripts = benchmark_scripts()
    if not scripts:
        raise FileNotFoundError(f"no benchmark scripts in {BENCHMARKS_DIR} (they live in the source checkout)")
    for script in scripts:
        print(json.dumps(script))
    return 0


def _add_bench(sub: argparse._SubParsersAction, modules) -> None:
    """``appo-jax bench``: the benchmark scripts in its help, ``bench list``, the areas' ``register_bench``."""
    scripts = benchmark_scripts()
    width = max((len(s["command"]) for s in scripts), default=0)
    listing = "\n".join(f"  {s['command']:{width}s}  {s['purpose']}" for s in scripts) or \
        f"  (none: {BENCHMARKS_DIR} is absent; the scripts live in the source checkout)"
    bench = sub.add_parser(
        "bench", help="speed benchmarks (JSON); lists the scripts of benchmarks/",
        description="Speed benchmarks that print JSON: the sub-commands below run inside the CLI; the scripts of "
                    "benchmarks/ (listed below, and as JSON lines by `appo-jax bench list`) run from the "
                    "repository root.",
        epilog=f"benchmark scripts (run from the repository root):\n{listing}\n")
    what = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    listed = what.add_parser("list", help="the benchmark scripts of benchmarks/ as JSON lines",
                             description="Print one JSON line per script of benchmarks/: its name, purpose (the "
                                         "first line of its docstring) and the command that runs it.")
    listed.set_defaults(func=_bench_list)
    for module in modules:
        if hasattr(module, "register_bench"):
            module.register_bench(what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appo-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--compile-cache-dir", default=None,
                        help="JAX persistent compilation cache (default: $APPO_JAX_COMPILE_CACHE, else "
                             "~/.cache/appo_jax/jax_compilation)")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [importlib.import_module(name) for name in COMMAND_MODULES]
    for module in modules:
        module.register(sub)
    _add_bench(sub, modules)
    for p in parsers(parser):
        p.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.no_compile_cache:
            enable_compilation_cache(args.compile_cache_dir or default_cache_dir())
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("APPO_JAX_TRACEBACK"):
            raise
        print(f"appo-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
