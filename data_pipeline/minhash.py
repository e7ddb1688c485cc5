"""MinHash signatures over character n-grams, LSH band keys and exact-text hashes, vectorized in numpy.

Why not `datasketch`: its MinHash hashes every shingle with SHA-1 in a Python loop and handles one
document per call, which dominates its cost (`bench/bench_curate.py` measures the two on the same
documents). Here a whole batch of documents is hashed at once:

1. each document becomes an array of Unicode code points (UTF-32), so n-grams are *character*
   n-grams as the fuzzy-dedup spec says, not byte n-grams;
2. every n-gram gets a 64-bit polynomial hash computed for all window positions at once (n shifted
   multiply-adds, wrapping mod 2^64), then the murmur3 64-bit finalizer, keeping its top 32 bits;
3. duplicate shingles inside a document are dropped (one sort per batch, keyed by document);
4. each of the P permutations is a multiply-add-shift universal hash h_k(x) = (a_k x + b_k mod 2^64)
   >> 32 (Dietzfelbinger et al. 1996) with odd 64-bit a_k: three numpy passes over a (P x shingles)
   uint64 block that stays in cache, then a segmented minimum per document (`np.minimum.reduceat`).
   The modulus 2^64 is the machine's own wraparound, so there is no `%` (numpy's uint64 modulo is
   several times slower than a multiply); taking the high 32 bits is what makes it universal.

A document shorter than n characters is one shingle: the whole text (datasketch users do the same).
Signatures are uint32 [docs, P]; two documents agree in one coordinate with probability ~ their
Jaccard similarity over shingle sets, so the fraction of equal coordinates estimates it.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so windows that differ in one char differ in hash
_S33 = np.uint64(33)
_S32 = np.uint64(32)
# Rows of the (shingles x permutations) block hashed at a time: keeps the block in L2/L3 cache.
_CHUNK = 2048


def fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer (a bijection that avalanches every input bit), in place on a copy."""
    h = h ^ (h >> _S33)
    h *= _FMIX1
    h ^= h >> _S33
    h *= _FMIX2
    h ^= h >> _S33
    return h


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of each universal hash; a is odd. Fixed by the seed so every task agrees."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2)
    return a, b


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct 32-bit hashes of each text's character n-grams, sorted and grouped by document.

    Returns (hashes uint64 with values < 2^32, doc index int64 per hash). Every document has at least
    one shingle, so every document appears.
    """
    cps = [np.frombuffer(t.encode("utf-32-le", "surrogatepass"), dtype="<u4") for t in texts]
    lens = np.array([len(c) for c in cps], dtype=np.int64)
    allcp = np.concatenate(cps).astype(np.uint64) if len(cps) else np.zeros(0, np.uint64)
    offs = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(lens, out=offs[1:])
    total = int(offs[-1])
    keys: list[np.ndarray] = []
    if total >= ngram:
        nwin = total - ngram + 1
        h = np.zeros(nwin, dtype=np.uint64)
        for j in range(ngram):  # Horner over the window, all positions at once
            h *= _POLY
            h += allcp[j:j + nwin]
        h = fmix64(h) >> _S32
        # keep windows that start and end inside one document
        starts = np.arange(nwin, dtype=np.int64)
        doc = np.repeat(np.arange(len(cps), dtype=np.int64), lens)[:nwin]
        valid = starts + ngram <= offs[doc + 1]
        keys.append((doc[valid].astype(np.uint64) << _S32) | h[valid])
    short = np.nonzero(lens < ngram)[0]
    if len(short):
        hs = np.zeros(len(short), dtype=np.uint64)
        for i, d in enumerate(short):  # whole text as the one shingle
            c = allcp[offs[d]:offs[d + 1]]
            v = np.uint64(0)
            with np.errstate(over="ignore"):
                for x in c:
                    v = v * _POLY + x
            hs[i] = v
        hs = fmix64(hs) >> _S32
        keys.append((short.astype(np.uint64) << _S32) | hs)
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    k = np.sort(np.concatenate(keys))  # np.sort + mask: numpy 2's hash-based np.unique is ~10x slower here
    k = k[np.concatenate(([True], k[1:] != k[:-1]))]
    return k & np.uint64(0xFFFFFFFF), (k >> _S32).astype(np.int64)


def signatures(texts: list[str], ngram: int = 24, num_perm: int = 260, seed: int = 42) -> np.ndarray:
    """MinHash signatures, uint32 [len(texts), num_perm]."""
    a, b = permutations(num_perm, seed)
    x, doc = shingle_hashes(texts, ngram)
    sig = np.full((len(texts), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    # (permutations x shingles) layout: the segmented min then runs along contiguous rows
    block = np.empty((num_perm, _CHUNK), dtype=np.uint64)
    a2, b2 = a[:, None], b[:, None]
    for s in range(0, len(x), _CHUNK):
        xe = x[s:s + _CHUNK]
        de = doc[s:s + _CHUNK]
        blk = block[:, :len(xe)]
        np.multiply(a2, xe[None, :], out=blk)
        blk += b2
        blk >>= _S32
        if de[0] == de[-1]:  # the common case: the whole chunk is inside one document
            d = de[0]
            np.minimum(sig[d], blk.min(axis=1), out=sig[d])
            continue
        seg = np.concatenate(([0], np.flatnonzero(de[1:] != de[:-1]) + 1))
        mins = np.minimum.reduceat(blk, seg, axis=1)
        docs = de[seg]
        sig[docs] = np.minimum(sig[docs], mins.T)
    return sig.astype(np.uint32)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band): equal keys <=> equal rows in that band (up to 2^-64).

    The band index is hashed in, so buckets of different bands never meet.
    """
    n = sig.shape[0]
    if bands * rows > sig.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds the signature length {sig.shape[1]}")
    out = np.empty((n, bands), dtype=np.uint64)
    s = sig.astype(np.uint64)
    for bi in range(bands):
        h = np.full(n, np.uint64(((bi + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
        for r in range(rows):
            h ^= s[:, bi * rows + r]
            h = fmix64(h)
        out[:, bi] = h
    return out


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """What exact dedup compares: case-folded, whitespace runs collapsed, ends stripped."""
    return _WS.sub(" ", text.casefold()).strip()


def exact_hash(text: str) -> tuple[int, int]:
    """128-bit BLAKE2b of the normalized text, as two uint64 (collisions ~2^-64 at 2^32 documents)."""
    d = hashlib.blake2b(normalize(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal signature coordinates."""
    return (sig_a == sig_b).mean(axis=-1)


def shingle_set(text: str, ngram: int) -> set[str]:
    """The exact character n-gram set (for tests and the Jaccard reference in the bench)."""
    if len(text) < ngram:
        return {text}
    return {text[i:i + ngram] for i in range(len(text) - ngram + 1)}


def jaccard(a: str, b: str, ngram: int = 24) -> float:
    sa, sb = shingle_set(a, ngram), shingle_set(b, ngram)
    return len(sa & sb) / max(1, len(sa | sb))
