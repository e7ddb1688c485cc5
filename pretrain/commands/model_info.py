"""`foldtron model-info --preset NAME`: parameters (total, active, each embedding convention, MTP on its own) and
forward/training FLOPs per token by layer kind, counted from the config and checked against the real model
built on the meta device (no memory)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter and FLOP counts of a model preset", description=__doc__)
    p.add_argument("--preset", required=True, help="model preset name (nano-30b-a3b, super-120b-a12b, tiny, ...)")
    p.add_argument("--seq-len", type=int, default=8192, help="sequence length for the attention/SSD FLOPs")
    p.add_argument("--no-meta-check", action="store_true", help="skip building the model on the meta device")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from model.counting import format_table, meta_param_count, param_counts
    from model.presets import get_preset, preset_names

    if args.preset not in preset_names():
        print(f"unknown preset {args.preset!r}; known: {', '.join(preset_names())}")
        return 2
    cfg = get_preset(args.preset)
    print(format_table(cfg, args.seq_len, args.preset))
    if not args.no_meta_check:
        from model.build import init_single_process

        init_single_process()
        built, counted = meta_param_count(cfg), param_counts(cfg)
        ok = built["total"] == counted["total"] and built["mtp_block"] == counted["mtp_block"]
        print(f"\nmeta-device build: {built['total']:,d} parameters (+ {built['mtp_block']:,d} MTP): "
              + ("equal to the analytic count" if ok else "DIFFERS from the analytic count"))
        return 0 if ok else 1
    return 0
