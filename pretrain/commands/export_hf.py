"""`foldtron export-hf`: a Foldtron checkpoint (any parallel layout) -> Hugging Face NemotronH directory."""
from __future__ import annotations

import argparse
import json

from pretrain.commands.config import add_config_args


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(t)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a Hugging Face NemotronH checkpoint", description=__doc__)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="run directory, stage directory (with `latest`) or iteration directory")
    p.add_argument("--output", required=True, metavar="HFDIR", help="output directory (written atomically)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the run config's data.tokenizer)")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --output (only a directory that holds a Foldtron "
                        "export and nothing else; only the export's own files are deleted)")
    p.add_argument("--verify", action="store_true",
                   help="then load the export with transformers and compare logits/generation with Foldtron")
    q = p.add_argument_group(
        "NVFP4 serving export", "modelopt NVFP4 PTQ of the BF16 export, calibrated on held-out windows of a curriculum "
        "phase of the run's own shards (tokens no phase reads), with its perplexity / top-1 agreement against BF16 on "
        "other held-out windows. Runs on CPU (measured: calibration, quality check and export need no GPU; serving "
        "the NVFP4 GEMMs needs Blackwell); the run's data comes from --config RUN.yaml or the --calib-* options")
    q.add_argument("--nvfp4", metavar="HFDIR", help="also write an NVFP4-quantized export here")
    q.add_argument("--calib-phase", help="curriculum phase of the held-out windows (default: the last stage's)")
    q.add_argument("--calib-size", type=int, default=16, help="calibration windows (default 16)")
    q.add_argument("--eval-size", type=int, default=16, help="evaluation windows for the quality check (default 16)")
    q.add_argument("--calib-seq-len", type=int, default=128, help="tokens per window (default 128)")
    q.add_argument("--calib-seed", type=int, default=0, help="which held-out windows (default 0)")
    q.add_argument("--calib-shards", metavar="DIR", help="shards directory (default: the run config's data.shards_dir)")
    q.add_argument("--calib-curriculum", metavar="YAML", help="curriculum (default: the run config's)")
    q.add_argument("--calib-data-seed", type=int, help="the run's data.seed (default: the run config's)")
    q.add_argument("--max-ppl-increase", type=float, default=0.10,
                   help="fail the NVFP4 export when held-out perplexity rises more than this fraction over BF16 "
                        "(default 0.10 = 10%%)")
    q.add_argument("--min-top1-agreement", type=float, default=0.5,
                   help="fail the NVFP4 export when fewer held-out next-token predictions than this fraction agree "
                        "with BF16 (default 0.5; a clipping calibration drops it far below while perplexity barely "
                        "moves on a weak model)")
    q.add_argument("--calib-random", action="store_true",
                   help="calibrate on random tokens instead (a format check: no quality check, not for serving)")
    add_config_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pretrain.export_hf import check_output, export_hf, verify_export

    if args.nvfp4:  # both outputs are checked before the (long) first export starts
        check_output(args.nvfp4, args.overwrite)
    config = None
    if args.config or args.overrides:
        from pretrain.config import load_config

        config = load_config(args.config, args.overrides)
    kw: dict = {}
    if args.nvfp4:  # the held-out windows are read (and bad data refused) before the long BF16 export
        from pretrain.export_nvfp4 import calibration_from_run

        if not args.calib_random:
            calib, evals, meta = calibration_from_run(
                config, phase=args.calib_phase, calib_size=args.calib_size, eval_size=args.eval_size,
                seq_length=args.calib_seq_len, seed=args.calib_seed, shards=args.calib_shards,
                curriculum=args.calib_curriculum, data_seed=args.calib_data_seed)
            kw = dict(calib_tokens=calib, eval_tokens=evals, calibration_meta=meta,
                      max_ppl_increase=args.max_ppl_increase,
                      min_top1_agreement=args.min_top1_agreement)
    result = export_hf(args.checkpoint, args.output, args.dtype, config=config, tokenizer=args.tokenizer,
                       max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    print(json.dumps(result, indent=1))
    rc = 0
    if args.verify:
        v = verify_export(args.output, args.checkpoint, config=config)
        v.pop("per_layer")
        print(json.dumps(v, indent=1))
        rc = 0 if v["greedy_equal"] and v["logits_max_rel_diff"] <= v["tolerance"] else 1
    if args.nvfp4:
        from pretrain.export_nvfp4 import export_nvfp4

        print(json.dumps(export_nvfp4(args.output, args.nvfp4, overwrite=args.overwrite, **kw), indent=1))
    return rc
