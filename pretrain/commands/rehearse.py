"""`foldtron rehearse --config PRODUCTION.yaml [--output DIR]`: the production run's life lived in miniature on CPU
(pretrain/rehearse.py): preflight; the embedded corpus curated, tokenized and sharded; the same stages in the same
order with the curriculum's phases, blends and alternating lengths, the LR curve's shape compressed, the precision
policy emulated, on a proxy model with the preset's layer kinds at tiny widths; checkpoints at stage boundaries,
one merge, a kill -9 of every rank in the middle of a stage and a resume; then export to Hugging Face and verify.
The summary says which real feature each step exercised (also in DIR/rehearsal.json).
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rehearse", help="live a production run's life in miniature on CPU (minutes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the production run config")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="where the rehearsal writes (default: runs/rehearse-<config name>); must not hold a run")
    p.add_argument("--main-steps", type=int, default=24,
                   help="steps of the main stages together (default 24), shared in proportion to production")
    p.add_argument("--side-steps", type=int, default=3,
                   help="steps of each stage with its own LR schedule, per sequence length it alternates (default 3)")
    p.add_argument("--data-from", metavar="DIR", default=None,
                   help="reuse a quickstart output's curated shards and tokenizer (its steps are reused, not redone)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.rehearse import run_rehearsal

    if args.main_steps < 2 or args.side_steps < 1:
        print("foldtron rehearse: --main-steps must be >= 2 and --side-steps >= 1")
        return 2
    out = args.output or f"runs/rehearse-{Path(args.config).stem}"
    run_rehearsal(args.config, out, main_steps=args.main_steps, side_steps=args.side_steps,
                  data_from=Path(args.data_from) if args.data_from else None)
    return 0
