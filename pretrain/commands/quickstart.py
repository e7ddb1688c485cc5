"""`foldtron quickstart`: the whole pipeline on an embedded real corpus (Python's standard library, its docs,
and the machine's manual pages) on a CPU, step by step with timings; a rerun reuses finished steps."""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline end to end on an embedded corpus (CPU)",
                       description=__doc__)
    p.add_argument("--output", default="runs/quickstart", help="where everything is written (default: %(default)s)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of the first training stage")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="processes for curation and sharding")
    p.add_argument("--fresh", action="store_true", help="delete --output first instead of reusing finished steps")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pretrain.quickstart import run_quickstart

    if args.steps < 2:
        raise SystemExit("foldtron quickstart: --steps must be at least 2")
    run_quickstart(args.output, steps=args.steps, cpus=args.cpus, fresh=args.fresh)
    return 0
