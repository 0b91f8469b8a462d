"""The `appo-jax` command line: generate | rollout | train | eval | bench | tool.

Each area owns its subcommands in a `commands` module exposing ``register(subparsers)``; handlers take the
parsed ``args`` and return an exit code. Errors meant for users (``ValueError``, ``FileNotFoundError``) are
printed as one clear line instead of a traceback (set ``APPO_JAX_TRACEBACK=1`` to see it). JAX's persistent
compilation cache is on for every command (`appo_jax.compilation_cache`; ``--no-compile-cache`` turns it off).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from appo_jax.compilation_cache import default_cache_dir, enable_compilation_cache

COMMAND_MODULES = (
    "appo_jax.rollout.commands",
    "appo_jax.rollout.rollout_commands",
    "appo_jax.training.commands",
    "appo_jax.tools.commands",
    "appo_jax.data.commands",
    "appo_jax.training.plan_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appo-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--compile-cache-dir", default=None,
                        help="JAX persistent compilation cache (default: $APPO_JAX_COMPILE_CACHE, else "
                             "~/.cache/appo_jax/jax_compilation)")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
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
