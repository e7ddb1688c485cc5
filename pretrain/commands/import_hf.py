"""`foldtron import-hf`: a Hugging Face NemotronH directory (e.g. a released Nemotron 3 checkpoint) -> a Foldtron
weights-only checkpoint that any parallel layout loads."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="import a Hugging Face NemotronH checkpoint", description=__doc__)
    p.add_argument("hf_dir", metavar="HFDIR")
    p.add_argument("--output", required=True, metavar="DIR", help="run directory to write <stage>/iter_0000000 into")
    p.add_argument("--layout", default=None, metavar="K=V,...",
                   help="the layout the run will use, checked against the model, e.g. tp=4,ep=8,sequence_parallel=true")
    p.add_argument("--stage", default="pretrained", help="stage directory name (default: pretrained)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pretrain.import_hf import import_hf

    result = import_hf(args.hf_dir, args.output, args.layout, stage=args.stage, overwrite=args.overwrite)
    result.pop("model")
    print(json.dumps(result, indent=1))
    return 0
