"""`foldtron merge-checkpoints`: average a stage's last K checkpoints (or those saved inside a token window) into a
new checkpoint with the same layout (pretrain/merge.py says what is averaged and what comes from the newest).
The output (default <run>/merged/<stage>/iter_N) resumes (checkpoint.load=<run>/merged), exports and verifies
like any other checkpoint. One process, or all ranks under torchrun (each merges its share of the files)."""
from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-checkpoints", help="average a stage's last checkpoints into a new one",
                       description=__doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (checkpoint.save)")
    p.add_argument("--stage", required=True, help="stage whose checkpoints are merged (a directory of --run)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, metavar="K", help="the newest K complete checkpoints (K >= 2)")
    which.add_argument("--window-tokens", metavar="W",
                       help="the checkpoints saved within the last W consumed tokens (K/M/B/T suffixes: 500B)")
    p.add_argument("--until", type=int, metavar="ITER",
                   help="the newest checkpoint to include (default: the stage's latest)")
    p.add_argument("--output", metavar="DIR", help="iteration directory to write (default: <run>/merged/<stage>/"
                   "iter_N); an existing one is replaced only if it is a previous merge output")
    p.add_argument("--no-verify-inputs", action="store_true",
                   help="skip the sha256 check of every input file (it reads each input once more)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pretrain.merge import MergeError, default_output, merge, select

    window = None
    if args.window_tokens is not None:
        from data_pipeline.curriculum import parse_tokens

        try:
            window = parse_tokens(args.window_tokens)
        except ValueError as e:
            raise MergeError(f"--window-tokens: {e}") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank merges its share
        from pretrain.launch import init_distributed

        init_distributed(backend="gloo")
    infos = select(args.run, args.stage, last=args.last, window_tokens=window, until=args.until)
    out = args.output or default_output(args.run, args.stage, infos[-1].iteration)
    report = merge(infos, out, verify_inputs=not args.no_verify_inputs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, indent=1))
    return 0
