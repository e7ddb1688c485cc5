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
    parser.add_argument("--verbose", action="store_true",
                        help="show every warning, including the known-harmless Megatron-Core/torch ones Foldtron "
                             "silences by their exact message (model/adapt/warnings.py)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        module.register(sub)
    return parser


#: Errors that mean "the input or the command line is wrong" and name what is wrong: printed as one line with
#: exit code 2, not as a traceback. Looked up in sys.modules: a module never imported raised none of them.
_USER_ERRORS = (("pretrain.export_hf", "ExportError"), ("data_pipeline.curate", "CurationError"),
                ("data_pipeline.sources", "SourceError"), ("data_pipeline.shards", "CuratedInputError"),
                ("data_pipeline.manifest", "ShardError"), ("data_pipeline.tokenizer", "TokenizerError"),
                ("data_pipeline.curriculum", "CurriculumError"), ("parallel.layout", "LayoutError"),
                ("pretrain.checkpoint", "CheckpointError"), ("pretrain.checkpoint", "RunLockError"),
                ("pretrain.merge", "MergeError"))


def _is_user_error(e: BaseException) -> bool:
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import os

        os.environ["FOLDTRON_VERBOSE"] = "1"  # children (torchrun-style ranks, sbatch jobs) inherit it
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pretrain.config import ConfigError

    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"foldtron {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"foldtron {args.command}: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
