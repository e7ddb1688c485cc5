"""Curation inputs (streaming readers, one document at a time) and the curated-output reader.

Sources YAML: a list (or `{sources: [...]}`) of entries
    - name: web                # tags every document; curated output goes to curated/<name>/
      kind: jsonl              # jsonl (plain, .gz, .zst) | parquet | text_tree | code_tree
      paths: [data/*.jsonl.zst]   # files, directories or globs; relative to the YAML's folder
      text_field: text         # jsonl / parquet: the field holding the document text
      include: ["*.py"]        # trees: fnmatch patterns on the path relative to its root (default all)
      exclude: []              # trees: patterns to leave out
      language: en             # recorded on every document
      code: false              # code-aware filters instead of prose ones (default: kind == code_tree)
      keep_fields: []          # jsonl / parquet: extra fields copied to the output records
A text/code tree makes one document per file; `.gz` files (man pages) are decompressed. Every document
gets a stable id: "<source>:<relative path>" for trees, "<source>:<relative path>:<line or row>" (1-based)
for jsonl / parquet, so ids survive moving the data to another machine.

Curated output (written by `data_pipeline.curate`, read by `iter_curated`):
    OUTPUT/curated/<source>/part-XXXXX.jsonl.zst   one JSON object per line, zstd-compressed, with
        {"id": str, "source": str, "text": str, "language": str, "code": bool, **keep_fields}
    XXXXX numbers the source's input units (file groups) in input order; a part may be empty.
    OUTPUT/reports/run.json  merged accounting; OUTPUT/reports/tasks/*.json per unit.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Kind = Literal["jsonl", "parquet", "text_tree", "code_tree"]


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # a folder name under curated/
    kind: Kind
    paths: list[str] = Field(min_length=1)  # files, directories or globs
    text_field: str = "text"  # jsonl / parquet
    include: list[str] = Field(default_factory=lambda: ["*"])  # trees: fnmatch on the relative path
    exclude: list[str] = Field(default_factory=list)
    language: str = "en"
    code: bool | None = None  # None: True for code_tree, else False
    keep_fields: list[str] = Field(default_factory=list)
    on_bad_input: Literal["skip", "fail"] | None = None  # None: the run's --on-bad-input

    @model_validator(mode="after")
    def _default_code(self) -> "SourceSpec":
        if self.code is None:
            self.code = self.kind == "code_tree"
        return self


class SourceError(ValueError):
    """Bad sources YAML, a missing path, or an input set with no files."""


class BadInput(ValueError):
    """One unreadable record; carries where it is so the log can name file and line."""

    def __init__(self, reason: str, path: str, line: int, detail: str):
        super().__init__(f"{path}:{line}: {reason}: {detail}")
        self.reason, self.path, self.line, self.detail = reason, path, line, detail


def load_sources(path: str | os.PathLike) -> list[SourceSpec]:
    """Parse and validate the sources YAML; relative paths become relative to the YAML's folder."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"sources file not found: {p}")
    raw = yaml.safe_load(p.read_text())
    if isinstance(raw, dict) and "sources" in raw:
        raw = raw["sources"]
    if not isinstance(raw, list) or not raw:
        raise SourceError(f"{p}: expected a non-empty list of sources (or a mapping with key 'sources')")
    specs = []
    for i, entry in enumerate(raw):
        try:
            s = SourceSpec.model_validate(entry)
        except ValidationError as e:
            raise SourceError(f"{p}: source #{i}: {e}") from None
        s.paths = [q if os.path.isabs(q) else str((p.parent / q)) for q in s.paths]
        specs.append(s)
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SourceError(f"{p}: source names must be unique, repeated: {sorted(dup)}")
    return specs


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    rel: str  # relative to its root: what ids are built from
    size: int


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def list_files(spec: SourceSpec) -> list[InputFile]:
    """Every input file of a source, sorted by relative path; errors on a missing path or no files."""
    found: dict[str, InputFile] = {}
    for pat in spec.paths:
        if _has_magic(pat):
            root = pat
            while _has_magic(root):
                root = os.path.dirname(root)
            hits = sorted(glob.glob(pat, recursive=True))
            if not hits:
                raise SourceError(f"source {spec.name!r}: pattern {pat!r} matches no files")
            candidates = []
            for h in hits:
                if os.path.isdir(h):
                    candidates += _walk(h, root)
                else:
                    candidates.append((h, os.path.relpath(h, root)))
        elif os.path.isdir(pat):
            candidates = _walk(pat, pat)
        elif os.path.isfile(pat):
            candidates = [(pat, os.path.basename(pat))]
        else:
            raise SourceError(f"source {spec.name!r}: path does not exist: {pat}")
        for full, rel in candidates:
            rel = rel.replace(os.sep, "/")
            if spec.kind in ("text_tree", "code_tree"):
                if not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(os.path.basename(rel), p)
                           for p in spec.include):
                    continue
                if any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(os.path.basename(rel), p)
                       for p in spec.exclude):
                    continue
            full = os.path.abspath(full)
            found.setdefault(full, InputFile(full, rel, os.path.getsize(full)))
    files = sorted(found.values(), key=lambda f: (f.rel, f.path))
    if not files:
        raise SourceError(f"source {spec.name!r}: no input files under {spec.paths} "
                          f"(include={spec.include}, exclude={spec.exclude})")
    return files


def _walk(top: str, root: str) -> list[tuple[str, str]]:
    out = []
    for d, dirs, names in os.walk(top):
        dirs.sort()
        for n in sorted(names):
            full = os.path.join(d, n)
            if os.path.isfile(full):
                out.append((full, os.path.relpath(full, root)))
    return out


@dataclass
class Unit:
    """One map task's input: a run of files from one source, in order."""
    index: int  # global, in (source order, file order)
    source: str
    part: int  # index within the source: names the output part file
    files: list[InputFile] = field(default_factory=list)


def plan_units(specs: list[SourceSpec], target_bytes: int) -> list[Unit]:
    """Group each source's files into units of about `target_bytes` (a big file is a unit by itself)."""
    units: list[Unit] = []
    for spec in specs:
        part, cur, size = 0, [], 0
        for f in list_files(spec):
            if cur and size + f.size > target_bytes:
                units.append(Unit(len(units), spec.name, part, cur))
                part, cur, size = part + 1, [], 0
            cur.append(f)
            size += f.size
        if cur:
            units.append(Unit(len(units), spec.name, part, cur))
    return units


class TruncatedInput(SourceError):
    """A compressed file whose stream ends early (an interrupted copy or download) or is corrupt: `line` is the
    first line that could not be read whole, `nbytes` the bytes of that partial line."""

    def __init__(self, path: str, line: int, detail: str, nbytes: int = 0):
        super().__init__(f"{path}: truncated or corrupt at line {line}: {detail}")
        self.path, self.line, self.detail, self.nbytes = path, line, detail, nbytes


_CHUNK = 1 << 16


def _zstd_chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of every zstd frame in the file. zstandard's stream_reader ends quietly at a cut-off
    frame; here a frame that was started but never finished raises EOFError."""
    import zstandard

    with open(path, "rb") as raw:
        d, fed = zstandard.ZstdDecompressor().decompressobj(), False
        while block := raw.read(_CHUNK):
            while block:
                try:
                    out = d.decompress(block)
                except zstandard.ZstdError as e:
                    raise EOFError(f"corrupt zstd stream ({e})") from None
                fed = True
                if out:
                    yield out
                if d.eof:  # the next frame (if any) starts in what this one did not use
                    block = d.unused_data
                    d, fed = zstandard.ZstdDecompressor().decompressobj(), False
                else:
                    block = b""
        if fed and not d.eof:
            raise EOFError("the zstd stream ends before the end of its frame")


def _gzip_chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of every gzip member. gzip.GzipFile raises EOFError at a cut-off stream and loses what
    its last read had decompressed; zlib's decompressor hands over every byte before the cut."""
    import zlib

    with open(path, "rb") as raw:
        d, fed = zlib.decompressobj(wbits=31), False
        while block := raw.read(_CHUNK):
            while block:
                if not fed and not block.startswith(b"\x1f\x8b"[: len(block)]):
                    if not block.strip(b"\0"):
                        break  # zero padding after the last member (tape/block devices), as gzip allows
                    raise EOFError("not a gzip stream (bad magic bytes)")
                try:
                    out = d.decompress(block)
                except zlib.error as e:
                    raise EOFError(f"corrupt gzip stream ({e})") from None
                fed = True
                if out:
                    yield out
                if d.eof:  # the next member (if any) starts in what this one did not use
                    block = d.unused_data
                    d, fed = zlib.decompressobj(wbits=31), False
                else:
                    block = b""
        if fed and not d.eof:
            raise EOFError("the gzip stream ends before its end-of-stream marker")


def _chunks(path: str) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks; EOFError if a compressed stream is cut off or corrupt."""
    if path.endswith(".gz"):
        yield from _gzip_chunks(path)
    elif path.endswith(".zst") or path.endswith(".zstd"):
        yield from _zstd_chunks(path)
    else:
        with open(path, "rb") as fh:
            while block := fh.read(_CHUNK):
                yield block


def read_bytes(path: str) -> bytes:
    """The whole (decompressed) file; TruncatedInput names the file if its compressed stream is cut off."""
    parts: list[bytes] = []
    try:
        for block in _chunks(path):
            parts.append(block)
    except EOFError as e:
        raise TruncatedInput(path, 1, str(e), sum(map(len, parts))) from None
    return b"".join(parts)


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line with its newline) of a plain, .gz or .zst file, streaming. A compressed stream
    that ends early raises TruncatedInput after the last whole line: the lines before it are kept, the cut-off
    one is not passed on as if it were a record."""
    lineno, tail = 0, []  # the current line's pieces: a long line costs one join, not one copy per chunk
    try:
        for block in _chunks(path):
            if b"\n" not in block:
                tail.append(block)
                continue
            lines = b"".join([*tail, block]).split(b"\n")
            tail = [lines.pop()]
            for line in lines:
                lineno += 1
                yield lineno, line + b"\n"
    except EOFError as e:
        raise TruncatedInput(path, lineno + 1, str(e), sum(map(len, tail))) from None
    if any(tail):
        yield lineno + 1, b"".join(tail)


Record = dict  # {"id", "source", "text", "language", "code", ...keep_fields}


def read_file(spec: SourceSpec, f: InputFile) -> Iterator[tuple[Record | BadInput, int]]:
    """Yield (record or BadInput, raw byte size) for each document in one file, streaming."""
    base = {"source": spec.name, "language": spec.language, "code": bool(spec.code)}
    if spec.kind in ("text_tree", "code_tree"):
        try:
            raw = read_bytes(f.path)
        except TruncatedInput as t:
            yield BadInput("truncated", f.path, t.line, t.detail), f.size
            return
        rel = f.rel[:-3] if f.rel.endswith(".gz") else f.rel
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadInput("undecodable", f.path, 1, str(e)), len(raw)
            return
        yield {"id": f"{spec.name}:{rel}", **base, "text": text}, len(raw)
        return
    if spec.kind == "jsonl":
        lines = iter_lines(f.path)
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                return
            except TruncatedInput as t:  # the lines before it were read: the cut-off tail is one bad input
                yield BadInput("truncated", f.path, t.line, t.detail), t.nbytes
                return
            if not line.strip():
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadInput("undecodable", f.path, lineno, str(e)), len(line)
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                yield BadInput("malformed_json", f.path, lineno, str(e)), len(line)
                continue
            yield _record(spec, base, obj, f, lineno), len(line)
    if spec.kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f.path)
        except (pa.ArrowException, OSError) as e:  # a cut-off file has no footer
            yield BadInput("truncated", f.path, 1, f"not a readable parquet file ({type(e).__name__}: {e})"), f.size
            return
        cols = [spec.text_field, *spec.keep_fields]
        missing = [c for c in cols if c not in pf.schema_arrow.names]
        if missing:
            raise SourceError(f"{f.path}: parquet file has no column(s) {missing} "
                              f"(columns: {pf.schema_arrow.names})")
        row = 0
        batches = pf.iter_batches(batch_size=1024, columns=cols)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                yield BadInput("corrupt", f.path, row + 1, f"parquet rows from {row + 1} unreadable "
                               f"({type(e).__name__}: {e})"), 0
                return
            for obj in batch.to_pylist():
                row += 1
                size = len(obj[spec.text_field].encode("utf-8", "surrogatepass")) \
                    if isinstance(obj.get(spec.text_field), str) else 0
                yield _record(spec, base, obj, f, row), size
    raise SourceError(f"unknown source kind {spec.kind!r}")


def _record(spec: SourceSpec, base: dict, obj, f: InputFile, n: int) -> Record | BadInput:
    if not isinstance(obj, dict):
        return BadInput("not_an_object", f.path, n, f"expected a JSON object, got {type(obj).__name__}")
    text = obj.get(spec.text_field)
    if text is None:
        return BadInput("missing_text", f.path, n, f"no field {spec.text_field!r}")
    if not isinstance(text, str):
        return BadInput("non_string_text", f.path, n,
                        f"field {spec.text_field!r} is {type(text).__name__}, not a string")
    try:  # JSON may carry lone surrogates ("\\ud800") that no UTF-8 output can hold
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return BadInput("undecodable", f.path, n, f"field {spec.text_field!r}: {e}")
    rec = {"id": f"{spec.name}:{f.rel}:{n}", **base, "text": text}
    for k in spec.keep_fields:
        if k in obj:
            rec[k] = obj[k]
    return rec


def iter_jsonl_zst(path: str | os.PathLike) -> Iterator[dict]:
    """The records of one curated part file (TruncatedInput, naming it, if its stream is cut off)."""
    for lineno, line in iter_lines(str(path)):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno}: not JSON ({e})") from None


def iter_curated(directory: str | os.PathLike, sources: list[str] | None = None) -> Iterator[dict]:
    """Yield every curated document under `directory` (a run's OUTPUT or its curated/ folder), in
    (source name, part) order; `sources` limits it to those names."""
    d = Path(directory)
    if (d / "curated").is_dir():
        d = d / "curated"
    if not d.is_dir():
        raise FileNotFoundError(f"no curated data at {directory}")
    for src in sorted(p for p in d.iterdir() if p.is_dir()):
        if sources is not None and src.name not in sources:
            continue
        for part in sorted(src.glob("part-*.jsonl.zst")):
            yield from iter_jsonl_zst(part)
