"""Shard manifests: what `foldtron shards` wrote, per source, and what the loader and the curriculum trust.

`<shards_dir>/<source>/manifest.json` lists every shard (relative path, documents, tokens, bytes, sha256) and
the totals, plus the tokenizer that made them. The loader plans exact token positions from these numbers, so
they must match the files: `verify_shard` checks size and sha256 and names the shard when they disagree.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"


class ShardError(RuntimeError):
    """A shard that is missing, truncated, corrupt, or disagrees with its manifest; the message names it."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # relative to the source directory
    documents: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str
    input: Optional[str] = None  # the curated file it came from


class SourceManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    tokenizer: dict  # Tokenizer.describe(): sha256, vocab_size, dtype, eos_id, bos_id, ...
    shards: list[ShardEntry]
    documents: int = Field(ge=0)
    tokens: int = Field(ge=0)

    @property
    def dtype(self) -> str:
        return self.tokenizer["dtype"]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    """Write-then-rename, so a reader (or a re-run after a kill) sees the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_manifest(source_dir: str | Path, manifest: SourceManifest) -> Path:
    path = Path(source_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.model_dump(mode="json"))
    return path


def load_manifest(source_dir: str | Path) -> SourceManifest:
    path = Path(source_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"no manifest at {path}: run `foldtron shards` for this source first")
    try:
        m = SourceManifest.model_validate_json(path.read_text())
    except Exception as e:
        raise ShardError(f"manifest {path} is unreadable: {e}") from e
    check_manifest(path, m)
    return m


def check_manifest(path: Path, m: SourceManifest) -> None:
    """The manifest agrees with itself and with its folder: totals equal the sum over its shards, no shard is
    listed twice, every shard on disk is listed (one that is not would be silently left out of training), and
    no listed shard lies outside the source folder."""
    for field in ("documents", "tokens"):
        per_shard = sum(getattr(e, field) for e in m.shards)
        if per_shard != getattr(m, field):
            raise ShardError(f"manifest {path}: total {field} {getattr(m, field)} disagrees with the sum over its "
                             f"{len(m.shards)} shards ({per_shard}); the manifest was edited or is corrupt: rerun "
                             "`foldtron shards` to rebuild it")
    listed = [Path(e.path).as_posix() for e in m.shards]
    twice = sorted({p for p in listed if listed.count(p) > 1})
    if twice:
        raise ShardError(f"manifest {path} lists shard(s) {twice[:3]} more than once")
    root = path.parent
    outside = [p for p in listed if p.startswith("/") or ".." in Path(p).parts]
    if outside:
        raise ShardError(f"manifest {path} lists shard(s) outside {root}: {outside[:3]}")
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.tar")
                     if not any(part.startswith(".") for part in p.relative_to(root).parts))
    unlisted = sorted(set(on_disk) - set(listed))
    if unlisted:
        size = sum((root / p).stat().st_size for p in unlisted)
        raise ShardError(f"{len(unlisted)} shard(s) in {root} are not in its manifest {path} ({', '.join(unlisted[:3])}"
                         f"{', ...' if len(unlisted) > 3 else ''}; {size} bytes): they would be left out of "
                         "training without a word. Rerun `foldtron shards` to rebuild the manifest, or move them away")


def load_manifests(shards_dir: str | Path) -> dict[str, SourceManifest]:
    """Every `<shards_dir>/<source>/manifest.json`, keyed by source name (sorted)."""
    root = Path(shards_dir)
    if not root.is_dir():
        raise ShardError(f"shards directory {root} does not exist")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (d / MANIFEST_NAME).is_file():
            m = load_manifest(d)
            if m.source != d.name:
                raise ShardError(f"manifest {d / MANIFEST_NAME} says source {m.source!r} but lives in {d.name!r}")
            out[m.source] = m
    if not out:
        raise ShardError(f"no <source>/{MANIFEST_NAME} under {root}: run `foldtron shards` first")
    return out


def verify_shard(path: str | Path, entry: ShardEntry, check_sha256: bool = True) -> None:
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} is missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise ShardError(f"shard {path} has {size} bytes but the manifest says {entry.bytes} (truncated?)")
    if check_sha256:
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ShardError(f"shard {path} sha256 {digest[:16]}... disagrees with the manifest "
                             f"({entry.sha256[:16]}...): the file changed or is corrupt")
