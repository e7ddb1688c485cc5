"""Exact and fuzzy deduplication as a hash-partitioned reduce plus one small global step.

Map tasks (see `curate.py`) write, per unit and per reduce partition p, the records
    exact-pXXX.bin  (h0, h1, ref)   128-bit hash of the normalized text, partition = h0 % P
    lsh-pXXX.bin    (key, ref)      one per (document, band), partition = key % P
where ref = unit << 32 | row names a document by its position in input order. Reduce task p reads only
its partition's files from every unit, sorts them and turns each bucket into star edges
(bucket minimum, member): the bucket minimum is the earliest document, which is what survives.
The global step (`resolve`) reads every partition's edges (a few per duplicate, not per document):
exact components first (survivor = earliest document), then fuzzy edges between exact survivors,
optionally verified by the full signature's Jaccard estimate, then fuzzy components (survivor =
earliest document). Components are computed by vectorized union-find (hooking + pointer jumping).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

EXACT_DTYPE = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("ref", "<i8")])
LSH_DTYPE = np.dtype([("key", "<u8"), ("ref", "<i8")])


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exact: bool = True  # drop documents whose normalized text (casefold, whitespace) is identical
    fuzzy: bool = True  # MinHash LSH near-duplicate removal
    ngram: int = Field(24, ge=1)  # character n-gram (shingle) length
    bands: int = Field(20, ge=1)  # LSH bands ...
    rows: int = Field(13, ge=1)  # ... of this many rows: 260 permutations, S-curve midpoint ~0.79
    seed: int = 42  # fixes the permutations: every task of a run must use the same
    verify: bool = True  # keep a candidate pair only if its signatures agree on >= threshold
    threshold: float = Field(0.8, ge=0.0, le=1.0)  # estimated Jaccard for `verify`
    partitions: int = Field(16, ge=1)  # reduce partitions (hash ranges); reduce tasks share them out

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


def make_ref(unit: int, row: np.ndarray | int):
    return (np.int64(unit) << np.int64(32)) | np.asarray(row, dtype=np.int64)


def ref_unit(ref: np.ndarray) -> np.ndarray:
    return ref >> np.int64(32)


def ref_row(ref: np.ndarray) -> np.ndarray:
    return ref & np.int64(0xFFFFFFFF)


def partition_of(h: np.ndarray, partitions: int) -> np.ndarray:
    return (h % np.uint64(partitions)).astype(np.int64)


def _star_edges(group_key_change: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Edges (first ref of the group, other member) for records sorted by (group, ref)."""
    if len(refs) == 0:
        return np.zeros((0, 2), np.int64)
    starts = np.concatenate(([True], group_key_change))
    gid = np.cumsum(starts) - 1
    first = refs[starts][gid]
    m = refs != first
    e = np.stack([first[m], refs[m]], axis=1)
    return np.unique(e, axis=0) if len(e) else np.zeros((0, 2), np.int64)


def reduce_partition(files_exact: list[Path], files_lsh: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(exact edges, fuzzy candidate edges) of one partition, each int64 [m, 2], sorted, unique."""
    ex = np.concatenate([np.fromfile(f, dtype=EXACT_DTYPE) for f in files_exact]) if files_exact \
        else np.zeros(0, EXACT_DTYPE)
    o = np.lexsort((ex["ref"], ex["h1"], ex["h0"]))
    ex = ex[o]
    exact = _star_edges((ex["h0"][1:] != ex["h0"][:-1]) | (ex["h1"][1:] != ex["h1"][:-1]), ex["ref"])
    del ex
    ls = np.concatenate([np.fromfile(f, dtype=LSH_DTYPE) for f in files_lsh]) if files_lsh \
        else np.zeros(0, LSH_DTYPE)
    o = np.lexsort((ls["ref"], ls["key"]))
    ls = ls[o]
    fuzzy = _star_edges(ls["key"][1:] != ls["key"][:-1], ls["ref"])
    return exact, fuzzy


def components(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Root of each node 0..n-1 given undirected edges (u, v); the root is the component's minimum."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        diff = pu != pv
        if not diff.any():
            return parent
        lo, hi = np.minimum(pu[diff], pv[diff]), np.maximum(pu[diff], pv[diff])
        np.minimum.at(parent, hi, lo)  # hook roots onto smaller roots: parent[x] <= x always
        while True:  # pointer jumping until every node points at its root
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp


def _survivor_map(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, their component minimum) for the nodes touched by `edges` (refs)."""
    nodes = np.unique(edges)
    if len(nodes) == 0:
        return nodes, nodes
    idx = np.searchsorted(nodes, edges)
    root = components(idx[:, 0], idx[:, 1], len(nodes))
    return nodes, nodes[root]


class SignatureStore:
    """Row lookups in the per-unit signature files, memory-mapped (only touched pages are read)."""

    def __init__(self, path_of_unit, num_perm: int):
        self._path, self._p, self._maps = path_of_unit, num_perm, {}

    def get(self, refs: np.ndarray) -> np.ndarray:
        out = np.empty((len(refs), self._p), dtype=np.uint32)
        units = ref_unit(refs)
        for u in np.unique(units):
            m = self._maps.get(int(u))
            if m is None:
                p = self._path(int(u))
                m = np.memmap(p, dtype=np.uint32, mode="r").reshape(-1, self._p) if os.path.getsize(p) \
                    else np.zeros((0, self._p), np.uint32)
                self._maps[int(u)] = m
            sel = units == u
            out[sel] = m[ref_row(refs[sel])]
        return out


def resolve(exact_edges: np.ndarray, fuzzy_edges: np.ndarray, cfg: DedupConfig,
            sigs: SignatureStore | None) -> dict:
    """Global duplicate decision. Returns sorted ref arrays `exact` and `fuzzy` (documents to drop)
    and counts for the report."""
    nodes, surv = _survivor_map(exact_edges)
    removed_exact = np.sort(nodes[surv != nodes])
    stats = {"exact_clusters": int(len(np.unique(surv[surv != nodes]))) if len(nodes) else 0,
             "fuzzy_candidate_pairs": 0, "fuzzy_verified_pairs": 0, "fuzzy_clusters": 0}
    removed_fuzzy = np.zeros(0, np.int64)
    if len(fuzzy_edges):
        fe = fuzzy_edges
        if len(nodes):  # an exact duplicate stands for its survivor
            for c in (0, 1):
                col = fe[:, c]
                i = np.searchsorted(nodes, col)
                i[i >= len(nodes)] = 0
                hit = nodes[i] == col
                col = col.copy()
                col[hit] = surv[i[hit]]
                fe = fe.copy()
                fe[:, c] = col
        fe = fe[fe[:, 0] != fe[:, 1]]
        fe = np.unique(np.sort(fe, axis=1), axis=0) if len(fe) else np.zeros((0, 2), np.int64)
        stats["fuzzy_candidate_pairs"] = int(len(fe))
        if cfg.verify and len(fe) and sigs is not None:
            keep = np.zeros(len(fe), bool)
            for s in range(0, len(fe), 65536):
                a = sigs.get(fe[s:s + 65536, 0])
                b = sigs.get(fe[s:s + 65536, 1])
                keep[s:s + 65536] = (a == b).mean(axis=1) >= cfg.threshold
            fe = fe[keep]
        stats["fuzzy_verified_pairs"] = int(len(fe))
        fn, fs = _survivor_map(fe)
        removed_fuzzy = np.sort(fn[fs != fn])
        stats["fuzzy_clusters"] = int(len(np.unique(fs[fs != fn]))) if len(fn) else 0
    return {"exact": removed_exact, "fuzzy": removed_fuzzy, "stats": stats}
