"""Curation speed on real text (Python stdlib sources + planted duplicates), one core:
- filtering: documents/s through the heuristic filters;
- fuzzy dedup: documents/s for MinHash (24-char shingles, 260 permutations) + LSH (20 x 13) + connected
  components, ours (numpy, `data_pipeline.minhash` / `dedup`) against `datasketch` (MinHash.update_batch
  over the same shingle sets + MinHashLSH query/insert with params=(20, 13)) on the same documents.
Both decide duplicates the same way (LSH candidate pairs, no verification, components, earliest document
survives); the result records how many decisions agree. The figure is ours, the baseline datasketch.
"""
from __future__ import annotations

import random
import sysconfig
import time
from pathlib import Path

import numpy as np

from bench.common import write_result
from data_pipeline import minhash
from data_pipeline.dedup import DedupConfig, _star_edges, resolve
from data_pipeline.filters import FilterConfig, reject_reason

BANDS, ROWS, NGRAM = 20, 13, 24


def corpus(n_base: int = 600, max_chars: int = 8000, seed: int = 0) -> tuple[list[str], dict]:
    """Real stdlib .py files, plus exact copies, ~0.9-Jaccard edits and ~0.5 near-misses of some."""
    from tests.test_curate import edit_to_jaccard

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(stdlib.rglob("*.py")):
        if "test" in f.parts or "site-packages" in f.parts:
            continue
        try:
            t = f.read_text(encoding="utf-8")[:max_chars]
        except (UnicodeDecodeError, OSError):
            continue
        if len(t) > 2000:
            docs.append(t)
        if len(docs) >= n_base:
            break
    rng = random.Random(seed)
    picks = rng.sample(range(len(docs)), 150)
    planted = {"exact": picks[:50], "near_0.9": picks[50:100], "near_miss_0.5": picks[100:]}
    out = list(docs)
    for i in planted["exact"]:
        out.append(docs[i])
    for i in planted["near_0.9"]:
        out.append(edit_to_jaccard(docs[i], 0.9))
    for i in planted["near_miss_0.5"]:
        out.append(edit_to_jaccard(docs[i], 0.5))
    return out, planted


def ours(docs: list[str]) -> np.ndarray:
    cfg = DedupConfig(verify=False)
    sigs = []
    for s in range(0, len(docs), 256):
        sigs.append(minhash.signatures(docs[s:s + 256], NGRAM, BANDS * ROWS, cfg.seed))
    sig = np.concatenate(sigs)
    keys = minhash.band_keys(sig, BANDS, ROWS).reshape(-1)
    refs = np.repeat(np.arange(len(docs), dtype=np.int64), BANDS)
    o = np.lexsort((refs, keys))
    keys, refs = keys[o], refs[o]
    edges = _star_edges(keys[1:] != keys[:-1], refs)
    return resolve(np.zeros((0, 2), np.int64), edges, cfg, None)["fuzzy"]


def datasketch_dedup(docs: list[str]) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    edges = []
    for i, t in enumerate(docs):
        m = MinHash(num_perm=BANDS * ROWS)
        m.update_batch([s.encode("utf-8") for s in minhash.shingle_set(t, NGRAM)])
        for j in lsh.query(m):
            edges.append((j, i))
        lsh.insert(i, m)
    e = np.array(edges, dtype=np.int64).reshape(-1, 2)
    return resolve(np.zeros((0, 2), np.int64), e, DedupConfig(verify=False), None)["fuzzy"]


def main() -> None:
    docs, planted = corpus()
    n = len(docs)
    nbase = n - 150
    expect_removed = {nbase + k for k in range(100)}  # the exact copies and the 0.9 edits

    cfg = FilterConfig()
    t0 = time.perf_counter()
    for rep in range(3):
        for t in docs:
            reject_reason(t, False, cfg)
    filt_rate = 3 * n / (time.perf_counter() - t0)

    ours(docs[:50])  # warm-up (imports, first allocations)
    t0 = time.perf_counter()
    mine = ours(docs)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = datasketch_dedup(docs)
    t_ds = time.perf_counter() - t0

    a, b = set(mine.tolist()), set(theirs.tolist())
    agree = n - len(a ^ b)
    extra = {
        "documents": n, "chars": sum(map(len, docs)),
        "filter_docs_per_s_per_core": round(filt_rate, 1),
        "dedup_docs_per_s_per_core_ours": round(n / t_ours, 1),
        "dedup_docs_per_s_per_core_datasketch": round(n / t_ds, 1),
        "removed_ours": len(a), "removed_datasketch": len(b),
        "decisions_agreeing": agree, "decisions_differing": len(a ^ b),
        "planted_found_ours": len(expect_removed & a), "planted_found_datasketch": len(expect_removed & b),
        "planted_expected": len(expect_removed),
        "near_miss_0.5_removed_ours": len({nbase + 100 + k for k in range(50)} & a),
        "bands_rows": [BANDS, ROWS], "ngram": NGRAM,
    }
    write_result(
        "curate",
        figure={"what": "fuzzy dedup, ours (numpy MinHash+LSH)", "value": round(n / t_ours, 1), "unit": "docs/s/core"},
        baseline={"what": "datasketch MinHash+MinHashLSH, same docs", "value": round(n / t_ds, 1),
                  "unit": "docs/s/core"},
        ratio=t_ds / t_ours, higher_is_better=True, goal=">= 5x datasketch with the same decisions",
        extra=extra)


if __name__ == "__main__":
    main()
