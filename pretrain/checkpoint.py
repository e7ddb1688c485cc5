"""Checkpoints with Megatron-Core `dist_checkpointing`: written atomically, found again after any stop.

Layout of a run directory (`checkpoint.save`):

    <run>/<stage>/iter_0000040/      one dist_checkpointing checkpoint (torch_dist shards + common.pt + ...)
    <run>/<stage>/iter_0000040/foldtron.json   what and where: stage, iteration, layout, tokens (read first);
                                               model config and tokenizer when the run recorded them (record_run)
    <run>/<stage>/latest             the name of the newest complete checkpoint of the stage ("iter_0000040")

A save goes to `iter_N.tmp/`, then (after every rank finished writing) is renamed to `iter_N/`, then `latest`
is replaced (write + os.replace). A crash at any point leaves `latest` naming a complete checkpoint; leftover
`*.tmp` directories are removed at the next save. Only the newest `keep_last` checkpoints of a stage are kept.

Contents: the model's sharded_state_dict (one entry per model chunk under interleaved pipelining, named as
Megatron-LM names them), the optimizer's (Megatron's "fully_reshardable" format, so it reloads under
another TP/PP/EP/DP layout), and common state: the LR scheduler, the loader state, step, consumed samples and
tokens, NaN-skip counters. RNG states of every kind (python, numpy, torch CPU, CUDA, Megatron's model-parallel
tracker) are saved per rank as sharded objects; they are restored when the layout is unchanged and reseeded
from (seed, iteration) otherwise, since RNG streams have no meaning across a different rank layout.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from model.adapt import optimizer_state

log = logging.getLogger(__name__)
META = "foldtron.json"
_ITER = re.compile(r"^iter_(\d{7,})$")


#: What the run records in every checkpoint's foldtron.json besides its own position (`record_run`).
_run_meta: dict = {}


def record_run(cfg: Any) -> None:
    """Write the run's model config and tokenizer into the foldtron.json of every checkpoint this process saves
    from now on, so a checkpoint is exportable on its own (`foldtron export-hf --checkpoint DIR`, no --config).
    The tokenizer path is made absolute: the export may run from another directory."""
    tok = cfg.data.tokenizer
    _run_meta.clear()
    _run_meta.update(model=cfg.model.model_dump(mode="json"),
                     tokenizer=None if tok is None else str(Path(tok).resolve()))


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class CheckpointInfo:
    path: Path
    stage: str
    iteration: int
    meta: dict


def latest(run_dir: Optional[str | Path], stage: str) -> Optional[CheckpointInfo]:
    """The checkpoint of `stage` in `run_dir` to resume from: the one its `latest` pointer names, or None if the
    stage saved none. A pointer to a missing or incomplete checkpoint (deleted, truncated file, unreadable
    foldtron.json), or a stage holding checkpoints without a pointer, falls back to the newest complete one with
    a loud warning; with none left it is a CheckpointError saying so, never a silent restart at iteration 0."""
    if run_dir is None:
        return None
    sdir = Path(run_dir) / stage
    ptr = sdir / "latest"
    if ptr.is_file():
        name = ptr.read_text().strip()
        problem = incomplete(sdir / name) if _ITER.match(name) else "is not a checkpoint name (iter_NNNNNNN)"
        if problem is None:
            return _info(sdir / name, stage)
        what = f"checkpoint pointer {ptr} names {name!r}, which {problem}"
    elif sdir.is_dir():
        what = f"stage directory {sdir} has no `latest` pointer"
    else:
        return None
    done = complete_checkpoints(sdir)
    if not done:
        if not ptr.is_file():
            return None  # only interrupted writes (*.tmp): the stage never finished a save
        raise CheckpointError(f"{what}, and {sdir} holds no other complete checkpoint; to restart the stage from "
                              f"iteration 0, remove {ptr}")
    _loud(f"WARNING: {what}; resuming from the newest complete checkpoint instead: {done[-1]}")
    return _info(done[-1], stage)


# ----------------------------------------------------------------------------------------------------------
# Integrity and locking: per-file checksums written at save and verified at load, readable errors naming the
# file, the newest complete checkpoint as the fallback, one writer per checkpoint directory.

#: In the run directory (`checkpoint.save`): flock'd by the run that writes there, holding its host and pid.
LOCK_NAME = ".foldtron.lock"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or unreadable; the message names the file."""


class RunLockError(RuntimeError):
    """The checkpoint directory is held by another run; the message names its host and pid."""


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _loud(msg: str) -> None:
    log.warning(msg)
    if _is_rank0():
        import sys

        print(msg, file=sys.stderr, flush=True)


def read_meta(path: Path) -> dict:
    """The foldtron.json of checkpoint `path`, or a CheckpointError naming the file."""
    f = Path(path) / META
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata {f} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int):
        raise CheckpointError(f"checkpoint metadata {f} has no integer `iteration`: not a Foldtron checkpoint file")
    return meta


def _info(path: Path, stage: str) -> CheckpointInfo:
    meta = read_meta(path)
    return CheckpointInfo(path, stage, int(meta["iteration"]), meta)


def incomplete(path: Path) -> Optional[str]:
    """Why checkpoint `path` cannot be resumed from (cheap: existence, foldtron.json, recorded file sizes), or
    None. Checksums are verified at load (`verify_files`)."""
    if not path.is_dir():
        return "does not exist"
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return f"is incomplete: {e}"
    for name, rec in sorted(meta.get("files", {}).items()):
        f = path / name
        if not f.is_file():
            return f"is incomplete: {f} is missing"
        if f.stat().st_size != rec["bytes"]:
            return f"is incomplete: {f} has {f.stat().st_size} bytes, {META} records {rec['bytes']} (truncated?)"
    return None


def complete_checkpoints(sdir: Path) -> list[Path]:
    """The stage's checkpoints that pass `incomplete`, oldest first."""
    found = sorted((int(m.group(1)), p) for p in sdir.iterdir() if (m := _ITER.match(p.name)) and p.is_dir())
    return [p for _, p in found if incomplete(p) is None]


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _files_of(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != META)


def _my_share(names: list[str]) -> list[str]:
    """Files this rank hashes: every world-th one, so a checkpoint is hashed once, by all ranks in parallel."""
    if not dist.is_initialized():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def _gather(local: Any) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def file_checksums(path: Path) -> dict:
    """{file: {"bytes", "sha256"}} of every file of the written checkpoint `path` (all ranks call it; each hashes
    its share); recorded in foldtron.json by `save`."""
    names = _files_of(Path(path))
    local = {n: {"bytes": (Path(path) / n).stat().st_size, "sha256": _sha256(Path(path) / n)} for n in _my_share(names)}
    merged: dict = {}
    for part in _gather(local):
        merged.update(part)
    return dict(sorted(merged.items()))


def verify_files(path: Path, meta: dict) -> None:
    """Every file recorded in `meta["files"]` is present with its size and sha256 (all ranks call it; each
    hashes its share); otherwise a CheckpointError on every rank naming the files and the older complete
    checkpoints to go back to. A checkpoint saved before checksums were recorded is loaded with a warning."""
    path = Path(path)
    files = meta.get("files")
    if files is None:
        _loud(f"WARNING: checkpoint {path} records no file checksums (saved by an older Foldtron): not verified")
        return
    problems = []
    for name in _my_share(sorted(files)):
        f, rec = path / name, files[name]
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != rec["bytes"]:
            problems.append(f"{f} has {f.stat().st_size} bytes, {META} records {rec['bytes']} (truncated?)")
        elif _sha256(f) != rec["sha256"]:
            problems.append(f"{f} does not match its sha256 in {META}: the file changed or is corrupt")
    problems = sorted(p for part in _gather(problems) for p in part)
    if problems:
        older = [p.name for p in complete_checkpoints(path.parent) if p != path] if path.parent.is_dir() else []
        hint = (f"; the stage's other complete checkpoints: {', '.join(older)} (point {path.parent / 'latest'} at "
                "one of them to resume from it)") if older else ""
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems[:5])
                              + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "") + hint)


class RunLock:
    """An exclusive flock on `<save>/.foldtron.lock`, held by rank 0 for the whole run (released by the kernel if
    the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _take_lock(save_dir: Path) -> RunLock:
    import fcntl
    import socket
    import sys
    import time

    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise RunLockError(
            f"checkpoint directory {save_dir} is in use by another run: pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')} (since {holder.get('started', '?')}: {holder.get('command', '?')}). Two runs "
            f"writing one checkpoint directory corrupt each other's checkpoints; wait for it or stop it, or set "
            f"another checkpoint.save (lock file {path})") from None
    except OSError as e:  # a filesystem without flock (Lustre mounted without -o flock, some NFS): run unlocked
        os.close(fd)
        _loud(f"WARNING: cannot lock {path} ({e}): this filesystem does not support flock, so a second run on "
              f"{save_dir} would not be refused; make sure only one run writes there")
        return RunLock(path, None)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return RunLock(path, fd)


def acquire_run_lock(save_dir: Optional[str | Path]) -> Optional[RunLock]:
    """Lock the run's checkpoint directory for this run (None without checkpoint.save). Rank 0 takes the lock;
    every rank raises the same RunLockError, naming the holder's host and pid, when another run holds it."""
    if save_dir is None:
        return None
    lock, err = None, None
    if _is_rank0():
        try:
            lock = _take_lock(Path(save_dir))
        except (RunLockError, OSError) as e:  # held by another run, or the directory cannot be created
            err = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise RunLockError(err)
    return lock


def release_run_lock(lock: Optional[RunLock]) -> None:
    if lock is not None:
        lock.release()


# ----------------------------------------------------------------------------------------------------------
# RNG

def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def reseed(seed: int, iteration: int) -> None:
    """New, layout-consistent RNG streams after a resume under another layout."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    s = seed + 100003 * iteration
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    model_parallel_cuda_manual_seed(s)


# ----------------------------------------------------------------------------------------------------------
# Sharded state dicts

def _layout_key(layout: Any, world: int) -> dict:
    return {"layout": layout.model_dump(mode="json"), "world_size": world}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / Float16Module: its state-dict names are the checkpoint's (no `module.` prefix)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _model_key(model: Sequence, i: int) -> str:
    """Megatron-LM's state-dict entry names: `model` for one chunk, `model0`, `model1`, ... for virtual stages."""
    return "model" if len(model) == 1 else f"model{i}"


def _sharded(model: Sequence, optimizer: Any, *, loading: bool, with_rng: bool, with_optimizer: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # DDP's sharded_state_dict names entries `module.<name>` (the names the optimizer looks parameters up by);
    # the sharded keys inside, i.e. the checkpoint's, carry no prefix and are global (layer numbers, not a
    # chunk's local indices), so the entry names below do not matter to the checkpoint: a pp2-vpp2 save loads
    # at pp1 and back.
    sd: dict[str, Any] = {_model_key(model, i): chunk.sharded_state_dict() for i, chunk in enumerate(model)}
    if with_optimizer:
        # As Megatron-LM's generate_state_dict: the optimizer finds its parameters among all chunks' entries.
        with optimizer_state.empty_expert_optimizer_step(optimizer), optimizer_state.unpadded_param_index_maps(optimizer):
            sd["optimizer"] = optimizer.sharded_state_dict(
                dict(sd), is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        sd["rng_state"] = ShardedObject("rng_state", None if loading else rng_state(), (world,), (rank,),
                                        replica_id=0)
    return sd


def save(run_dir: str | Path, stage: str, iteration: int, model: Sequence, optimizer: Any, *, common: dict,
         layout: Any, keep_last: int, protect: Sequence[str] = ()) -> Path:
    """Write `<run_dir>/<stage>/iter_N` atomically on all ranks; returns its path."""
    from megatron.core import dist_checkpointing

    sdir = Path(run_dir) / stage
    final = sdir / iter_name(iteration)
    tmp = sdir / (iter_name(iteration) + ".tmp")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        sdir.mkdir(parents=True, exist_ok=True)
        for stale in sdir.glob("*.tmp"):
            shutil.rmtree(stale)  # an interrupted earlier write
        if final.exists():  # re-saving an iteration (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        tmp.mkdir()
    dist.barrier()
    sd = _sharded(model, optimizer, loading=False, with_rng=True, with_optimizer=True)
    sd["common"] = dict(common, iteration=iteration, stage=stage, **_layout_key(layout, world))
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    files = file_checksums(tmp)  # every rank hashes its share of the written files
    if rank == 0:
        meta = {"stage": stage, "iteration": iteration, "world_size": world,
                "layout": layout.model_dump(mode="json"),
                **{k: common[k] for k in ("consumed_samples", "consumed_tokens") if k in common}, **_run_meta,
                "files": files}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.replace(tmp, final)
        ptr_tmp = sdir / "latest.tmp-ptr"
        ptr_tmp.write_text(final.name + "\n")
        os.replace(ptr_tmp, sdir / "latest")
        _prune(sdir, keep_last, protect=set(protect) | {final.name})
    dist.barrier()
    return final


def _prune(sdir: Path, keep_last: int, protect: set[str]) -> None:
    done = sorted((int(m.group(1)), p) for p in sdir.iterdir() if (m := _ITER.match(p.name)) and (p / META).is_file())
    for _, p in done[:-keep_last]:
        if p.name not in protect:
            shutil.rmtree(p)


def _ensure_optimizer_state(optimizer: Any) -> None:
    """A fresh torch Adam has no per-parameter state until its first step, but Megatron's DistributedOptimizer
    reads 'step' from that state to build its loading state dict (optimizer/distrib_optimizer.py:640, the
    non-apex/TE path taken on CPU) and needs the tensors to load into. Empty states get zeros and step 0; the
    load then overwrites all of them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if len(st) == 0:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)



def _retarget_lr_bounds(opt_state: Any, fresh: list[dict]) -> None:
    """Megatron-Core 0.19 pairs saved and current param groups by an identifier tuple that includes `max_lr` and
    `min_lr` (optimizer/optimizer.py:139 param_group_identifier_keys; distrib_optimizer.py:969 raises KeyError when
    none matches). A new stage with another LR has other bounds, so the saved groups take the new stage's before
    loading (the moments are what a new stage keeps; its LR bounds are its own)."""
    bounds = {tuple(sorted(f.items())) for f in fresh}
    if not bounds:
        return
    if len(bounds) > 1:
        raise CheckpointError(f"the new stage's optimizer has param groups with different LR bounds {sorted(bounds)}; "
                              "cannot tell which saved group each one continues")
    (new,) = bounds

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            groups = obj.get("param_groups")
            if isinstance(groups, list):
                for g in groups:
                    if isinstance(g, dict):
                        g.update(dict(new))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(opt_state)


def load(info: CheckpointInfo, model: Sequence, optimizer: Any, *, layout: Any, full: bool) -> dict:
    """Load `info` into model (and optimizer); returns its common state.

    full=True: resume the same stage (RNG restored when the layout is the same). full=False: start a new stage
    from this one's final weights and optimizer moments (scheduler, loader and step are the new stage's)."""
    from megatron.core import dist_checkpointing

    world = dist.get_world_size()
    verify_files(info.path, info.meta)  # sizes and sha256 of every file, before any byte is loaded
    _ensure_optimizer_state(optimizer)
    same_layout = info.meta.get("world_size") == world and info.meta.get("layout") == layout.model_dump(mode="json")
    sd = _sharded(model, optimizer, loading=True, with_rng=full and same_layout, with_optimizer=True)
    try:
        state = dist_checkpointing.load(sd, str(info.path))
    except Exception as e:  # torch's reader says EOFError / "unpickling" without the path
        raise CheckpointError(f"reading checkpoint {info.path} failed ({type(e).__name__}: {e})") from e
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict({_strip(k): v for k, v in state[_model_key(model, i)].items()})
    # Param groups carry their own max_lr/min_lr (Megatron's scheduler prefers them to its own); a new stage
    # keeps the moments from the checkpoint but its own LR bounds.
    fresh = [{k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in optimizer.param_groups]
    if not full:
        _retarget_lr_bounds(state["optimizer"], fresh)
    with optimizer_state.torch_adam_step():
        optimizer.load_state_dict(state["optimizer"])
    optimizer_state.unshare_adam_steps(optimizer)
    if not full:
        for g, f in zip(optimizer.param_groups, fresh):
            g.update(f)
    if "rng_state" in state:
        set_rng_state(state["rng_state"])
    common = state.get("common", {})
    common["_rng_restored"] = "rng_state" in state
    return common
