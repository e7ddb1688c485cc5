"""`foldtron curate`: filter and deduplicate raw text into curated shards, with full accounting.

One machine: `foldtron curate --sources S.yaml --output OUT --cpus 8`.
Slurm, no other service: three job arrays chained with --dependency=afterok, e.g.
    sbatch --array=0-63 --wrap "foldtron curate --sources S.yaml --output OUT --stage map"
    sbatch --array=0-15 --dependency=afterok:<map> --wrap "... --stage reduce"
    sbatch --array=0-63 --dependency=afterok:<reduce> --wrap "... --stage write"
Each task reads its index from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (or --task-index /
--num-tasks); a rerun skips finished tasks. Output: OUT/curated/<source>/part-XXXXX.jsonl.zst and
OUT/reports/run.json (see data_pipeline/sources.py for the format).
"""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="filter + deduplicate sources into curated shards",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", required=True, metavar="YAML", help="sources list (name, kind, paths, ...)")
    p.add_argument("--output", required=True, metavar="DIR", help="run folder: curated/, reports/, _work/")
    p.add_argument("--config", metavar="YAML", help="filters/dedup config (examples/configs/curate.yaml); "
                   "defaults: the NeMo Curator English set, 20x13 MinHash LSH on 24-char shingles")
    p.add_argument("--cpus", type=int, default=1, help="worker processes for local runs (default 1)")
    p.add_argument("--stage", choices=["map", "reduce", "write", "all"], default="all",
                   help="which stage to run (default all: the three in order, on this machine)")
    p.add_argument("--task-index", type=int, help="this task's index (default SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, help="number of tasks (default SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--on-bad-input", choices=["skip", "fail"],
                   help="malformed / undecodable records: count and skip, or stop (default: config, fail)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars even on a terminal")
    p.set_defaults(func=_curate)


def _curate(args: argparse.Namespace) -> int:
    import sys

    from data_pipeline.curate import CurationError, run_curation
    from data_pipeline.sources import SourceError

    try:
        report = run_curation(args.sources, args.output, args.config, cpus=args.cpus, stage=args.stage,
                              task_index=args.task_index, num_tasks=args.num_tasks,
                              on_bad_input=args.on_bad_input, progress=False if args.no_progress else None)
    except (CurationError, SourceError) as e:
        print(f"foldtron curate: {e}", file=sys.stderr)
        return 2
    if report.get("complete") is False:
        print(json.dumps(report))
        return 0
    summary = {k: report[k] for k in ("input", "kept", "exact_duplicates", "fuzzy_duplicates")}
    summary["filtered_docs"] = sum(c["docs"] for c in report["filtered"].values())
    summary["bad_input_docs"] = sum(c["docs"] for c in report["bad_input"].values())
    summary["report"] = f"{args.output}/reports/run.json"
    print(json.dumps(summary, indent=1))
    return 0
