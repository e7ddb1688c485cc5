"""The `foldtron` command line. Thin: each subcommand lives in `pretrain/commands/<name>.py`, which defines
`register(subparsers)`; heavy imports (torch, megatron) happen inside the handlers so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pretrain import commands as _commands

DESCRIPTION = """Foldtron: pretraining for hybrid Mamba-Transformer MoE LLMs (Nemotron 3 family) on Megatron-Core.

Data flow: curate -> tokenizer/shards -> train (stages) -> export-hf.  Each subcommand has its own --help."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldtron", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pretrain.config import ConfigError

    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"foldtron {args.command}: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
