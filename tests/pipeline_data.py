"""Small real-text corpora for the data-pipeline tests: Python stdlib sources as curated JSONL, a byte-level
BPE trained on them, and webdataset shards, built once per test session in a temporary directory."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import zstandard

SOURCES = {"code": ("", 40), "email": ("email", 30), "json": ("json", 10)}


def write_curated(root: Path) -> Path:
    """`<root>/curated/<source>/{part0.jsonl, part1.jsonl.zst}` from stdlib modules (real, varied text)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    cur = root / "curated"
    for source, (sub, n) in SOURCES.items():
        files = sorted((lib / sub).glob("*.py"))[:n] if sub else sorted(lib.glob("*.py"))[:n]
        if source == "json":  # a short module list: pad it with asyncio to have several shards
            files += sorted((lib / "asyncio").glob("*.py"))[:15]
        recs = [json.dumps({"id": f"{source}/{f.name}", "source": source, "text": f.read_text()}) for f in files]
        d = cur / source
        d.mkdir(parents=True, exist_ok=True)
        half = len(recs) // 2
        (d / "part0.jsonl").write_text("\n".join(recs[:half]) + "\n")
        (d / "part1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            ("\n".join(recs[half:]) + "\n").encode()))
    return cur


def build(root: Path, vocab_size: int = 512, shard_bytes: int = 60_000) -> dict:
    from data_pipeline.shards import iter_documents, list_curated, write_shards
    from data_pipeline.tokenizer import TrainConfig, train_bpe

    cur = write_curated(root)
    texts = (t for files in list_curated(cur).values() for f in files for _, t in iter_documents(f))
    tok = train_bpe(texts, TrainConfig(vocab_size=vocab_size))
    tok_path = root / "tokenizer.json"
    tok.save(tok_path)
    shards = root / "shards"
    manifests = write_shards(cur, shards, tok_path, shard_bytes=shard_bytes)
    return {"curated": cur, "tokenizer": tok_path, "shards": shards, "manifests": manifests}
