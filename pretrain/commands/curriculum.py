"""`foldtron curriculum show CURRICULUM.yaml --manifests SHARDS_DIR [--plot FILE.png]`: the exact plan a curriculum
implies, per phase and source: tokens, share, and epochs (passes over that source's shards by the end of the
phase). Unknown sources or a sum of zero weights are errors; repeating beyond `max_epochs` is refused."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curriculum", help="inspect a curriculum plan", description=__doc__)
    csub = p.add_subparsers(dest="curriculum_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print tokens, share and epochs per phase and source")
    show.add_argument("curriculum", metavar="CURRICULUM.yaml")
    show.add_argument("--manifests", metavar="SHARDS_DIR", default=None,
                      help="shards written by `foldtron shards` (needed for epochs and source checks)")
    show.add_argument("--global-batch-size", type=int, default=None,
                      help="for phases whose YAML does not set global_batch_size")
    show.add_argument("--plot", metavar="FILE.png", default=None, help="draw the token schedule per source")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    import sys

    from data_pipeline.curriculum import CurriculumError, format_plan, load_curriculum, plan, plot_plan
    from data_pipeline.manifest import ShardError, load_manifests

    try:
        cur = load_curriculum(args.curriculum)
        manifests = load_manifests(args.manifests) if args.manifests else None
        plans = plan(cur, manifests, args.global_batch_size)
    except (CurriculumError, ShardError) as e:
        print(f"foldtron curriculum: {e}", file=sys.stderr)
        return 2
    print(f"curriculum {cur.name}: {sum(p.tokens for p in plans) / 1e9:.3f}B tokens in {len(plans)} phases")
    print(format_plan(plans))
    if args.plot:
        print(f"plot: {plot_plan(plans, args.plot, title=f'{cur.name}: token schedule per source')}")
    return 0
