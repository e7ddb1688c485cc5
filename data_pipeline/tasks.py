"""Task bookkeeping for restartable batch jobs: which task does what, atomic files, done markers.

Every output is written under a temporary name in its final folder and renamed into place
(`os.replace` is atomic on POSIX), and a task's done marker is written only after all its outputs.
A task whose marker exists is skipped; a task killed half-way leaves only `.tmp-*` files, which the
rerun overwrites. Outputs depend only on the inputs and the config (no timestamps, no pids), so a
rerun or a resumed run produces the same bytes.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard

ZSTD_LEVEL = 3  # fast; curated text compresses ~3-4x at this level


def task_slice(n_items: int, task_index: int, num_tasks: int) -> list[int]:
    """Items this task owns: round-robin, so big early sources spread over all tasks."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} out of range for {num_tasks} task(s)")
    return list(range(task_index, n_items, num_tasks))


def task_from_env(task_index: int | None, num_tasks: int | None) -> tuple[int, int] | None:
    """(index, count) from the arguments, else from a Slurm job array, else None (run everything).

    SLURM_ARRAY_TASK_COUNT is the number of array elements; ids are assumed to start at
    SLURM_ARRAY_TASK_MIN (0 unless given), so `--array=0-15` and `--array=1-16` both work.
    """
    if (task_index is None) != (num_tasks is None):
        raise ValueError("--task-index and --num-tasks go together")
    if task_index is not None:
        task_from = (task_index, num_tasks)
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        base = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        task_from = (int(os.environ["SLURM_ARRAY_TASK_ID"]) - base, int(os.environ["SLURM_ARRAY_TASK_COUNT"]))
    else:
        return None
    i, n = task_from
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"task index {i} out of range for {n} task(s)")
    return i, n


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic, deterministic JSON (sorted keys)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def is_done(marker: str | os.PathLike) -> bool:
    return os.path.exists(marker)


def mark_done(marker: str | os.PathLike, info: dict | None = None) -> None:
    write_json(marker, info or {})


@contextmanager
def jsonl_zst_writer(path: str | os.PathLike) -> Iterator[callable]:
    """Yield `write(record)`; the file appears (atomically) when the block ends without error."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        with cctx.stream_writer(raw, closefd=False) as zw:
            buf = io.TextIOWrapper(zw, encoding="utf-8", write_through=True)

            def write(rec: dict) -> None:
                buf.write(json.dumps(rec, ensure_ascii=False) + "\n")

            yield write
            buf.flush()
            buf.detach()


def write_jsonl_zst(path: str | os.PathLike, records: Iterable[dict]) -> int:
    n = 0
    with jsonl_zst_writer(path) as w:
        for r in records:
            w(r)
            n += 1
    return n
