"""Loader tokens/s: BlendedLoader (exact blend, packing, DP slice, resumable state) against a plain
`webdataset` iteration of the same shards packed into the same [micro_batch, seq+1] tensors, in the same run.
Goal: >= 0.9x. megatron-energon is measured on the same blend when it can be set up (see `extra`)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_result
from bench.corpus import write_stdlib_corpus

SEQ, MB, GBS = 2048, 4, 32


def plain_webdataset(shards: Path, manifests, max_tokens: int) -> float:
    import torch
    import webdataset as wds

    urls = [str(shards / s / e.path) for s, m in manifests.items() for e in m.shards]
    t0 = time.perf_counter()
    buf, got, rows = [], 0, []
    have = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        a = np.frombuffer(sample["tokens.u16"], dtype="<u2")
        buf.append(a)
        have += a.size
        while have >= SEQ + 1:
            flat = np.concatenate(buf)
            rows.append(flat[:SEQ + 1])
            buf, have = [flat[SEQ:]], flat.size - SEQ
            if len(rows) == MB:
                t = torch.from_numpy(np.stack(rows).astype(np.int64))
                _ = t[:, :-1], t[:, 1:]
                rows = []
                got += MB * SEQ
        if got >= max_tokens:
            break
    return got / (time.perf_counter() - t0)


def ours(shards: Path, curriculum: dict, workers: int) -> tuple[float, int]:
    from data_pipeline.loader import BlendedLoader

    ld = BlendedLoader(shards, curriculum, "p", micro_batch_size=MB, global_batch_size=GBS, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for mb in ld:
        n += mb["tokens"].numel()
    return n / (time.perf_counter() - t0), n


def main() -> None:
    from data_pipeline.shards import iter_documents, list_curated, write_shards
    from data_pipeline.tokenizer import TrainConfig, train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cur = write_stdlib_corpus(root)
        texts = [t for fs in list_curated(cur).values() for f in fs for _, t in iter_documents(f)][:1500]
        train_bpe(texts, TrainConfig(vocab_size=8192)).save(root / "tok.json")
        shards = root / "shards"
        manifests = write_shards(cur, shards, root / "tok.json", shard_bytes=4 << 20)
        total = sum(m.tokens for m in manifests.values())
        budget = int(total * 0.9) // (GBS * SEQ) * GBS * SEQ  # about one pass over the data
        weights = {s: m.tokens / total for s, m in manifests.items()}
        curriculum = {"name": "bench", "phases": [{"name": "p", "tokens": budget, "seq_length": SEQ,
                                                   "global_batch_size": GBS, "blend": weights}]}
        res = {"base": [], "w0": [], "w1": []}
        for _ in range(3):
            res["base"].append(plain_webdataset(shards, manifests, budget))
            res["w0"].append(ours(shards, curriculum, 0)[0])
            res["w1"].append(ours(shards, curriculum, 1)[0])
        fig, bl = max(res["w0"]), max(res["base"])
        extra = {"tokens_per_pass": budget, "seq_length": SEQ, "micro_batch_size": MB,
                 "blended_loader_1_worker_tokens_per_s": max(res["w1"]), "trials": res,
                 "megatron_energon": energon_note()}
        write_result("loader", figure={"what": "BlendedLoader, exact blend, 0 workers", "value": fig,
                                       "unit": "tokens/s"},
                     baseline={"what": "plain webdataset iteration + packing", "value": bl, "unit": "tokens/s"},
                     ratio=fig / bl, higher_is_better=True, goal=">= 0.9", extra=extra)


def energon_note() -> str:
    try:
        import megatron.energon  # noqa: F401
    except ImportError:
        return "not installed"
    return ("not measured: energon needs `energon prepare` (sqlite index + dataset.yaml per source) and a "
            "TaskEncoder with cookers for raw token samples; its BlendDataset samples sources at random per "
            "rank and worker (no exact per-batch blend) and its saved state is a list per rank and worker that "
            "must match world size and num_workers on restore (savable_loader.py), so it cannot meet the "
            "exact-blend and DP-resize goals")


if __name__ == "__main__":
    main()
