"""Where the raw data and the prepared TFDS datasets live.

The *data dir* is the directory holding ``benchmarks/``, ``rl/`` and ``search/``. The package ships one:
``appo_jax/data/raw`` (about 8 MB, installed with the wheel; origins, row counts and licences in its
``README.md``). Resolution order: an explicit ``--data-dir`` / ``data_dir`` argument, else ``$APPO_DATA_DIR``,
else the shipped copy. A given directory must exist and hold at least one of the three subdirectories.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DATA_DIR_ENV = "APPO_DATA_DIR"
TFDS_DIR_ENV = "APPO_TFDS_DIR"
DATA_SUBDIRS = ("benchmarks", "rl", "search")

#: The data shipped inside the package (package data of the wheel; the same path in a source checkout).
SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "raw"
DEFAULT_TFDS_DIR = Path("~/.cache/appo_jax/tfds")


def _checked(path: Path, origin: str) -> Path:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"data dir {str(path)!r} (from {origin}) is not a directory")
    if not any((path / sub).is_dir() for sub in DATA_SUBDIRS):
        raise FileNotFoundError(
            f"data dir {str(path)!r} (from {origin}) has none of the expected subdirectories "
            f"{', '.join(s + '/' for s in DATA_SUBDIRS)}"
        )
    return path


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The absolute data dir: `data_dir` if given, else ``$APPO_DATA_DIR``, else `SHIPPED_DATA_DIR`.

    The chosen dir must exist and contain one of ``benchmarks/``, ``rl/``, ``search/``; otherwise raises
    ``FileNotFoundError`` naming the directory and where it came from.
    """
    if data_dir is not None and str(data_dir) != "":
        return _checked(Path(data_dir), "the data_dir argument / --data-dir")
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return _checked(Path(env), f"${DATA_DIR_ENV}")
    return _checked(SHIPPED_DATA_DIR, "the data shipped with appo_jax (reinstall the package if it is missing)")


def resolve_tfds_dir(tfds_dir: str | os.PathLike | None = None) -> Path:
    """Where prepared TFDS datasets are cached: `tfds_dir`, else ``$APPO_TFDS_DIR``, else ``~/.cache/appo_jax/tfds``."""
    if tfds_dir is not None and str(tfds_dir) != "":
        return Path(tfds_dir).expanduser().resolve()
    env = os.environ.get(TFDS_DIR_ENV, "")
    return Path(env or DEFAULT_TFDS_DIR).expanduser().resolve()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir`` and ``--tfds-dir`` (both default None, resolved by the functions above)."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"directory holding benchmarks/, rl/, search/ (default: ${DATA_DIR_ENV}, else the shipped data)",
    )
    parser.add_argument(
        "--tfds-dir",
        default=None,
        help=f"cache of prepared TFDS datasets (default: ${TFDS_DIR_ENV}, else {DEFAULT_TFDS_DIR})",
    )
