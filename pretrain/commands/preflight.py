"""`foldtron preflight --config FILE [--gpus N --gpu KIND] [key=value ...]`: everything about a run that can be
known before it starts, checked at once (pretrain/preflight.py lists the checks): every stage's batch, phase, token
budget, layout and memory on the declared cluster, the data and epochs per source, the LR curve over the whole
run (written as a PNG, tokens per stage). Every problem is listed with its stage and field.

`foldtron train` runs the same checks (without the memory estimate) for all stages before the first step.
Exit code 0: no problem; 1: problems (listed); 2: the config itself does not load.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.commands.config import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preflight", help="check a whole run (all stages, data, layouts, memory, LR) before it starts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="job size for stages that declare none (default: the config's cluster.gpus)")
    p.add_argument("--gpu", default=None, metavar="KIND",
                   help="GPU kind for memory/precision: h100, h200, b200, gb200 (default: the config's cluster.gpu)")
    p.add_argument("--no-data", action="store_true",
                   help="skip what needs the data mounted (shards, manifests, epochs, tokenizer): a login node")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="where to write the LR curve over the run (default: preflight-<config name>-lr.png)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.preflight import format_report, json_report, plot_lr, preflight

    cfg = load_config(args.config, args.overrides)
    if args.gpus is not None and args.gpus < 1:
        print(f"foldtron preflight: --gpus must be >= 1, got {args.gpus}")
        return 2
    rep = preflight(cfg, gpus=args.gpus, gpu=args.gpu, data=not args.no_data)
    plot = args.plot or f"preflight-{Path(args.config).stem if args.config else 'defaults'}-lr.png"
    if rep.resolved:  # the stages' schedules are valid: their LR curve can be drawn
        plot_lr(cfg, rep.resolved, plot)
    if args.json:
        print(json.dumps(dict(json_report(rep), plot=plot if rep.resolved else None), indent=1))
    else:
        print(format_report(cfg, rep))
        if rep.resolved:
            print(f"LR curve over the run: {plot}")
        if rep.plan_text:
            print("curriculum plan:\n" + rep.plan_text)
    return 0 if rep.ok else 1
