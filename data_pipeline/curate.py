"""Curation job: sources -> heuristic filters -> exact + fuzzy dedup -> curated shards + accounting.

Three stages, each a set of independent tasks (so each can be one Slurm job array, with
`--dependency=afterok` between them; no other service):
    map     one task per input unit (a group of files of one source): read, filter, stage the
            survivors, compute exact hashes and MinHash signatures, and write the dedup keys split
            into `dedup.partitions` hash partitions.
    reduce  one task per partition: bucket that partition's keys from every unit into candidate
            edges. The first write task then resolves all edges into the set of duplicates (cheap:
            it reads edges, not documents) and saves it atomically; any other task that gets there
            computes the same bytes.
    write   one task per unit: drop the duplicates, score the survivors of a bucketed source with the
            quality classifiers (`quality.py`), write OUTPUT/curated/<source>/part-XXXXX.jsonl.zst (a
            bucketed source: OUTPUT/curated/<source>_<bucket>/part-XXXXX.jsonl.zst, per non-empty
            bucket) and the unit's report; the task that completes the set merges
            OUTPUT/reports/run.json and writes OUTPUT/curated/<output source>/manifest.json.
Language identification (`langid.py`), when enabled, runs in map before the heuristic filters (which are
English rules): a document in a language not kept is counted under `language`.
`all` runs the three in order on this machine, each stage's tasks in a process pool (`cpus`).
Task i of n owns items i, i+n, i+2n... of each stage. Every task writes to temporary names, renames,
then leaves a done marker under OUTPUT/_work/; a rerun skips marked tasks, so a killed job resumes
and finishes with the same bytes as an uninterrupted one. OUTPUT/_work/plan.json pins the inputs and
config: rerunning into the same OUTPUT with different ones is an error rather than a silent mix.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_pipeline import accounting as acc
from data_pipeline import langid, minhash, quality
from data_pipeline.dedup import (
    EXACT_DTYPE,
    LSH_DTYPE,
    DedupConfig,
    SignatureStore,
    make_ref,
    partition_of,
    reduce_partition,
    resolve,
)
from data_pipeline.filters import FilterConfig, reject_reason
from data_pipeline.langid import LangIdConfig
from data_pipeline.quality import QualityConfig
from data_pipeline.sources import BadInput, SourceSpec, Unit, load_sources, plan_units, read_file
from data_pipeline.tasks import (
    atomic_path,
    is_done,
    mark_done,
    read_json,
    task_from_env,
    task_slice,
    write_json,
)

log = logging.getLogger("foldtron.curate")
Stage = Literal["map", "reduce", "write", "all"]


class CurateConfig(BaseModel):
    """The filter/dedup YAML (examples/configs/curate.yaml); every field has a default."""
    model_config = ConfigDict(extra="forbid")
    filters: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)  # language identification (off by default)
    quality: QualityConfig = Field(default_factory=QualityConfig)  # classifiers + buckets (off by default)
    unit_bytes: int = Field(64 * 2**20, ge=1)  # input bytes per map unit (a bigger file is one unit)
    batch_docs: int = Field(256, ge=1)  # documents per MinHash batch: bounds a task's memory
    on_bad_input: Literal["skip", "fail"] = "fail"  # a source's own setting wins; --on-bad-input beats this
    bad_input_examples: int = Field(20, ge=0)  # per unit, kept in its report with file and line


class CurationError(RuntimeError):
    """A run that cannot go on: bad input under policy `fail`, missing stage, changed inputs."""


def load_config(path: str | os.PathLike | None) -> CurateConfig:
    if path is None:
        return CurateConfig()
    p = Path(path)
    if not p.is_file():
        raise CurationError(f"curation config not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    try:
        cfg = CurateConfig.model_validate(raw)
    except ValidationError as e:
        raise CurationError(f"{p}: {e}") from None
    for c in cfg.quality.classifiers:  # model paths are relative to the config's folder, like sources'
        if not Path(c.path).is_absolute():
            c.path = str(p.parent / c.path)
    return cfg


@dataclass
class Run:
    """Everything a task needs; picklable, sent to pool workers."""
    out: Path
    cfg: CurateConfig
    specs: dict[str, SourceSpec]
    units: list[Unit]
    on_bad_input: str

    @property
    def work(self) -> Path:
        return self.out / "_work"

    def unit_dir(self, u: int) -> Path:
        return self.work / "map" / f"u{u:05d}"

    def map_done(self, u: int) -> Path:
        return self.work / "map" / f"u{u:05d}.done"

    def reduce_done(self, p: int) -> Path:
        return self.work / "reduce" / f"p{p:04d}.done"

    def write_done(self, u: int) -> Path:
        return self.work / "write" / f"u{u:05d}.done"

    @property
    def dedup_dir(self) -> Path:
        return self.work / "dedup"

    def part_path(self, unit: Unit) -> Path:
        return self.out / "curated" / unit.source / f"part-{unit.part:05d}.jsonl.zst"

    def unit_report_path(self, u: int) -> Path:
        return self.out / "reports" / "tasks" / f"u{u:05d}.json"


def plan_run(sources: str | os.PathLike, output: str | os.PathLike, cfg: CurateConfig,
             on_bad_input: str | None) -> Run:
    specs = load_sources(sources)
    units = plan_units(specs, cfg.unit_bytes)
    out = Path(output)
    run = Run(out, cfg, {s.name: s for s in specs}, units, on_bad_input or cfg.on_bad_input)
    try:  # models load here, before any task: a bad one is named now, not in task 37 of 64
        langid.check(cfg.langid)
        model_sha = quality.check_classifiers(cfg.quality)
    except (langid.LangIdError, quality.QualityError) as e:
        raise CurationError(str(e)) from None
    _check_outputs(run)
    plan = {
        "config": cfg.model_dump(mode="json"),
        "sources": [s.model_dump(mode="json") for s in specs],
        "units": [{"source": u.source, "part": u.part, "files": [[f.rel, f.size] for f in u.files]}
                  for u in units],
    }
    if model_sha:
        plan["classifiers"] = model_sha
    fp = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    plan_path = run.work / "plan.json"
    if plan_path.exists():
        old = read_json(plan_path)
        if old.get("fingerprint") != fp:
            raise CurationError(
                f"{out} holds a run with different inputs or config (plan {old.get('fingerprint', '?')[:12]} "
                f"!= {fp[:12]}); use a new --output, or delete {out} to start over")
    else:
        write_json(plan_path, {"fingerprint": fp, **plan})
    return run


def output_sources(run: Run, source: str) -> list[str]:
    """The curated output sources of `source`: `<source>_<bucket>` per bucket when it is bucketed, else itself."""
    q = run.cfg.quality
    if q.bucketed(source, bool(run.specs[source].code)):
        return [f"{source}_{b.name}" for b in q.buckets]
    return [source]


def _check_outputs(run: Run) -> None:
    q = run.cfg.quality
    if q.sources is not None:
        unknown = sorted(set(q.sources) - set(run.specs))
        if unknown:
            raise CurationError(f"quality.sources names {unknown}, which the sources YAML does not define "
                                f"(it has {sorted(run.specs)})")
    seen: dict[str, str] = {}
    for name in run.specs:
        for o in output_sources(run, name):
            if o in seen or (o != name and o in run.specs):
                raise CurationError(f"curated output source {o!r} (from {name!r}) clashes with "
                                    f"{'source ' + repr(o) if o in run.specs else repr(seen[o])}: rename a source "
                                    f"or a quality bucket")
            seen[o] = name


# --- map ---------------------------------------------------------------------------------------------


def map_unit(run: Run, unit: Unit) -> None:
    if is_done(run.map_done(unit.index)):
        return
    cfg, dcfg = run.cfg, run.cfg.dedup
    spec = run.specs[unit.source]
    policy = spec.on_bad_input or run.on_bad_input
    final = run.unit_dir(unit.index)
    if final.exists():  # killed between rename and marker: redo
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-u{unit.index:05d}-", dir=final.parent))
    rep = acc.empty_report()
    rep.update(source=unit.source, unit=unit.index, part=unit.part, files=len(unit.files), bad_input_examples=[])
    P = dcfg.partitions
    fh = {}
    try:
        fh["docs"] = open(tmp / "docs.jsonl", "wb")
        fh["sig"] = open(tmp / "sig.u32", "wb")
        fh["sizes"] = open(tmp / "sizes.i64", "wb")
        for p in range(P):
            fh[f"e{p}"] = open(tmp / f"exact-p{p:04d}.bin", "wb")
            fh[f"l{p}"] = open(tmp / f"lsh-p{p:04d}.bin", "wb")
        row = 0
        batch: list[tuple[dict, int]] = []

        def flush() -> None:
            nonlocal row
            if not batch:
                return
            texts = [r["text"] for r, _ in batch]
            for r, _ in batch:
                fh["docs"].write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            np.array([n for _, n in batch], dtype="<i8").tofile(fh["sizes"])
            refs = make_ref(unit.index, np.arange(row, row + len(batch)))
            if dcfg.exact:
                ex = np.zeros(len(batch), EXACT_DTYPE)
                hs = [minhash.exact_hash(t) for t in texts]
                ex["h0"] = [h[0] for h in hs]
                ex["h1"] = [h[1] for h in hs]
                ex["ref"] = refs
                part = partition_of(ex["h0"], P)
                for p in np.unique(part):
                    ex[part == p].tofile(fh[f"e{p}"])
            if dcfg.fuzzy:
                sig = minhash.signatures(texts, dcfg.ngram, dcfg.num_perm, dcfg.seed)
                sig.astype("<u4").tofile(fh["sig"])
                keys = minhash.band_keys(sig, dcfg.bands, dcfg.rows)
                ls = np.zeros(keys.size, LSH_DTYPE)
                ls["key"] = keys.reshape(-1)
                ls["ref"] = np.repeat(refs, dcfg.bands)
                part = partition_of(ls["key"], P)
                for p in np.unique(part):
                    ls[part == p].tofile(fh[f"l{p}"])
            row += len(batch)
            batch.clear()

        for f in unit.files:
            for rec, nbytes in read_file(spec, f):
                acc.add(rep["input"], 1, nbytes)
                if isinstance(rec, BadInput):
                    if policy == "fail":
                        raise CurationError(
                            f"bad input in source {spec.name!r}: {rec} -- fix the input, or pass "
                            f"--on-bad-input skip to count and skip such records")
                    acc.add_reason(rep["bad_input"], rec.reason, 1, nbytes)
                    log.warning("skipping bad input: %s", rec)
                    if len(rep["bad_input_examples"]) < run.cfg.bad_input_examples:
                        rep["bad_input_examples"].append(
                            {"path": rec.path, "line": rec.line, "reason": rec.reason, "detail": rec.detail})
                    continue
                if cfg.langid.enabled:
                    lang, lscore = langid.identify(rec["text"], cfg.langid)
                    rec["detected_language"], rec["language_score"] = lang, lscore
                    acc.add_reason(rep["languages"], lang, 1, nbytes)
                    if not langid.keeps(lang, lscore, rec["code"], cfg.langid):
                        acc.add_reason(rep["filtered"], langid.REASON, 1, nbytes)
                        continue
                reason = reject_reason(rec["text"], rec["code"], cfg.filters)
                if reason is not None:
                    acc.add_reason(rep["filtered"], reason, 1, nbytes)
                    continue
                batch.append((rec, nbytes))
                if len(batch) >= cfg.batch_docs:
                    flush()
        flush()
        rep["passed_filters"] = row
        for f in fh.values():
            f.close()
        write_json(tmp / "report.json", rep)
        os.rename(tmp, final)
    except BaseException:
        for f in fh.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    mark_done(run.map_done(unit.index))


# --- reduce ------------------------------------------------------------------------------------------


def _require(markers: list[Path], what: str, hint: str) -> None:
    missing = [m for m in markers if not m.exists()]
    if missing:
        raise CurationError(f"{len(missing)} of {len(markers)} {what} not done (first: {missing[0].name}); {hint}")


def check_inputs_read(run: Run) -> None:
    """Once every map task is done: a source whose files hold no document at all (empty files, only blank lines)
    is an error naming it and its files, not an empty curated source that the later steps pass on silently."""
    docs: dict[str, int] = {}
    for u in run.units:
        path = run.unit_dir(u.index) / "report.json"
        if not path.exists():
            return  # maps not all done: the reduce stage says so
        docs[u.source] = docs.get(u.source, 0) + read_json(path)["input"]["docs"]
    empty = [s for s in run.specs if docs.get(s, 0) == 0]
    if empty:
        files = {s: [f.path for u in run.units if u.source == s for f in u.files] for s in empty}
        raise CurationError("empty input: " + "; ".join(
            f"source {s!r} read 0 documents from {len(fs)} file(s) ({', '.join(fs[:3])}{', ...' if len(fs) > 3 else ''})"
            for s, fs in files.items()) + " -- check the sources YAML paths or drop the source")


def reduce_part(run: Run, p: int) -> None:
    if is_done(run.reduce_done(p)):
        return
    _require([run.map_done(u.index) for u in run.units], "map tasks", "run --stage map for every task first")
    ex = [run.unit_dir(u.index) / f"exact-p{p:04d}.bin" for u in run.units]
    ls = [run.unit_dir(u.index) / f"lsh-p{p:04d}.bin" for u in run.units]
    exact, fuzzy = reduce_partition(ex, ls)
    d = run.work / "reduce"
    for name, arr in (("exact", exact), ("fuzzy", fuzzy)):
        with atomic_path(d / f"p{p:04d}-{name}.npy") as tmp, open(tmp, "wb") as fo:
            np.save(fo, arr)
    mark_done(run.reduce_done(p))


def resolve_dedup(run: Run) -> None:
    """Global duplicate set from every partition's edges; idempotent, any task may run it."""
    done = run.dedup_dir / "done"
    if done.exists():
        return
    P = run.cfg.dedup.partitions
    _require([run.reduce_done(p) for p in range(P)], "reduce partitions",
             "run --stage reduce for every task first")
    d = run.work / "reduce"
    exact = np.concatenate([np.load(d / f"p{p:04d}-exact.npy") for p in range(P)]).reshape(-1, 2)
    fuzzy = np.concatenate([np.load(d / f"p{p:04d}-fuzzy.npy") for p in range(P)]).reshape(-1, 2)
    sigs = SignatureStore(lambda u: run.unit_dir(u) / "sig.u32", run.cfg.dedup.num_perm)
    res = resolve(exact, fuzzy, run.cfg.dedup, sigs)
    for name in ("exact", "fuzzy"):
        with atomic_path(run.dedup_dir / f"{name}.npy") as tmp, open(tmp, "wb") as fo:
            np.save(fo, res[name])
    write_json(run.dedup_dir / "stats.json", res["stats"])
    mark_done(done)


# --- write -------------------------------------------------------------------------------------------

def _removed(run: Run) -> tuple[np.ndarray, np.ndarray]:
    return np.load(run.dedup_dir / "exact.npy"), np.load(run.dedup_dir / "fuzzy.npy")


def _rows_of(unit: int, refs: np.ndarray) -> set[int]:
    lo, hi = np.searchsorted(refs, [make_ref(unit, 0), make_ref(unit + 1, 0)])
    return set((refs[lo:hi] & 0xFFFFFFFF).tolist())


def write_unit(run: Run, unit: Unit) -> None:
    if is_done(run.write_done(unit.index)):
        return
    if not (run.dedup_dir / "done").exists():
        resolve_dedup(run)
    ex_refs, fz_refs = _removed(run)
    ex_rows, fz_rows = _rows_of(unit.index, ex_refs), _rows_of(unit.index, fz_refs)
    src = run.unit_dir(unit.index)
    rep = read_json(src / "report.json")
    for key in acc.BREAKDOWNS:
        rep.setdefault(key, {})
    sizes = np.fromfile(src / "sizes.i64", dtype="<i8")
    q = run.cfg.quality
    names = output_sources(run, unit.source)
    bucketed = q.bucketed(unit.source, bool(run.specs[unit.source].code))
    paths = [run.out / "curated" / n / f"part-{unit.part:05d}.jsonl.zst" for n in names]
    import zstandard

    from data_pipeline.tasks import ZSTD_LEVEL
    counts = [acc.zero() for _ in names]
    with ExitStack() as stack, open(src / "docs.jsonl", "rb") as docs:
        writers: dict[int, object] = {}

        def out(i: int):
            if i not in writers:  # a bucket's file appears only when it has a document
                tmp = stack.enter_context(atomic_path(paths[i]))
                raw = stack.enter_context(open(tmp, "wb"))
                writers[i] = stack.enter_context(
                    zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False))
            return writers[i]

        def keep(i: int, row: int, line: bytes) -> None:
            acc.add(rep["kept"], 1, sizes[row])
            acc.add(counts[i], 1, sizes[row])
            out(i).write(line)

        batch: list[tuple[int, bytes]] = []

        def score(batch: list[tuple[int, bytes]]) -> None:
            recs = [json.loads(line) for _, line in batch]
            ok, probs, total, bucket = quality.score_batch([r["text"] for r in recs], q)
            for k, ((row, _), r) in enumerate(zip(batch, recs)):
                if not ok[k]:
                    acc.add_reason(rep["filtered"], quality.UNSCORABLE, 1, sizes[row])
                    continue
                r["quality"] = {c.name: float(probs[k, j]) for j, c in enumerate(q.classifiers)}
                r["quality_score"] = int(total[k])
                r["quality_bucket"] = q.buckets[bucket[k]].name
                r["source"], r["from_source"] = names[bucket[k]], unit.source  # shards check `source`
                acc.add_reason(rep["quality_scores"], str(int(total[k])), 1, sizes[row])
                keep(int(bucket[k]), row, (json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            batch.clear()

        if not bucketed:
            out(0)  # an unbucketed source always has its part file, empty or not
        for row, line in enumerate(docs):
            if row in ex_rows:
                acc.add(rep["exact_duplicates"], 1, sizes[row])
            elif row in fz_rows:
                acc.add(rep["fuzzy_duplicates"], 1, sizes[row])
            elif bucketed:
                batch.append((row, line))
                if len(batch) >= run.cfg.batch_docs:
                    score(batch)
            else:
                keep(0, row, line)
        if batch:
            score(batch)
    rep["outputs"] = []
    for i, name in enumerate(names):
        if i in writers or not bucketed:
            acc.add_reason(rep["kept_by_bucket"], name, counts[i]["docs"], counts[i]["bytes"])
            rep["outputs"].append({"source": name, "file": paths[i].name, "docs": counts[i]["docs"],
                                   "input_bytes": counts[i]["bytes"], "bytes": paths[i].stat().st_size,
                                   "sha256": quality.sha256_of(paths[i])})
    acc.check_invariant(rep, f"unit {unit.index} ({unit.source} part {unit.part})")
    write_json(run.unit_report_path(unit.index), rep)
    mark_done(run.write_done(unit.index))


def merge_run_report(run: Run) -> dict | None:
    """Merged report once every unit is written (else None); deterministic bytes."""
    if not all(run.write_done(u.index).exists() for u in run.units):
        return None
    units = [read_json(run.unit_report_path(u.index)) for u in run.units]
    report = acc.merge_reports(units)
    report["dedup"] = read_json(run.dedup_dir / "stats.json")
    report["units"] = len(run.units)
    report["bad_input_examples"] = [e for r in units for e in r.get("bad_input_examples", [])][:100]
    _write_curated_manifests(run, units)
    path = run.out / "reports" / "run.json"
    if not path.exists() or read_json(path) != report:
        write_json(path, report)
    return report


def _write_curated_manifests(run: Run, units: list[dict]) -> None:
    """OUTPUT/curated/<output source>/manifest.json: where it came from (source, bucket and its score range,
    classifiers), its documents and bytes, and every part file with its sha256."""
    q = run.cfg.quality
    by_source: dict[str, list[dict]] = {}
    for u, r in zip(run.units, units):
        for o in r.get("outputs", []):
            by_source.setdefault(o["source"], []).append({"unit": u.index, **o})
    for source in run.specs:
        bucketed = q.bucketed(source, bool(run.specs[source].code))
        for i, name in enumerate(output_sources(run, source)):
            parts = by_source.get(name, [])
            if not parts:
                continue
            man = {"source": name, "from_source": source, "documents": sum(p["docs"] for p in parts),
                   "input_bytes": sum(p["input_bytes"] for p in parts), "bytes": sum(p["bytes"] for p in parts),
                   "parts": parts, "bucket": None}
            if bucketed:
                b = q.buckets[i]
                hi = q.buckets[i - 1].min_score - 1 if i else q.resolution - 1
                man["bucket"] = {"name": b.name, "min_score": b.min_score, "max_score": hi, "combine": q.combine,
                                 "resolution": q.resolution,
                                 "classifiers": {c.name: {"path": c.path, "label": c.label} for c in q.classifiers}}
            path = run.out / "curated" / name / "manifest.json"
            if not path.exists() or read_json(path) != man:
                write_json(path, man)


# --- driving the stages ------------------------------------------------------------------------------


def _run_tasks(fn, run: Run, items: list, cpus: int, desc: str, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="task", disable=not progress, file=sys.stderr)
    if cpus <= 1 or len(items) <= 1:
        for it in items:
            fn(run, it)
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(cpus, len(items)), mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(fn, run, it) for it in items]
            for f in as_completed(futs):
                f.result()
                bar.update()
    bar.close()


def run_curation(sources: str | os.PathLike, output: str | os.PathLike, config: str | os.PathLike |
                 CurateConfig | None = None, *, cpus: int = 1, stage: Stage = "all",
                 task_index: int | None = None, num_tasks: int | None = None,
                 on_bad_input: Literal["skip", "fail"] | None = None, progress: bool | None = None) -> dict:
    """Run curation (or one stage's share of it) and return the merged run report once it exists, else
    a short status dict {"stage", "task", "tasks_done", "complete": False}.

    `task_index/num_tasks` default to the Slurm array variables when present; without either, this
    process runs every task of the stage(s) with `cpus` worker processes.
    """
    cfg = config if isinstance(config, CurateConfig) else load_config(config)
    if stage not in ("map", "reduce", "write", "all"):
        raise CurationError(f"unknown stage {stage!r} (map | reduce | write | all)")
    try:
        task = task_from_env(task_index, num_tasks)
    except ValueError as e:
        raise CurationError(str(e)) from None
    if stage == "all" and task is not None and task[1] > 1:
        raise CurationError("--stage all needs the whole run in one job; with several array tasks run "
                            "--stage map, then reduce, then write (each a job array, afterok)")
    if progress is None:
        progress = sys.stderr.isatty()
    run = plan_run(sources, output, cfg, on_bad_input)
    i, n = task if task is not None else (0, 1)
    units = [run.units[k] for k in task_slice(len(run.units), i, n)]
    parts = task_slice(cfg.dedup.partitions, i, n)
    if stage in ("map", "all"):
        _run_tasks(map_unit, run, units, cpus, "curate map", progress)
    if stage in ("reduce", "all"):
        check_inputs_read(run)
        _run_tasks(reduce_part, run, parts, cpus, "curate reduce", progress)
    if stage in ("write", "all"):
        resolve_dedup(run)
        _run_tasks(write_unit, run, units, cpus, "curate write", progress)
    report = merge_run_report(run)
    if report is not None:
        return report
    return {"stage": stage, "task": [i, n], "complete": False,
            "map_done": sum(run.map_done(u.index).exists() for u in run.units),
            "write_done": sum(run.write_done(u.index).exists() for u in run.units), "units": len(run.units)}
