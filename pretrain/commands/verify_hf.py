"""`foldtron verify-hf`: load an HF export with transformers, run one token batch through it and through Foldtron
(weights from the checkpoint), report max |Δ| per layer kind and of the logits, and compare greedy generation.
Exit code 1 when the logits differ by more than --tol (relative) or the generated tokens differ.
A bf16 export is compared with Foldtron's weights rounded to bf16 the way the export rounded them, so bf16 rounding
alone never fails it; the default --tol follows the export's dtype (foldtron_export.json, else config.json):
1e-4 for fp32, 1e-3 for bf16. Runs on CPU (fp32 forwards on both sides)."""
from __future__ import annotations

import argparse
import json

from pretrain.commands.config import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify-hf", help="check an HF export against Foldtron", description=__doc__)
    p.add_argument("hf_dir", metavar="HFDIR")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--tol", type=float, default=None,
                   help="max relative |Δlogits| (default: by the export's dtype, 1e-4 fp32 / 1e-3 bf16)")
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=8)
    add_config_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pretrain.export_hf import verify_export

    config = None
    if args.config or args.overrides:
        from pretrain.config import load_config

        config = load_config(args.config, args.overrides)
    v = verify_export(args.hf_dir, args.checkpoint, config=config, seq_len=args.seq_len, new_tokens=args.new_tokens)
    v.pop("per_layer")
    print(json.dumps(v, indent=1))
    tol = v["tolerance"] if args.tol is None else args.tol
    return 0 if v["greedy_equal"] and v["logits_max_rel_diff"] <= tol else 1
