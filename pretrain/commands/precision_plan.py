"""`foldtron precision-plan --config C`: per module of the model, the number format and the Transformer Engine
recipe (class and arguments) the te backend runs it under; the emulation (cpu / local backends) uses the same
policy. Needs no GPU."""
from __future__ import annotations

import argparse
import json

from pretrain.commands.config import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("precision-plan", help="per-module number formats and TE recipes of a run config",
                       description=__doc__)
    add_config_args(p)
    p.add_argument("--stage", help="the stage whose precision to show (default: the run's precision section)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from collections import Counter

    from model.adapt.te_precision import te_plan
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    prec = cfg.precision
    if args.stage:
        stage = next((s for s in cfg.stages if s.name == args.stage), None)
        if stage is None:
            print(f"foldtron precision-plan: no stage {args.stage!r}; stages: {[s.name for s in cfg.stages]}")
            return 2
        prec = stage.precision or prec
    plan = te_plan(cfg.model, prec)
    if args.json:
        print(json.dumps([r._asdict() for r in plan], indent=1))
        return 0
    width = max(len(r.name) for r in plan)
    print(f"{'module':{width}s}  {'format':6s}  Transformer Engine recipe")
    for r in plan:
        te = "none (BF16/FP32, no autocast)" if r.te_recipe is None else \
            f"{r.te_recipe}({', '.join(f'{k}={v}' for k, v in r.te_kwargs.items())})"
        print(f"{r.name:{width}s}  {r.fmt:6s}  {te}")
    counts = Counter(r.fmt for r in plan)
    print("\n" + ", ".join(f"{n} {f}" for f, n in sorted(counts.items())) + f" of {len(plan)} modules; recipe "
          f"{prec.recipe}; the emulated path (cpu/local backends) computes the same formats")
    return 0
