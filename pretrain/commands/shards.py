"""`foldtron shards`: tokenize curated JSONL (`<curated>/<source>/*.jsonl[.zst|.gz]`, records with "text") into
webdataset .tar shards with a manifest per source. One job per input file, run in parallel; idempotent (a
re-run skips inputs already sharded with the same tokenizer), so it is safe to kill and re-run."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="tokenize curated data into webdataset shards + manifests", description=__doc__)
    p.add_argument("--input", required=True, metavar="CURATED_DIR")
    p.add_argument("--output", required=True, metavar="SHARDS_DIR")
    p.add_argument("--tokenizer", required=True, metavar="tokenizer.json")
    p.add_argument("--shard-size", default="256M", help="target bytes of token payload per shard (K/M/G suffix)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one input file each)")
    p.add_argument("--sources", nargs="*", default=None, help="only these sources (default: all)")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS (Nemotron 3: no)")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS (Nemotron 3 appends it)")
    p.set_defaults(func=_run)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def _run(args: argparse.Namespace) -> int:
    import time

    from data_pipeline.shards import write_shards

    t0 = time.time()
    manifests = write_shards(args.input, args.output, args.tokenizer,
                             policy={"add_bos": args.add_bos, "add_eos": not args.no_eos},
                             shard_bytes=_size(args.shard_size), workers=args.workers, sources=args.sources,
                             progress=True)
    total = sum(m.tokens for m in manifests.values())
    for s, m in manifests.items():
        print(f"{s}: {len(m.shards)} shards, {m.documents} documents, {m.tokens} tokens")
    print(f"{total} tokens in {time.time() - t0:.1f} s -> {args.output}")
    return 0
