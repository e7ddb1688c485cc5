"""`foldtron shards`: tokenize curated documents into webdataset `.tar` shards plus a manifest per source.

Input (what curation writes): `<curated_dir>/<source>/**/*.jsonl[.zst|.gz]`, one JSON object per line with at
least `"text"` (string); `"id"` is kept in the metadata, and a `"source"` field, when present, must equal the
directory name (a record filed under the wrong source is an error, not a silent relabel). A plain directory of
JSONL files in per-source subdirectories is the same format. Empty lines are skipped; a bad line is an error
naming file and line.

Output: `<out>/<source>/<stem>-NNNNNN.tar`, one sample per document with two members,
`<key>.json` ({"id", "source", "tokens"}) and `<key>.tokens.u16` (or `.u32`: the token ids as raw
little-endian integers, EOS included per the tokenizer policy), readable by plain `tar`, by
`webdataset.WebDataset` and by `wids`. `<out>/<source>/manifest.json` lists every shard with documents,
tokens, bytes and sha256.

Parallelism and restarts: one job per curated input file (a process pool here, or one Slurm array task
each); within a job the Rust tokenizer encodes batches on all its threads. A job writes into a hidden
temporary directory and moves finished shards into place before recording them in `.parts/<stem>.json`
atomically; a re-run skips inputs whose part record matches (same input size and mtime, same tokenizer), so
killing and re-running is safe and cheap, and the manifest is rebuilt from the part records at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from data_pipeline.manifest import ShardEntry, SourceManifest, save_manifest, sha256_file, write_json_atomic

CURATED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARTS_DIR = ".parts"


class CuratedInputError(ValueError):
    """Curated input that cannot be read as documents; the message names the file (and line)."""


def iter_documents(path: str | Path, source: Optional[str] = None) -> Iterator[tuple[str, str]]:
    """(id, text) for every record of one curated file; ids default to `<file>:<line>`. A compressed file cut
    off before its end is an error naming it (zstandard's own reader would end there silently)."""
    from data_pipeline.sources import TruncatedInput, iter_lines

    path = Path(path)
    lines = iter_lines(str(path))
    while True:
        try:
            lineno, raw = next(lines)
        except StopIteration:
            return
        except TruncatedInput as e:
            raise CuratedInputError(str(e)) from None
        except OSError as e:
            raise CuratedInputError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CuratedInputError(f"{path}:{lineno}: not UTF-8 ({e})") from None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CuratedInputError(f"{path}:{lineno}: not JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CuratedInputError(f"{path}:{lineno}: record has no string field 'text'")
        if source is not None and rec.get("source", source) != source:
            raise CuratedInputError(f"{path}:{lineno}: record source {rec.get('source')!r} but the file "
                                    f"is under source directory {source!r}")
        yield str(rec.get("id", f"{path.name}:{lineno}")), rec["text"]


def list_curated(curated_dir: str | Path) -> dict[str, list[Path]]:
    """{source: sorted input files}; a source is a subdirectory holding at least one curated file."""
    root = Path(curated_dir)
    if not root.is_dir():
        raise CuratedInputError(f"curated directory {root} does not exist")
    if (root / "curated").is_dir() and ((root / "reports").is_dir() or (root / "_work").is_dir()):
        raise CuratedInputError(f"{root} is a `foldtron curate` run directory, not its curated data: pass "
                                f"--input {root / 'curated'}")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(CURATED_SUFFIXES))
    if stray:
        raise CuratedInputError(f"{root} has JSONL files outside a source subdirectory ({stray[:3]}...): put each "
                                f"source's files under {root}/<source>/")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.name.endswith(CURATED_SUFFIXES))
        if files:
            out[d.name] = files
    if not out:
        raise CuratedInputError(f"no curated files ({'/'.join(CURATED_SUFFIXES)}) under {root}/<source>/")
    return out


def _check_source_input(source: str, files: list[Path]) -> None:
    """Before anything is written: the source's first record is readable and filed under this source (a curated
    directory one level too high fails here), and the source holds at least one document (empty input is an
    error naming the files, not an empty manifest)."""
    for f in files:
        for _ in iter_documents(f, source):
            return
    names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    raise CuratedInputError(f"empty input: source {source!r} has no documents in its {len(files)} curated "
                            f"file(s) ({names})")


def _stem(path: Path, source_dir: Path) -> str:
    rel = str(path.relative_to(source_dir))
    for suffix in CURATED_SUFFIXES[::-1]:
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    # webdataset splits keys at the first dot of the file name: keep stems dot-free.
    return re.sub(r"[^A-Za-z0-9_-]", "_", rel)


@dataclass
class _Job:
    source: str
    input: str
    stem: str
    out_dir: str
    tokenizer: str
    policy: dict
    shard_bytes: int
    batch_documents: int


def _input_fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _part_path(job: _Job) -> Path:
    return Path(job.out_dir) / job.source / PARTS_DIR / f"{job.stem}.json"


def _part_is_current(job: _Job, tokenizer_sha: str) -> Optional[dict]:
    part = _part_path(job)
    if not part.is_file():
        return None
    rec = json.loads(part.read_text())
    if rec.get("input") != _input_fingerprint(job.input) or rec.get("tokenizer_sha256") != tokenizer_sha:
        return None
    src = Path(job.out_dir) / job.source
    if not all((src / s["path"]).is_file() and (src / s["path"]).stat().st_size == s["bytes"] for s in rec["shards"]):
        return None
    return rec


def _run_job(job: _Job) -> dict:
    """Tokenize one curated file into shards; returns its part record (also written to .parts/)."""

    from data_pipeline.tokenizer import Tokenizer, TokenizerPolicy

    tok = Tokenizer.from_file(job.tokenizer, TokenizerPolicy(**job.policy))
    tok_sha = tok.fingerprint()
    done = _part_is_current(job, tok_sha)
    if done is not None:
        return {**done, "skipped": True}
    src_dir = Path(job.out_dir) / job.source
    tmp = src_dir / f".tmp-{job.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _write_job(job, tok, tok_sha, src_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # this job's own temporary folder, never a finished shard
        raise


def _write_job(job: _Job, tok, tok_sha: str, src_dir: Path, tmp: Path) -> dict:
    import webdataset as wds

    ext = "tokens.u16" if tok.dtype.itemsize == 2 else "tokens.u32"
    shards: list[dict] = []
    counts = {"documents": 0, "tokens": 0}

    def finished(fname: str) -> None:
        shards.append({"path": Path(fname).name, "documents": counts["documents"], "tokens": counts["tokens"]})
        counts.update(documents=0, tokens=0)

    writer = wds.ShardWriter(str(tmp / f"{job.stem}-%06d.tar"), maxcount=1 << 62, maxsize=job.shard_bytes,
                             post=finished, verbose=0, mtime=0.0)
    index = 0

    def write(batch: list[tuple[str, str]], arrays) -> None:
        nonlocal index
        for (doc_id, _), ids in zip(batch, arrays):
            writer.write({"__key__": f"{job.stem}-{index:09d}", ext: ids.tobytes(),
                          "json": {"id": doc_id, "source": job.source, "tokens": int(ids.size)}})
            counts["documents"] += 1
            counts["tokens"] += int(ids.size)
            index += 1

    # Encode batch k+1 (Rust, GIL released) while Python writes batch k into the tar.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = None
        batch: list[tuple[str, str]] = []
        for doc in iter_documents(job.input, job.source):
            batch.append(doc)
            if len(batch) >= job.batch_documents:
                fut = pool.submit(tok.encode_batch, [t for _, t in batch])
                if pending:
                    write(pending[0], pending[1].result())
                pending, batch = (batch, fut), []
        if batch:
            fut = pool.submit(tok.encode_batch, [t for _, t in batch])
            if pending:
                write(pending[0], pending[1].result())
            pending = (batch, fut)
        if pending:
            write(pending[0], pending[1].result())
    writer.close()
    if shards and shards[-1]["documents"] == 0:  # ShardWriter opens its first tar eagerly: an empty input
        (tmp / shards.pop()["path"]).unlink()
    for s in shards:
        path = tmp / s["path"]
        s["bytes"] = path.stat().st_size
        s["sha256"] = sha256_file(path)
        s["input"] = job.input
        os.replace(path, src_dir / s["path"])
    rec = {"input": _input_fingerprint(job.input), "tokenizer_sha256": tok_sha, "shards": shards,
           "tokenizer": tok.describe()}
    old = _previous_shards(job)
    (src_dir / PARTS_DIR).mkdir(exist_ok=True)
    write_json_atomic(_part_path(job), rec)
    for stale in sorted(old - {s["path"] for s in shards}):  # the previous run of this input wrote more shards
        (src_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return {**rec, "skipped": False}


def _remove_orphan_parts(src_dir: Path, stems: set[str]) -> None:
    """A curated input that is gone (deleted, or renamed) leaves its part record and shards from an earlier run:
    remove exactly those (the record lists them), so the manifest and the folder agree."""
    for part in sorted((src_dir / PARTS_DIR).glob("*.json")):
        if part.stem in stems:
            continue
        try:
            names = [s["path"] for s in json.loads(part.read_text()).get("shards", [])]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue  # not a record this code wrote: leave it
        for name in names:
            if "/" not in name and name.endswith(".tar"):
                (src_dir / name).unlink(missing_ok=True)
        part.unlink()


def _previous_shards(job: _Job) -> set[str]:
    """Shard names the last run of this input recorded (its part record): what a rewrite may replace or remove."""
    try:
        return {s["path"] for s in json.loads(_part_path(job).read_text()).get("shards", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return set()


def _init_worker(threads: int) -> None:
    # Each process's Rust tokenizer would otherwise start one thread per core: N processes x cores threads.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"


def write_shards(curated_dir: str | Path, out_dir: str | Path, tokenizer: str | Path, policy: dict | None = None,
                 shard_bytes: int = 256 << 20, workers: int = 1, batch_documents: int = 512,
                 sources: Optional[list[str]] = None, progress: bool = False) -> dict[str, SourceManifest]:
    """Shard every curated source (or only `sources`); returns the manifests written. Idempotent."""
    from data_pipeline.tokenizer import Tokenizer, TokenizerPolicy

    policy = TokenizerPolicy(**(policy or {})).model_dump()
    Tokenizer.from_file(tokenizer, TokenizerPolicy(**policy))  # a bad tokenizer or policy fails here, once
    curated = list_curated(curated_dir)
    if sources:
        unknown = sorted(set(sources) - set(curated))
        if unknown:
            raise CuratedInputError(f"sources {unknown} not found under {curated_dir} (have {sorted(curated)})")
        curated = {s: curated[s] for s in sources}
    out = Path(out_dir)
    jobs = []
    for source, files in curated.items():
        stems = [_stem(f, Path(curated_dir) / source) for f in files]
        if len(set(stems)) != len(stems):
            raise CuratedInputError(f"source {source}: input names collide after sanitizing ({stems})")
        _check_source_input(source, files)
        jobs += [_Job(source, str(f), s, str(out), str(tokenizer), policy, int(shard_bytes), batch_documents)
                 for f, s in zip(files, stems)]
    created = [d for d in [out, *(out / s for s in curated)] if not d.exists()]
    for source in curated:
        (out / source).mkdir(parents=True, exist_ok=True)
    try:
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(threads,)) as pool:
                results = list(pool.map(_run_job, jobs))
        else:
            results = []
            for i, job in enumerate(jobs):
                results.append(_run_job(job))
                if progress:
                    print(f"[{i + 1}/{len(jobs)}] {job.source}/{job.stem}: "
                          f"{'up to date' if results[-1]['skipped'] else 'written'}", flush=True)
    except BaseException:
        for d in reversed(created):  # folders this call made and left empty; nothing anyone else wrote
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    manifests = {}
    for source in curated:
        _remove_orphan_parts(out / source, {j.stem for j in jobs if j.source == source})
        recs = [r for j, r in zip(jobs, results) if j.source == source]
        entries = [ShardEntry(**s) for r in recs for s in r["shards"]]
        m = SourceManifest(source=source, tokenizer=recs[0]["tokenizer"], shards=entries,
                           documents=sum(e.documents for e in entries), tokens=sum(e.tokens for e in entries))
        save_manifest(out / source, m)
        manifests[source] = m
    return manifests
