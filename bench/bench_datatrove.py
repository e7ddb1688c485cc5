"""Foldtron curation against datatrove (HuggingFace's curation library), same run, same documents, one core each.

Corpus: real prose (the Python reference topics, every stdlib module's docstrings and the machine's man pages in
sections 5 and 7, as the quickstart renders them: `data_pipeline.corpus`), the documents of >= 2000 characters
(cut at 10,000), plus planted copies of some of them: exact copies, ~0.9 (24-char-shingle
Jaccard) edits and ~0.5 near-misses.

- fuzzy dedup, end to end from JSONL on disk to deduplicated output on disk:
  Foldtron `run_curation` (filters off, exact dedup off, MinHash 20 x 13 on 24-char shingles, verified) with
  one task / one process against datatrove's MinHash pipeline (MinhashDedupSignature -> Buckets -> Cluster ->
  Filter, JsonlReader / JsonlWriter, LocalPipelineExecutor tasks=1 workers=1) with its defaults (5-word
  shingles, 14 x 8) and again at 20 x 13. Decisions: planted duplicates removed, near-misses kept.
- heuristic filters, in memory: Foldtron's prose rules (`reject_reason`) against datatrove's
  GopherRepetitionFilter + GopherQualityFilter + C4QualityFilter (spaCy's English word tokenizer, as datatrove
  loads it), documents/s over the same texts.
- the curation stages with langid and two quality classifiers: map / reduce / write documents/s and each
  stage's peak RSS (a fresh process per stage, one task each), for the closing figures.
The figure is Foldtron's dedup documents/s; the baseline datatrove's (defaults).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result

ROOT = Path(__file__).resolve().parents[1]


def prose_corpus(root: Path, seed: int = 0) -> tuple[list[dict], dict]:
    from data_pipeline.corpus import MAN_SECTIONS, write_manpages, write_python_docs
    from tests.test_curate import edit_to_jaccard

    src = root / "python_docs.jsonl"
    write_python_docs(src)
    base = [json.loads(line)["text"] for line in src.open()]
    man_dirs = [Path("/usr/share/man") / s for s in MAN_SECTIONS if (Path("/usr/share/man") / s).is_dir()]
    if man_dirs and write_manpages(man_dirs, root / "manpages.jsonl"):
        base += [json.loads(line)["text"] for line in (root / "manpages.jsonl").open()]
    base = [t[:10000] for t in base if len(t) >= 2000]
    rng = random.Random(seed)
    picks = rng.sample(range(len(base)), 90)
    planted = {"exact": picks[:30], "near_0.9": picks[30:60], "near_miss_0.5": picks[60:]}
    texts = list(base)
    kinds = ["base"] * len(base)
    for kind, idx in planted.items():
        for i in idx:
            texts.append(base[i] if kind == "exact" else edit_to_jaccard(base[i], 0.9 if kind == "near_0.9" else 0.5))
            kinds.append(kind)
    docs = [{"id": f"d{i:05d}", "doc": f"d{i:05d}", "text": t, "kind": k} for i, (t, k) in enumerate(zip(texts, kinds))]
    return docs, planted


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def no_filters() -> dict:
    from data_pipeline.filters import ProseFilters

    prose = {k: None for k in ProseFilters.model_fields}
    prose.update(max_top_ngram={}, max_dup_ngram={})
    return {"prose": prose}


def decisions(kept_ids: set[str], docs: list[dict]) -> dict:
    out = {}
    for kind in ("exact", "near_0.9", "near_miss_0.5"):
        ids = [d["id"] for d in docs if d["kind"] == kind]
        out[f"{kind}_removed"] = sum(i not in kept_ids for i in ids)
        out[f"{kind}_planted"] = len(ids)
    out["base_removed"] = sum(d["id"] not in kept_ids for d in docs if d["kind"] == "base")
    out["planted_found"] = out["exact_removed"] + out["near_0.9_removed"]
    return out


def foldtron_dedup(inp: Path, work: Path) -> tuple[float, set[str]]:
    from data_pipeline.curate import CurateConfig, run_curation
    from data_pipeline.sources import iter_curated

    work.mkdir(parents=True, exist_ok=True)
    (work / "s.yaml").write_text(json.dumps([{"name": "p", "kind": "jsonl", "paths": [str(inp)],
                                             "keep_fields": ["doc"]}]))
    cfg = CurateConfig.model_validate({"filters": no_filters(), "dedup": {"exact": False}})
    t0 = time.perf_counter()
    run_curation(work / "s.yaml", work / "out", cfg, cpus=1, progress=False)
    dt = time.perf_counter() - t0
    return dt, {d["doc"] for d in iter_curated(work / "out")}


def datatrove_dedup(inp: Path, work: Path, buckets: int, per_bucket: int, ngrams: int) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    cfg = MinhashConfig(n_grams=ngrams, num_buckets=buckets, hashes_per_bucket=per_bucket)
    reader = lambda: JsonlReader(str(inp.parent), glob_pattern=inp.name)
    stages = [
        [reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg)],
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg)],
        [reader(), MinhashDedupFilter(input_folder=str(work / "remove")),
         JsonlWriter(str(work / "out"), compression=None)],
    ]
    t0 = time.perf_counter()
    for i, pipe in enumerate(stages):
        tasks = buckets if i == 1 else 1  # the buckets stage needs one task per band; they run one at a time
        LocalPipelineExecutor(pipe, tasks=tasks, workers=1, logging_dir=str(work / f"logs{i}")).run()
    dt = time.perf_counter() - t0
    kept = set()
    for f in (work / "out").rglob("*.jsonl"):
        kept |= {json.loads(line)["id"] for line in f.open()}
    return dt, kept


def filter_rates(texts: list[str]) -> dict:
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from data_pipeline.filters import FilterConfig, reject_reason

    dt_filters = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False)]
    def theirs() -> int:
        kept = 0
        # fresh Documents each pass: C4QualityFilter rewrites doc.text (drops lines) as it filters
        for d in [Document(text=t, id=str(i)) for i, t in enumerate(texts)]:
            ok = True
            for f in dt_filters:
                r = f.filter(d)
                if not (r is True or (isinstance(r, tuple) and r[0])):
                    ok = False
                    break
            kept += ok
        return kept

    cfg = FilterConfig()

    def ours() -> int:
        return sum(reject_reason(t, False, cfg) is None for t in texts)

    for f in dt_filters:  # warm-up: spaCy's tokenizer loads on first use
        f.filter(Document(text=texts[0], id="warm"))
    times: dict[str, list[float]] = {"ours": [], "datatrove": []}
    kept = {}
    for _ in range(2):  # interleaved, best of two
        for name, fn in (("ours", ours), ("datatrove", theirs)):
            t0 = time.perf_counter()
            kept[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"docs_per_s": round(len(texts) / min(t), 1), "kept": kept[name]} for name, t in times.items()}


STAGE_SCRIPT = r"""
import json, sys, time
from data_pipeline.curate import load_config, run_curation
t0 = time.perf_counter()
r = run_curation(sys.argv[1], sys.argv[2], load_config(sys.argv[3]), stage=sys.argv[4], cpus=1, progress=False)
# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork + exec into ru_maxrss
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": round(int(hwm) / 1024, 1)}))
"""


def stage_profile(inp: Path, work: Path, docs: list[dict]) -> dict:
    """map / reduce / write with langid + two classifiers, each stage in a fresh process (one task)."""
    from data_pipeline.quality import TrainConfig, train_classifier
    from tests.test_quality import shuffle_words

    texts = [d["text"] for d in docs if d["kind"] == "base"]
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "pos.jsonl", [{"text": t} for t in texts])
    write_jsonl(work / "neg.jsonl", [{"text": shuffle_words(t, i)} for i, t in enumerate(texts)])
    write_jsonl(work / "neg2.jsonl", [{"text": " ".join(t.split()[::2])} for t in texts])
    t0 = time.perf_counter()
    m1 = train_classifier([work / "pos.jsonl"], [work / "neg.jsonl"], work / "order.bin", TrainConfig())
    m2 = train_classifier([work / "pos.jsonl"], [work / "neg2.jsonl"], work / "gaps.bin", TrainConfig())
    train_s = time.perf_counter() - t0
    cfg = {"langid": {"enabled": True},
           "quality": {"classifiers": [{"name": "order", "path": "order.bin"}, {"name": "gaps", "path": "gaps.bin"}],
                       "combine": "mean", "buckets": [{"name": "hq", "min_score": 12}, {"name": "lq", "min_score": 0}]}}
    (work / "c.yaml").write_text(json.dumps(cfg))
    (work / "s.yaml").write_text(json.dumps([{"name": "p", "kind": "jsonl", "paths": [str(inp)]}]))
    out = {}
    for stage in ("map", "reduce", "write"):
        r = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(work / "s.yaml"), str(work / "out"),
                            str(work / "c.yaml"), stage], cwd=ROOT, capture_output=True, text=True, check=True)
        out[stage] = json.loads(r.stdout.strip().splitlines()[-1])
    rep = json.loads((work / "out" / "reports" / "run.json").read_text())
    n = rep["input"]["docs"]
    for stage in ("map", "write"):
        out[stage]["docs_per_s"] = round(n / out[stage]["seconds"], 1)
    out["classifier_train_seconds"] = round(train_s, 2)
    out["held_out"] = {"order": [m1["precision"], m1["recall"]], "gaps": [m2["precision"], m2["recall"]]}
    out["kept_by_bucket"] = {k: v["docs"] for k, v in rep["kept_by_bucket"].items()}
    out["filtered"] = {k: v["docs"] for k, v in rep["filtered"].items()}
    return out


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs, _ = prose_corpus(root)
        inp = root / "in" / "docs.jsonl"
        write_jsonl(inp, docs)
        n = len(docs)
        warm = root / "warm" / "docs.jsonl"  # imports, spaCy's tokenizer, executor start-up: not timed
        write_jsonl(warm, docs[:30])
        foldtron_dedup(warm, root / "warm_ours")
        datatrove_dedup(warm, root / "warm_dt", 14, 8, 5)
        # interleaved trials, best of two each: other jobs on a shared machine hit both sides alike
        t_ours = t_dt = float("inf")
        for trial in range(2):
            t, kept_ours = foldtron_dedup(inp, root / f"ours{trial}")
            t_ours = min(t_ours, t)
            t, kept_dt = datatrove_dedup(inp, root / f"dt{trial}", 14, 8, 5)
            t_dt = min(t_dt, t)
        t_dt2, kept_dt2 = datatrove_dedup(inp, root / "dt2", 20, 13, 5)
        filters = filter_rates([d["text"] for d in docs])
        stages = stage_profile(inp, root / "stages", docs)
    extra = {
        "documents": n, "chars": sum(len(d["text"]) for d in docs),
        "dedup_docs_per_s_ours": round(n / t_ours, 1),
        "dedup_docs_per_s_datatrove_14x8": round(n / t_dt, 1),
        "dedup_docs_per_s_datatrove_20x13": round(n / t_dt2, 1),
        "ratio_vs_datatrove_20x13": round(t_dt2 / t_ours, 3),
        "decisions_ours": decisions(kept_ours, docs),
        "decisions_datatrove_14x8": decisions(kept_dt, docs),
        "decisions_datatrove_20x13": decisions(kept_dt2, docs),
        "filters": filters,
        "filters_ratio": round(filters["ours"]["docs_per_s"] / filters["datatrove"]["docs_per_s"], 3),
        "stages_langid_2_classifiers": stages,
    }
    write_result(
        "datatrove",
        figure={"what": "fuzzy dedup end to end, Foldtron curate (20x13 MinHash, 1 task)", "value": round(n / t_ours, 1),
                "unit": "docs/s/core"},
        baseline={"what": "datatrove MinHash pipeline (defaults 14x8, 1 task, same JSONL)", "value": round(n / t_dt, 1),
                  "unit": "docs/s/core"},
        ratio=t_dt / t_ours, higher_is_better=True,
        goal=">= 3x datatrove dedup with equal or better planted recall; filters >= 2x", extra=extra)


if __name__ == "__main__":
    main()
