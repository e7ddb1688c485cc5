"""Shard writing tokens/s (read curated JSONL -> encode -> webdataset tar + sha256 + manifest) against plain
`tokenizers` batch encoding of the same texts already in memory. Goal: >= 0.8x."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import write_result
from bench.corpus import write_stdlib_corpus


def main() -> None:
    from data_pipeline.shards import iter_documents, list_curated, write_shards
    from data_pipeline.tokenizer import Tokenizer, TrainConfig, train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cur = write_stdlib_corpus(root)
        texts = [t for fs in list_curated(cur).values() for f in fs for _, t in iter_documents(f)]
        tok = train_bpe(texts[:2000], TrainConfig(vocab_size=8192))
        tok.save(root / "tok.json")
        tok = Tokenizer.from_file(root / "tok.json")
        base, ours = [], []
        for trial in range(3):
            t0 = time.perf_counter()
            n = 0
            for i in range(0, len(texts), 512):
                n += sum(len(e.ids) for e in tok.hf.encode_batch(texts[i:i + 512], add_special_tokens=True))
            base.append(n / (time.perf_counter() - t0))
            out = root / f"shards{trial}"
            t0 = time.perf_counter()
            manifests = write_shards(cur, out, root / "tok.json", shard_bytes=16 << 20)
            tokens = sum(m.tokens for m in manifests.values())
            ours.append(tokens / (time.perf_counter() - t0))
        assert tokens == n, (tokens, n)
        fig, bl = max(ours), max(base)
        write_result("shards", figure={"what": "foldtron shards write", "value": fig, "unit": "tokens/s"},
                     baseline={"what": "tokenizers encode_batch, texts in memory", "value": bl, "unit": "tokens/s"},
                     ratio=fig / bl, higher_is_better=True, goal=">= 0.8",
                     extra={"tokens": tokens, "documents": len(texts), "vocab": tok.vocab_size,
                            "trials_ours": ours, "trials_baseline": base})


if __name__ == "__main__":
    main()
