"""Curation accounting: where every input document went, in documents and bytes.

A unit report (one per map unit, completed by the write stage) and the merged run report share this
shape, the run report adding `sources` (one such block per source) and `dedup` statistics:
    {"input": {"docs", "bytes"},                   every record read, bad ones included
     "bad_input": {reason: {"docs", "bytes"}},     malformed JSON, missing text, undecodable bytes...
     "filtered": {reason: {"docs", "bytes"}},      first heuristic rule failed
     "exact_duplicates": {"docs", "bytes"},
     "fuzzy_duplicates": {"docs", "bytes"},
     "kept": {"docs", "bytes"},
     "kept_by_bucket": {output source: {"docs", "bytes"}},   where the kept documents went: a bucketed
                                                          source's `<source>_<bucket>`, else the source
     "languages": {code: {"docs", "bytes"}},         detected language of every document that reached langid
     "quality_scores": {score: {"docs", "bytes"}}}   ensemble quality score of every scored document
Bytes are the raw input bytes of each record (its JSONL line, its file in a tree, its text for
parquet), so the invariant input = kept + every removal bucket holds for documents and for bytes.
"""
from __future__ import annotations

from collections.abc import Iterable

BUCKETS = ("exact_duplicates", "fuzzy_duplicates", "kept")
BREAKDOWNS = ("kept_by_bucket", "languages", "quality_scores")  # {key: counts}; kept_by_bucket sums to kept


def zero() -> dict:
    return {"docs": 0, "bytes": 0}


def empty_report() -> dict:
    return {"input": zero(), "bad_input": {}, "filtered": {}, **{b: zero() for b in BUCKETS},
            **{k: {} for k in BREAKDOWNS}}


def add(c: dict, docs: int, nbytes: int) -> None:
    c["docs"] += int(docs)
    c["bytes"] += int(nbytes)


def add_reason(d: dict, reason: str, docs: int, nbytes: int) -> None:
    add(d.setdefault(reason, zero()), docs, nbytes)


def merge_into(total: dict, r: dict) -> None:
    add(total["input"], r["input"]["docs"], r["input"]["bytes"])
    for key in ("bad_input", "filtered", *BREAKDOWNS):
        for reason, c in r.get(key, {}).items():
            add_reason(total.setdefault(key, {}), reason, c["docs"], c["bytes"])
    for b in BUCKETS:
        add(total[b], r[b]["docs"], r[b]["bytes"])


def removed(r: dict) -> dict:
    out = zero()
    for key in ("bad_input", "filtered"):
        for c in r[key].values():
            add(out, c["docs"], c["bytes"])
    add(out, r["exact_duplicates"]["docs"], r["exact_duplicates"]["bytes"])
    add(out, r["fuzzy_duplicates"]["docs"], r["fuzzy_duplicates"]["bytes"])
    return out


def check_invariant(r: dict, where: str) -> None:
    """input == kept + every removal bucket, in documents and bytes; raises naming the mismatch."""
    rem = removed(r)
    for k in ("docs", "bytes"):
        if r["input"][k] != r["kept"][k] + rem[k]:
            raise AssertionError(f"accounting mismatch in {where}: input {k} {r['input'][k]} != kept "
                                 f"{r['kept'][k]} + removed {rem[k]}")
        by_bucket = sum(c[k] for c in r.get("kept_by_bucket", {}).values())
        if "kept_by_bucket" in r and by_bucket != r["kept"][k]:
            raise AssertionError(f"accounting mismatch in {where}: kept {k} {r['kept'][k]} != the sum over "
                                 f"kept_by_bucket {by_bucket}")


def merge_reports(units: Iterable[dict]) -> dict:
    """Run report: overall totals plus one block per source, each checked against the invariant."""
    total = empty_report()
    per_source: dict[str, dict] = {}
    for r in units:
        merge_into(total, r)
        merge_into(per_source.setdefault(r["source"], empty_report()), r)
    for name, r in per_source.items():
        check_invariant(r, f"source {name!r}")
    check_invariant(total, "the run")
    total["sources"] = dict(sorted(per_source.items()))
    return total
