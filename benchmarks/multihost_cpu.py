"""Several JAX processes on this machine against one: the multi-host path proven on CPU. Prints one JSON line.

    python benchmarks/multihost_cpu.py --processes 2            # 2 processes x 4 CPU devices vs 1 x 8

What runs and what each field means: `appo_jax.training.multihost_check` (docs/multihost.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appo_jax.training.multihost_check import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=8, help="devices in all (split evenly over the processes)")
    p.add_argument("--steps", type=int, default=3, help="iterations (the multi run resumes before the last)")
    p.add_argument("--kill", action="store_true",
                   help="SIGKILL process 1 once checkpoint steps - 1 is complete instead of stopping cleanly, then "
                        "resume")
    p.add_argument("--resume-processes", type=int, help="processes of the resumed run (default: --processes)")
    p.add_argument("--heartbeat-timeout", type=int, default=10)
    p.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    result = compare(args.processes, args.devices, args.steps, args.out, args.kill, args.heartbeat_timeout,
                     args.resume_processes)
    print(json.dumps(result))
    return 0 if result["metrics_equal"] and result["resume_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
