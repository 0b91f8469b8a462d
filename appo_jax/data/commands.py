"""`appo-jax data prepare | show`: build the TFDS cache ahead of time and look at records."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from appo_jax.data.paths import add_data_arguments, resolve_data_dir, resolve_tfds_dir
from appo_jax.progress import progress_bar
from appo_jax.data.rows import DATASETS, get_spec


def _prepare(args: argparse.Namespace) -> int:
    from appo_jax.data.builders import prepared_builder  # deferred: tensorflow_datasets (package doc)

    specs = [get_spec(name) for name in args.names or list(DATASETS)]  # unknown names fail before any work
    print(f"data prepare: {len(specs)} dataset(s) from {resolve_data_dir(args.data_dir)} into "
          f"{resolve_tfds_dir(args.tfds_dir)}", file=sys.stderr, flush=True)
    records = 0
    with progress_bar(len(specs), "prepare", "dataset") as bar:
        for spec in specs:
            bar.set_postfix_str(spec.name)
            builder = prepared_builder(spec.name, args.data_dir, args.tfds_dir)
            count = builder.info.splits[spec.split].num_examples
            records += count
            bar.write(json.dumps({"dataset": spec.name, "split": spec.split, "records": count,
                                  "dir": str(builder.data_dir)}), file=sys.stdout)
            bar.update(1)
    print(f"data prepare: {records} records in {len(specs)} dataset(s)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from appo_jax.data.builders import load_split  # deferred: tensorflow_datasets (package doc)

    split = args.split or get_spec(args.name).split
    for record in load_split(args.name, split, args.data_dir, args.limit, args.tfds_dir):
        print(json.dumps(dataclasses.asdict(record), ensure_ascii=False))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data prepare [NAME ...]`` and ``data show NAME [--split S] [--limit K]`` to the `appo-jax` CLI."""
    data = subparsers.add_parser("data", help="prepare / inspect the benchmark and RL datasets (TFDS)",
                                 description="Prepare the TFDS cache of the benchmark and RL datasets ahead of time, "
                                             "and print their records.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    prepare = sub.add_parser("prepare", help="build the TFDS array_record cache; one JSON line per dataset",
                             description="Build the TFDS array_record cache of file datasets (all by default) and "
                                         "print one JSON line per dataset: its split, record count and directory.")
    prepare.add_argument("names", nargs="*", help=f"datasets (default: all of {', '.join(DATASETS)})")
    add_data_arguments(prepare)
    prepare.set_defaults(func=_prepare)

    show = sub.add_parser("show", help="print records of a dataset as JSON lines",
                          description="Print the first records of a dataset as JSON lines (question, ground truths, "
                                      "chat prompt, ...).")
    show.add_argument("name", help=f"one of {', '.join(DATASETS)}")
    show.add_argument("--split", default=None, help="the dataset's split (default: its only split)")
    show.add_argument("--limit", type=int, default=3, help="how many records")
    add_data_arguments(show)
    show.set_defaults(func=_show)
