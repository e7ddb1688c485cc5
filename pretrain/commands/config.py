"""`foldtron config show`: print the fully resolved run config (presets expanded, overrides applied)."""
from __future__ import annotations

import argparse
import json


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The `--config FILE key=value ...` pair shared by every command that reads a run config."""
    p.add_argument("--config", "-c", metavar="FILE", help="run config YAML (examples/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied after the file, e.g. train.lr=3e-4 parallel.tp=2")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect run configs", description=__doc__)
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved run config",
                           description="Print the run config after presets and overrides, as YAML (or JSON).")
    add_config_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--explain", action="store_true",
                      help="print every field with its meaning and default, from the schema's own documentation")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from pretrain.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.explain:
        from model.fielddocs import explain

        print("\n".join(explain(cfg)))
        return 0
    print(json.dumps(cfg.model_dump(mode="json"), indent=2) if args.json else dump_config(cfg), end="")
    return 0
