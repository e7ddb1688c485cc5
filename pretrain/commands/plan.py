"""`foldtron plan`: how to lay out a model on N GPUs. Enumerates the folded layouts (TP x CP x PP x DP for the
dense part, ETP x EP x EDP for the experts), drops the invalid ones and those that do not fit in HBM even with
recomputation, and ranks the rest by predicted tokens/s per GPU, with the memory breakdown and MFU."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="rank parallel layouts for a model on N GPUs", description=__doc__)
    p.add_argument("--preset", required=True, help="model preset (super-120b-a12b, nano-30b-a3b, ...)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    p.add_argument("--gpu", default="gb200", help="GPU kind: h100, h200, b200, gb200 (specs: parallel/gpus.py)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--global-batch", type=int, required=True, help="global batch in sequences")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[1], help="micro-batch sizes to try")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp8", "mxfp8", "nvfp4"],
                   help="GEMM recipe; auto: NVFP4 with the published BF16/MXFP8 carve-outs where the GPU has FP4, "
                        "else MXFP8 (FP8) where it has FP8")
    p.add_argument("--bf16-last-layers", type=int, default=None,
                   help="last N layers kept in BF16 under a low-precision recipe (default: 15%% of the layers)")
    p.add_argument("--efficiency", nargs="*", default=[], metavar="FMT=FRACTION",
                   help="achieved fraction of peak per format, e.g. bf16=0.55 mxfp8=0.45 nvfp4=0.35 comm=0.7")
    p.add_argument("--reserved-gib", type=float, default=6.0, help="per-GPU memory outside the model "
                   "(CUDA context, NCCL buffers, fragmentation)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", action="store_true", help="print JSON (all feasible plans) instead of a table")
    p.set_defaults(func=_run)


def _precision(recipe: str, gpu, num_layers: int, last_bf16):
    from model.precision import PrecisionConfig

    if recipe == "auto":
        formats = gpu.formats()  # Hopper: bf16, fp8; Blackwell: + mxfp8, nvfp4
        recipe = "nvfp4" if "nvfp4" in formats else ("fp8" if "fp8" in formats else "bf16")
    gpu.peak_tflops(recipe)  # a clear error when the GPU lacks the format
    if recipe == "bf16":
        return PrecisionConfig(recipe="bf16")
    end = round(0.15 * num_layers) if last_bf16 is None else last_bf16
    # Super's MXFP8 Mamba out_proj is a Blackwell format: on Hopper it runs in the recipe's FP8.
    out_proj = "mxfp8" if "mxfp8" in gpu.formats() else recipe
    return PrecisionConfig(recipe=recipe, first_last_layers_bf16=end > 0, num_layers_at_end_in_bf16=end,
                           mamba_out_proj=out_proj)


def _speed(pairs: list[str]):
    from parallel.steptime import SpeedOptions

    fields = {"bf16": "efficiency_bf16", "fp8": "efficiency_fp8", "mxfp8": "efficiency_mxfp8", "nvfp4": "efficiency_nvfp4",
              "comm": "comm_efficiency"}
    kw = {}
    for item in pairs:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise SystemExit(f"--efficiency {item!r}: expected FMT=FRACTION with FMT in {', '.join(fields)}")
        kw[fields[key]] = float(value)
    return SpeedOptions(**kw)


def _run(args: argparse.Namespace) -> int:
    from model.presets import get_preset
    from parallel.gpus import get_gpu
    from parallel.planner import format_table, plan

    try:
        cfg = get_preset(args.preset)
        gpu = get_gpu(args.gpu)
        prec = _precision(args.precision, gpu, cfg.num_layers, args.bf16_last_layers)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    if args.gpus < 1 or args.global_batch < 1 or args.seq_len < 1:
        print("error: --gpus, --global-batch and --seq-len must be positive")
        return 2
    plans, discarded = plan(cfg, args.gpus, gpu, args.seq_len, args.global_batch, args.micro_batch, prec,
                            _speed(args.efficiency), args.reserved_gib)
    if args.json:
        print(json.dumps({"preset": args.preset, "gpus": args.gpus, "gpu": gpu.model_dump(), "seq_len": args.seq_len,
                          "global_batch": args.global_batch, "precision": prec.recipe, "discarded": discarded,
                          "plans": [p.row() for p in plans]}, indent=1))
        return 0 if plans else 1
    print(f"{args.preset} on {args.gpus} x {gpu.name} ({gpu.hbm_gb:.0f} GB), seq {args.seq_len}, global batch "
          f"{args.global_batch}, {prec.recipe}: {len(plans)} feasible layouts ({discarded['invalid']} invalid, "
          f"{discarded['out_of_memory']} out of memory)")
    if not plans:
        print("no layout fits; try more GPUs, a smaller micro-batch or sequence, or a GPU with more memory")
        return 1
    print(format_table(plans, args.top))
    print("memory: per GPU, fullest pipeline stage; MFU: model training FLOPs / dense BF16 peak")
    print("run #1 with: foldtron train --config ... " + " ".join(plans[0].overrides()))
    return 0
