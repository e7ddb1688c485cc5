"""Checkpoint merging: the element-wise mean of a stage's last K checkpoints (or of those saved inside a token
window) written as a new checkpoint with exactly the inputs' layout (Nemotron 3 Super merged checkpoints over
500B-token windows during its stable phase). `foldtron merge-checkpoints`, and `checkpoint.merge` in the run
config for merges on a token schedule (`after_save`, called by the training loop after each save).

Why it works at the file level of torch.distributed.checkpoint (DCP):
- A Foldtron checkpoint is a Megatron-Core `torch_dist` checkpoint: `.distcp` files holding items (one chunk of a
  sharded tensor each, serialised with torch.save, or raw bytes for ShardedObjects: RNG, common state,
  `_extra_state`) and `.metadata` (DCP's pickled `Metadata`: every tensor's dtype, global shape and chunks, and
  per item its file, offset and length). The merge reads the same item from every input, averages it and writes
  it into a file of the same name, in the same order, so the output has the input's layout whatever TP / PP / EP /
  VPP / distributed-optimizer sharding wrote it (`.metadata` keeps every tensor's chunks; only the item offsets
  change), and memory is bounded by one item (one rank's shard of one tensor), not by the checkpoint. Items are
  written as torch's FileSystemWriter writes them (`filesystem._write_item`, TORCH_SAVE, no stream transforms)
  and `.metadata` by FileSystemWriter.finish, so Megatron-Core's loader, `checkpoint.load`, export-hf and
  verify-hf read a merged checkpoint like any other.
- The inputs must be one stage's checkpoints with identical metadata: the same tensors, dtypes, global shapes and
  chunks, the same item-to-file assignment, the same layout and model in foldtron.json. Anything else is a
  MergeError naming the checkpoint and the first differing tensor (a merge across layouts would need resharding:
  export, or resume under one layout and save, first).

What is averaged, and what is taken from the newest input (the one the merged checkpoint resumes where):
- averaged: every floating-point tensor of the model (keys `[module.]*{embedding,decoder,output_layer,mtp}.*`,
  expert biases included) and the optimizer's fp32 master copies (`optimizer.state.param.*` of the distributed
  optimizer's fully_reshardable format, `optimizer.state.fp32_param.*` of Megatron's mixed-precision optimizer and
  of distopt's other formats). Resuming reads the master weights, not the model's (bf16) copy, so averaging only
  the model would silently train on from the un-merged weights.
- from the newest input, byte for byte: Adam's moments (`exp_avg`, `exp_avg_sq`: running statistics of the
  trajectory that ends at the newest checkpoint; they go with its step count and bias correction, and the
  averaged weights sit inside the region they describe), step counts, param groups and LR scheduler, RNG, loader
  state, iteration and token counters (the common state), `_extra_state`, and every non-float tensor. So the
  merged checkpoint resumes at the newest input's iteration, data position and LR, with merged weights.
- Exactness: the mean of a tensor is computed in float64 (inputs added oldest first, then divided by K) and
  rounded once to float32: for fp32 tensors the result is the fp32 element-wise mean of the inputs (`equals
  torch.stack([x.double() ...]).mean(0).float()` exactly, which the tests check tensor by tensor). A bf16 / fp16
  tensor is that fp32 mean rounded to its own dtype (round-to-nearest-even, as Megatron's copy of an fp32 master
  into a bf16 parameter rounds).

Where the merge goes: `<save>/merged/<stage>/iter_N` (N: the newest input's iteration) with a `latest` pointer in
`<save>/merged/<stage>`, so `<save>/merged` reads as a run directory (`checkpoint.load=<save>/merged` resumes from
the newest merge) and the stage's own iteration sequence, `latest` and keep_last pruning never see it. `--output`
writes elsewhere; inside an input's stage directory it is refused. An existing output is replaced only when it is
a previous merge output (its foldtron.json has `merge`); anything else is refused before a byte is read. The merge
is written to `<output>.tmp` and renamed when complete, so a failed merge never leaves a complete-looking one.

Ranks: every function here runs on one process or on all ranks of a started process group (the training loop's,
or torchrun around the CLI). Ranks merge disjoint sets of `.distcp` files (balanced by bytes), rank 0 writes
`.metadata` and foldtron.json; every decision is taken on rank 0 and broadcast, and every error reaches every rank,
so no rank waits in a collective for one that failed.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from pretrain import checkpoint as ckpt

#: Under the run directory: `<save>/merged/<stage>/iter_N`. A stage may not be called this (merge_problems).
MERGED_DIR = "merged"
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
_MASTER_MARKERS = ("optimizer.state.param.", "optimizer.state.fp32_param.")


class MergeError(ValueError):
    """Inputs that cannot be merged, or an output that may not be written; the message names the checkpoint,
    the tensor or the option."""


# ----------------------------------------------------------------------------------------------------------
# Which checkpoints

def _tokens_of(info: ckpt.CheckpointInfo) -> int:
    t = info.meta.get("consumed_tokens")
    if not isinstance(t, int):
        raise MergeError(f"checkpoint {info.path} records no consumed_tokens in {ckpt.META}: a token window cannot "
                         "be placed; use --last K")
    return t


def select(run_dir: str | Path, stage: str, *, last: Optional[int] = None, window_tokens: Optional[int] = None,
           until: Optional[int] = None) -> list[ckpt.CheckpointInfo]:
    """The stage's checkpoints to merge, oldest first; the newest is the stage's `latest` (or iteration `until`).

    `last=K`: the newest K complete checkpoints (K >= 2). `window_tokens=W`: every complete checkpoint whose
    consumed tokens lie in (T - W, T], T the newest's; at least two must. Exactly one of them."""
    if (last is None) == (window_tokens is None):
        raise MergeError("give exactly one of --last K and --window-tokens W")
    if last is not None and last < 2:
        raise MergeError(f"--last {last}: a merge averages at least 2 checkpoints")
    if window_tokens is not None and window_tokens <= 0:
        raise MergeError(f"--window-tokens {window_tokens}: the window must be a positive number of tokens")
    sdir = Path(run_dir) / stage
    if not sdir.is_dir():
        there = sorted(p.name for p in Path(run_dir).iterdir() if p.is_dir() and p.name != MERGED_DIR) if Path(run_dir).is_dir() else []
        raise MergeError(f"stage directory {sdir} does not exist (stages in {run_dir}: {', '.join(there) or 'none'})")
    done = [ckpt._info(p, stage) for p in ckpt.complete_checkpoints(sdir)]
    if until is None:
        newest = ckpt.latest(run_dir, stage)
        if newest is None:
            raise MergeError(f"stage directory {sdir} holds no complete checkpoint")
        until = newest.iteration
    pool = [i for i in done if i.iteration <= until]
    if not pool or pool[-1].iteration != until:
        raise MergeError(f"stage directory {sdir} has no complete checkpoint at iteration {until} "
                         f"(it has: {', '.join(i.path.name for i in done) or 'none'})")
    have = ", ".join(f"{i.path.name} ({i.meta.get('consumed_tokens', '?')} tokens)" for i in pool)
    if last is not None:
        if len(pool) < last:
            raise MergeError(f"--last {last}: stage directory {sdir} keeps only {len(pool)} complete checkpoint(s) "
                             f"up to iteration {until}: {have} (checkpoint.keep_last prunes older ones)")
        return pool[-last:]
    end = _tokens_of(pool[-1])
    chosen = [i for i in pool if _tokens_of(i) > end - window_tokens]
    if len(chosen) < 2:
        raise MergeError(f"--window-tokens {window_tokens}: the window ({end - window_tokens}, {end}] tokens ending at "
                         f"{pool[-1].path.name} holds only {len(chosen)} checkpoint of {sdir} (kept: {have}); "
                         "widen the window or save more often (checkpoint.save_interval)")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Reading DCP metadata and items

def _read_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - re-raised naming the checkpoint
        raise MergeError(f"cannot read the DCP metadata of checkpoint {path} ({type(e).__name__}: {e})") from e


def kind(fqn: str, dtype: Optional[torch.dtype]) -> str:
    """'mean' for the tensors a merge averages (model floats, optimizer fp32 master copies), 'newest' for the rest
    (see the module docstring for why)."""
    if dtype is None or not dtype.is_floating_point:
        return "newest"
    if any(m in fqn for m in _MASTER_MARKERS):
        return "mean"
    name = fqn
    while name.startswith("module."):
        name = name[len("module."):]
    return "mean" if name.startswith(_MODEL_PREFIXES) else "newest"


def _describe(md: Any) -> str:
    if hasattr(md, "chunks"):
        return (f"{md.properties.dtype} {tuple(md.size)} in chunks "
                f"{[(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks][:4]}{'...' if len(md.chunks) > 4 else ''}")
    return type(md).__name__


def check_compatible(infos: Sequence[ckpt.CheckpointInfo], metas: Sequence[Any]) -> None:
    """Same stage, layout, world size and model in foldtron.json; the same tensors (dtype, global shape, chunks)
    and the same item-to-file assignment in `.metadata`. Otherwise a MergeError naming the checkpoint and what
    differs from the newest input."""
    ref_info, ref = infos[-1], metas[-1]
    ref_sd = ref.state_dict_metadata
    ref_files = {k: v.relative_path for k, v in ref.storage_data.items()}
    for info, md in zip(infos[:-1], metas[:-1]):
        for field in ("stage", "layout", "world_size", "model"):
            if info.meta.get(field) != ref_info.meta.get(field):
                raise MergeError(f"checkpoint {info.path} has another {field} than {ref_info.path} in {ckpt.META} "
                                 f"({info.meta.get(field)!r} vs {ref_info.meta.get(field)!r}): only checkpoints of "
                                 "one stage, saved under one layout, can be merged")
        sd = md.state_dict_metadata
        for key in sorted(set(sd) ^ set(ref_sd)):
            where, other = (info.path, ref_info.path) if key in sd else (ref_info.path, info.path)
            raise MergeError(f"tensor {key} is in checkpoint {where} but not in {other}: the checkpoints do not "
                             "hold the same model/optimizer")
        for key in ref_sd:
            a, b = sd[key], ref_sd[key]
            if type(a) is not type(b) or (hasattr(a, "chunks") and (
                    a.properties.dtype != b.properties.dtype or a.size != b.size or a.chunks != b.chunks)):
                raise MergeError(f"tensor {key} differs between checkpoint {info.path} ({_describe(a)}) and "
                                 f"{ref_info.path} ({_describe(b)}): the checkpoints were saved under different "
                                 "layouts or models")
        files = {k: v.relative_path for k, v in md.storage_data.items()}
        if files != ref_files:
            bad = next(k for k in ref_files if files.get(k) != ref_files[k])
            raise MergeError(f"checkpoint {info.path} stores {bad.fqn} in {files.get(bad)}, {ref_info.path} in "
                             f"{ref_files[bad]}: the checkpoints were written by different rank layouts")
    for md, info in zip(metas, infos):
        for idx, st in md.storage_data.items():
            if st.transform_descriptors:
                raise MergeError(f"checkpoint {info.path}: item {idx.fqn} is stored through stream transforms "
                                 f"{list(st.transform_descriptors)}, which the merge does not read")


class _Input:
    """One input checkpoint: its storage index and open file handles (read item by item)."""

    def __init__(self, path: Path, md: Any):
        self.path, self.storage = path, md.storage_data
        self._files: dict[str, Any] = {}

    def raw(self, idx) -> bytes:
        st = self.storage[idx]
        f = self._files.get(st.relative_path)
        if f is None:
            f = self._files[st.relative_path] = open(self.path / st.relative_path, "rb")
        f.seek(st.offset)
        data = f.read(st.length)
        if len(data) != st.length:
            raise MergeError(f"checkpoint {self.path}: {st.relative_path} ends inside item {idx.fqn} "
                             f"(offset {st.offset}, length {st.length}): truncated")
        return data

    def tensor(self, idx) -> torch.Tensor:
        try:
            return torch.load(io.BytesIO(self.raw(idx)), map_location=torch.device("cpu"), weights_only=True)
        except MergeError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised naming the item and the checkpoint
            raise MergeError(f"checkpoint {self.path}: item {idx.fqn} of {self.storage[idx].relative_path} does not "
                             f"read as a tensor ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _merge_file(rel: str, items: list, inputs: list[_Input], kinds: dict[str, str], out_dir: Path) -> tuple[dict, dict]:
    """Write `out_dir/rel` from the items the newest input stores in `rel` (in its order): averaged or the newest's
    bytes. Returns ({MetadataIndex: _StorageInfo}, counts). Memory: one item's float64 accumulator, one input's
    copy of it and the result."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    newest = inputs[-1]
    storage: dict = {}
    counts = {"mean": 0, "newest": 0, "mean_bytes": 0, "peak_item_bytes": 0}
    with open(out_dir / rel, "wb") as out:
        for idx in items:
            offset = out.tell()
            if kinds[idx.fqn] == "mean":
                ref = newest.tensor(idx)
                acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
                for inp in inputs:
                    t = ref if inp is newest else inp.tensor(idx)
                    if t.shape != ref.shape or t.dtype != ref.dtype:
                        raise MergeError(f"checkpoint {inp.path}: item {idx.fqn} is {t.dtype} {tuple(t.shape)}, the "
                                         f"newest input's is {ref.dtype} {tuple(ref.shape)}")
                    acc += t
                    del t
                merged = acc.div_(len(inputs)).to(torch.float32).to(ref.dtype)
                del acc
                torch.save(merged, out)  # as filesystem._write_item does for a tensor (TORCH_SAVE)
                counts["mean"] += 1
                counts["mean_bytes"] += merged.numel() * merged.element_size()
                counts["peak_item_bytes"] = max(counts["peak_item_bytes"], merged.numel() * merged.element_size())
                del merged, ref
            else:
                out.write(newest.raw(idx))
                counts["newest"] += 1
            storage[idx] = _StorageInfo(rel, offset, out.tell() - offset)
        out.flush()
        os.fsync(out.fileno())
    return storage, counts


# ----------------------------------------------------------------------------------------------------------
# Collectives that never leave a rank waiting

def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _bcast(value: Any) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0; its result (or its MergeError / CheckpointError, re-raised) on every rank."""
    res, err = None, None
    if _world()[0] == 0:
        try:
            res = fn()
        except (MergeError, ckpt.CheckpointError) as e:
            err = (type(e).__name__, str(e))
        except Exception as e:  # noqa: BLE001 - every rank raises it
            err = ("MergeError", f"{type(e).__name__}: {e}")
    res, err = _bcast((res, err))
    if err is not None:
        raise (ckpt.CheckpointError if err[0] == "CheckpointError" else MergeError)(err[1])
    return res


def _assign(files: dict[str, int], world: int) -> dict[str, int]:
    """Files to ranks, largest first onto the least loaded rank (deterministic)."""
    load = [0] * world
    owner = {}
    for name, size in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += size
    return owner


# ----------------------------------------------------------------------------------------------------------
# Output

def default_output(run_dir: str | Path, stage: str, iteration: int) -> Path:
    return Path(run_dir) / MERGED_DIR / stage / ckpt.iter_name(iteration)


def is_merge_output(path: Path) -> bool:
    try:
        return isinstance(json.loads((Path(path) / ckpt.META).read_text()).get("merge"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def check_output(output: Path, infos: Sequence[ckpt.CheckpointInfo]) -> None:
    """Refuse an output inside an input's stage directory, or an existing path that is not a merge output."""
    out = output.resolve()
    for info in infos:
        if out.parent == info.path.parent.resolve():
            raise MergeError(f"output {output} is inside the stage directory {info.path.parent} of its inputs: a merge "
                             f"does not join the stage's own iteration sequence (default: "
                             f"{info.path.parent.parent / MERGED_DIR / info.stage})")
        if out == info.path.resolve() or info.path.resolve() in out.parents:
            raise MergeError(f"output {output} is (inside) input checkpoint {info.path}")
    ptr = output.parent / "latest"
    if ckpt._ITER.match(output.name) and ptr.is_file():
        named = output.parent / ptr.read_text().strip()
        if named.is_dir() and not is_merge_output(named):
            raise MergeError(f"output {output} would be in {output.parent}, whose `latest` names checkpoint {named}, "
                             "which is not a merge output: that is a stage directory; choose another --output")
    if output.exists() and not (output.is_dir() and is_merge_output(output)):
        raise MergeError(f"output {output} exists and is not a previous merge output (no `merge` in its "
                         f"{ckpt.META}): refusing to overwrite it; choose another --output or remove it")


def _install(tmp: Path, output: Path) -> None:
    """Rename the complete tmp over the output; a previous merge output there is moved aside, then deleted."""
    old = None
    if output.exists():
        old = output.with_name(output.name + ".replaced")
        if old.exists():
            shutil.rmtree(old)
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old)
    if ckpt._ITER.match(output.name):  # a run-directory shape: `latest` makes ckpt.latest(<root>, stage) find it
        ptr = output.parent / "latest.tmp-ptr"
        ptr.write_text(output.name + "\n")
        os.replace(ptr, output.parent / "latest")


def prune(stage_dir: Path, keep_last: int, protect: str) -> list[str]:
    """Delete all but the newest `keep_last` merge outputs in `stage_dir` (only merge outputs; never `protect`)."""
    found = sorted((int(m.group(1)), p) for p in stage_dir.iterdir()
                   if (m := ckpt._ITER.match(p.name)) and p.is_dir() and is_merge_output(p))
    gone = []
    for _, p in found[:-keep_last]:
        if p.name != protect:
            shutil.rmtree(p)
            gone.append(p.name)
    return gone


# ----------------------------------------------------------------------------------------------------------
# The merge

def merge(infos: Sequence[ckpt.CheckpointInfo], output: str | Path, *, verify_inputs: bool = True) -> dict:
    """Write the merge of `infos` (oldest first; at least 2) to `output`; on every rank of the process group, if
    one runs. Returns a report (inputs, counts, bytes, seconds, peak RSS). See the module docstring."""
    t0 = time.perf_counter()
    rank, world = _world()
    infos = list(infos)
    output = Path(output)
    if len(infos) < 2:
        raise MergeError(f"a merge averages at least 2 checkpoints, got {len(infos)}")
    if len({i.path.resolve() for i in infos}) != len(infos):
        raise MergeError(f"the same checkpoint is given twice: {[str(i.path) for i in infos]}")
    _on_rank0(lambda: check_output(output, infos))
    metas, err = [], None
    try:  # every rank reads the metadata (each needs the storage index of its files) and checks it
        metas = [_read_metadata(i.path) for i in infos]
        check_compatible(infos, metas)
    except MergeError as e:
        err = str(e)
    errors = [e for e in ckpt._gather(err) if e]
    if errors:
        raise MergeError(errors[0])
    if verify_inputs:
        for info in infos:
            ckpt.verify_files(info.path, info.meta)  # sha256 of every file, shared over the ranks
    ref = metas[-1]
    kinds = {k: kind(k, getattr(getattr(v, "properties", None), "dtype", None))
             for k, v in ref.state_dict_metadata.items()}
    by_file: dict[str, list] = {}
    for idx, st in sorted(ref.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        by_file.setdefault(st.relative_path, []).append(idx)
    owner = _assign({f: (infos[-1].path / f).stat().st_size for f in by_file}, world)
    tmp = output.with_name(output.name + ".tmp")

    def prepare() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)  # an interrupted earlier merge to this output
        tmp.mkdir(parents=True)

    _on_rank0(prepare)
    if dist.is_initialized() and world > 1:
        dist.barrier()
    inputs = [_Input(i.path, m) for i, m in zip(infos, metas)]
    local: dict = {"storage": {}, "counts": {"mean": 0, "newest": 0, "mean_bytes": 0, "peak_item_bytes": 0},
                   "error": None}
    try:
        for rel, items in by_file.items():
            if owner[rel] == rank:
                st, c = _merge_file(rel, items, inputs, kinds, tmp)
                local["storage"].update(st)
                for k in ("mean", "newest", "mean_bytes"):
                    local["counts"][k] += c[k]
                local["counts"]["peak_item_bytes"] = max(local["counts"]["peak_item_bytes"], c["peak_item_bytes"])
    except Exception as e:  # noqa: BLE001 - gathered, then raised on every rank
        local["error"] = str(e) if isinstance(e, MergeError) else f"{type(e).__name__}: {e}"
    finally:
        for inp in inputs:
            inp.close()
    local["rss"] = _rss_peak_bytes()
    parts = ckpt._gather(local)
    errors = [p["error"] for p in parts if p["error"]]
    if errors:
        _on_rank0(lambda: shutil.rmtree(tmp, ignore_errors=True))
        raise MergeError(f"merging into {output} failed: {errors[0]}")
    counts = {k: sum(p["counts"][k] for p in parts) for k in ("mean", "newest", "mean_bytes")}
    counts["peak_item_bytes"] = max(p["counts"]["peak_item_bytes"] for p in parts)

    def finish_metadata() -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.storage import WriteResult

        storage: dict = {}
        for p in parts:
            storage.update(p["storage"])
        missing = set(ref.storage_data) - set(storage)
        if missing:
            raise MergeError(f"merge into {output}: {len(missing)} item(s) were not written, e.g. {next(iter(missing)).fqn}")
        for f in sorted(infos[-1].path.iterdir()):  # metadata.json (and any other file) of the newest, as it is
            if f.is_file() and f.name not in (".metadata", ckpt.META) and f.name not in by_file:
                shutil.copy2(f, tmp / f.name)
        md = pickle.loads(pickle.dumps(ref))
        writer = FileSystemWriter(str(tmp), sync_files=True)
        writer.reset(str(tmp))
        writer.finish(md, [[WriteResult(index=i, size_in_bytes=s.length, storage_data=s)
                            for i, s in storage.items()]])

    _on_rank0(finish_metadata)
    files = ckpt.file_checksums(tmp)  # every rank hashes its share
    report = {"output": str(output), "inputs": [{"path": str(i.path.resolve()), "iteration": i.iteration,
                                                 "consumed_tokens": i.meta.get("consumed_tokens")} for i in infos],
              "averaged_tensors": counts["mean"], "newest_items": counts["newest"],
              "averaged_bytes": counts["mean_bytes"], "largest_averaged_item_bytes": counts["peak_item_bytes"],
              "checkpoint_bytes": sum(r["bytes"] for r in files.values()),
              "ranks": world, "peak_rss_bytes": max(p["rss"] for p in parts)}

    def finish() -> None:
        meta = {k: v for k, v in infos[-1].meta.items() if k not in ("files", "merge")}
        meta["merge"] = {"method": "element-wise mean (float64 sum oldest first, / K, rounded to fp32 then the "
                                   "tensor's dtype) of model floats and optimizer fp32 masters; everything else "
                                   "from the newest input",
                         "inputs": report["inputs"], "averaged_tensors": counts["mean"],
                         "newest_items": counts["newest"]}
        meta["files"] = files
        (tmp / ckpt.META).write_text(json.dumps(meta, indent=1))
        _install(tmp, output)

    _on_rank0(finish)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------------------
# The run config's schedule

def _stage_tokens_per_save(cfg: Any) -> dict[str, int]:
    """Tokens between two periodic saves, per stage name."""
    from pretrain.stages import stages_and_problems

    stages, _ = stages_and_problems(cfg)
    return {s.name: s.tokens(cfg.checkpoint.save_interval) for s in stages}


def merge_problems(cfg: Any) -> list[str]:
    """Every problem of `cfg.checkpoint.merge` against the run, each naming its stage and field (for `foldtron
    preflight` and the training loop's start): stage names that do not exist, a stage called `merged`, a window
    that holds fewer than 2 saves or more than checkpoint.keep_last keeps, `last` above keep_last, no
    checkpoint.save."""
    m = cfg.checkpoint.merge
    if m.every_tokens is None:
        return []
    problems: list[str] = []
    where = "checkpoint.merge"
    if cfg.checkpoint.save is None:
        problems.append(f"{where}.every_tokens: merges need checkpoint.save (the run directory they read and write)")
    try:
        per_save = _stage_tokens_per_save(cfg)
    except Exception as e:  # noqa: BLE001 - the stages' own errors are reported by their own checks
        return problems + [f"{where}: cannot resolve the stages to check the merge against ({e})"]
    if MERGED_DIR in per_save:
        problems.append(f"stage {MERGED_DIR!r}: this name is reserved for merge outputs (<save>/{MERGED_DIR}); "
                        "rename the stage")
    names = m.stages if m.stages is not None else list(per_save)
    for name in names:
        if name not in per_save:
            problems.append(f"{where}.stages: stage {name!r} does not exist (stages: {', '.join(per_save)})")
    keep = cfg.checkpoint.keep_last
    for name in (n for n in names if n in per_save):
        s = per_save[name]
        if m.window_tokens is not None:
            n = math.ceil(m.window_tokens / s)  # saves inside (T - W, T]
            if n < 2:
                problems.append(f"stage {name}: {where}.window_tokens={m.window_tokens} holds only one save (saves "
                                f"every {s} tokens: checkpoint.save_interval={cfg.checkpoint.save_interval} "
                                "iterations); widen the window or save more often")
            elif n > keep:
                problems.append(f"stage {name}: {where}.window_tokens={m.window_tokens} spans {n} saves (every {s} "
                                f"tokens) but checkpoint.keep_last={keep} keeps only {keep}: raise keep_last to {n} "
                                "or narrow the window")
        if m.last is not None and m.last > keep:
            problems.append(f"stage {name}: {where}.last={m.last} but checkpoint.keep_last={keep} keeps only {keep}")
        if m.every_tokens < s:
            problems.append(f"stage {name}: {where}.every_tokens={m.every_tokens} is below the {s} tokens between "
                            "saves: merges can only follow saves (one per save at most)")
    return problems


def due(cfg: Any, stage: str, consumed_tokens: int) -> bool:
    """Whether a save at `consumed_tokens` is followed by a merge: the stage is scheduled and a multiple of
    every_tokens was crossed since the stage's newest merge (stateless, so a resumed run keeps the schedule)."""
    m = cfg.checkpoint.merge
    if m.every_tokens is None or cfg.checkpoint.save is None or (m.stages is not None and stage not in m.stages):
        return False
    prev = ckpt.latest(Path(cfg.checkpoint.save) / MERGED_DIR, stage)
    before = int(prev.meta.get("consumed_tokens", 0)) if prev is not None else 0
    return consumed_tokens // m.every_tokens > before // m.every_tokens


def after_save(cfg: Any, stage: str, consumed_tokens: int) -> Optional[dict]:
    """Called by the training loop on every rank after each save: merge when the schedule says so (`due`).
    A failed merge is a loud warning, not the end of the run (the save it follows is complete; the merge can be
    redone with `foldtron merge-checkpoints`). Returns the merge report, or None."""
    def plan() -> Optional[list]:
        if not due(cfg, stage, consumed_tokens):
            return None
        m = cfg.checkpoint.merge
        return [str(i.path) for i in select(cfg.checkpoint.save, stage, last=m.last, window_tokens=m.window_tokens)]

    try:
        paths = _on_rank0(plan)
        if paths is None:
            return None
        infos = [ckpt._info(Path(p), stage) for p in paths]
        out = default_output(cfg.checkpoint.save, stage, infos[-1].iteration)
        report = merge(infos, out)
        if cfg.checkpoint.merge.keep_last is not None:
            _on_rank0(lambda: prune(out.parent, cfg.checkpoint.merge.keep_last, out.name))
    except (MergeError, ckpt.CheckpointError) as e:
        ckpt._loud(f"WARNING: [{stage}] scheduled checkpoint merge failed, training goes on: {e}")
        return None
    if _world()[0] == 0:
        print(f" [{stage}] merged {len(infos)} checkpoints ({', '.join(i.path.name for i in infos)}) into {out} "
              f"in {report['seconds']:.1f} s", flush=True)
    return report
