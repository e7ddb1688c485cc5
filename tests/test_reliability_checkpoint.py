"""Checkpoint integrity, discovery and locking (issue 20), at the file level with real Megatron-Core
dist_checkpointing files (one gloo process, no model): per-file sha256 recorded at save and verified at load (a
flipped bit inside a tensor is an error naming the file), truncated `.distcp` / foldtron.json named, a `latest`
pointing at a deleted or incomplete checkpoint falls back loudly to the newest complete one, and a second run on
one checkpoint directory is refused naming the holder's host and pid."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gloo():
    """One gloo process with the CPU adaptation a real run gets (dist_checkpointing's CPU save path)."""
    from model.build import init_single_process

    init_single_process()


def _tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(4096, generator=g)}


def _sharded(tensors: dict) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    return {k: ShardedTensor.from_rank_offsets(f"model.{k}", v, replica_id=0) for k, v in tensors.items()}


def _save(sdir: Path, iteration: int, seed: int) -> Path:
    """What checkpoint.save does around dist_checkpointing.save: write, hash, foldtron.json, rename, pointer."""
    from megatron.core import dist_checkpointing

    tmp = sdir / f"iter_{iteration:07d}.tmp"
    tmp.mkdir(parents=True)
    dist_checkpointing.save(_sharded(_tensors(seed)), str(tmp))
    files = ckpt.file_checksums(tmp)
    (tmp / ckpt.META).write_text(json.dumps({"stage": sdir.name, "iteration": iteration, "files": files}))
    final = sdir / ckpt.iter_name(iteration)
    os.replace(tmp, final)
    (sdir / "latest").write_text(final.name + "\n")
    return final


def _load(info: ckpt.CheckpointInfo) -> dict:
    from megatron.core import dist_checkpointing

    ckpt.verify_files(info.path, info.meta)
    empty = {k: torch.zeros_like(v) for k, v in _tensors(0).items()}
    return dist_checkpointing.load(_sharded(empty), str(info.path))


def _distcp(path: Path) -> Path:
    files = sorted(path.glob("*.distcp"))
    assert files, sorted(p.name for p in path.iterdir())
    return max(files, key=lambda p: p.stat().st_size)


def test_checksums_recorded_and_a_flipped_bit_is_named(gloo, tmp_path):
    sdir = tmp_path / "run" / "phase1"
    final = _save(sdir, 10, seed=1)
    meta = json.loads((final / ckpt.META).read_text())
    assert _distcp(final).name in meta["files"] and ".metadata" in meta["files"]
    info = ckpt.latest(tmp_path / "run", "phase1")
    got = _load(info)
    assert torch.equal(got["w"], _tensors(1)["w"])
    # 64 flipped bits in the middle of the tensor data: same size, so only the checksum can tell
    f = _distcp(final)
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    for i in range(8):
        raw[mid + i] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match=rf"{f} does not match its sha256"):
        _load(ckpt.latest(tmp_path / "run", "phase1"))


def test_truncated_distcp_falls_back_to_the_newest_complete_checkpoint(gloo, tmp_path, capsys):
    sdir = tmp_path / "run" / "phase1"
    older = _save(sdir, 10, seed=1)
    newer = _save(sdir, 20, seed=2)
    f = _distcp(newer)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    info = ckpt.latest(tmp_path / "run", "phase1")
    assert info.path == older and info.iteration == 10
    err = capsys.readouterr().err
    assert "WARNING" in err and f"{f} has" in err and "truncated" in err and str(older) in err
    assert torch.equal(_load(info)["w"], _tensors(1)["w"])
    # loading the truncated one anyway (e.g. export of that directory) names the file
    with pytest.raises(ckpt.CheckpointError, match=rf"{f} has \d+ bytes.*truncated.*other complete checkpoints: "
                                                   r"iter_0000010"):
        ckpt.verify_files(newer, json.loads((newer / ckpt.META).read_text()))


def test_latest_pointing_at_a_deleted_directory(gloo, tmp_path, capsys):
    import shutil

    sdir = tmp_path / "run" / "phase1"
    older = _save(sdir, 10, seed=1)
    newer = _save(sdir, 20, seed=2)
    shutil.rmtree(newer)
    info = ckpt.latest(tmp_path / "run", "phase1")
    assert info.path == older and info.iteration == 10  # not a restart at iteration 0
    assert "names 'iter_0000020', which does not exist; resuming from the newest complete" in capsys.readouterr().err
    shutil.rmtree(older)
    with pytest.raises(ckpt.CheckpointError, match=r"holds no other complete checkpoint; to restart the stage"):
        ckpt.latest(tmp_path / "run", "phase1")
    # checkpoints but no pointer (a crash right after the first rename): the newest complete one, loudly
    again = _save(sdir, 30, seed=3)
    (sdir / "latest").unlink()
    assert ckpt.latest(tmp_path / "run", "phase1").path == again
    assert "has no `latest` pointer" in capsys.readouterr().err
    assert ckpt.latest(tmp_path / "run", "phase2") is None


def test_truncated_foldtron_json_is_named(gloo, tmp_path, capsys):
    sdir = tmp_path / "run" / "phase1"
    older = _save(sdir, 10, seed=1)
    newer = _save(sdir, 20, seed=2)
    meta = newer / ckpt.META
    meta.write_text(meta.read_text()[:40])
    assert ckpt.latest(tmp_path / "run", "phase1").path == older
    assert f"checkpoint metadata {meta} is unreadable (JSONDecodeError" in capsys.readouterr().err
    from pretrain.export_hf import resolve_checkpoint

    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint metadata {meta} is unreadable"):
        resolve_checkpoint(newer)


def test_export_verifies_checksums_before_reading(gloo, tmp_path):
    from pretrain.export_hf import export_hf

    final = _save(tmp_path / "run" / "phase1", 10, seed=1)
    f = _distcp(final)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match=rf"{f} does not match its sha256"):
        export_hf(final, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


HOLDER = """
import sys, time
from pretrain import checkpoint as ckpt
lock = ckpt.acquire_run_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_on_one_checkpoint_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.RunLockError, match=rf"{run} is in use by another run: pid {p.pid} on host "
                                                    rf"{socket.gethostname()}"):
            ckpt.acquire_run_lock(run)
        p.send_signal(signal.SIGKILL)  # a killed run leaves no stale lock: the kernel drops the flock
        p.wait(timeout=30)
        lock = ckpt.acquire_run_lock(run)
        assert json.loads((run / ckpt.LOCK_NAME).read_text())["pid"] == os.getpid()
        ckpt.release_run_lock(lock)
        ckpt.release_run_lock(ckpt.acquire_run_lock(run))  # released: taken again at once
        assert ckpt.acquire_run_lock(None) is None  # no checkpoint.save, nothing to lock
    finally:
        if p.poll() is None:
            p.kill()
        time.sleep(0)


def _two_rank_save_and_verify(root: str) -> dict:
    """On each of 2 ranks: save a row-sharded tensor, hash (each rank its share), verify, then verify again
    after rank 0 flipped a byte in one file: every rank must raise, with the same message (else a hang)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from model import adapt

    adapt.apply()
    rank = dist.get_rank()
    d = Path(root) / "iter_0000002"
    if rank == 0:
        d.mkdir(parents=True)
    dist.barrier()
    local = torch.full((256, 16), float(rank))
    sd = {"w": ShardedTensor.from_rank_offsets("w", local, (0, rank, 2), replica_id=0)}
    dist_checkpointing.save(sd, str(d))
    dist.barrier()
    files = ckpt.file_checksums(d)
    ckpt.verify_files(d, {"files": files})
    dist.barrier()
    if rank == 0:
        f = max(d.glob("*.distcp"), key=lambda p: p.stat().st_size)
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 1
        f.write_bytes(bytes(raw))
    dist.barrier()
    try:
        ckpt.verify_files(d, {"files": files})
        err = None
    except ckpt.CheckpointError as e:
        err = str(e)
    return {"files": files, "error": err}


@pytest.mark.multiproc
def test_checksums_on_two_ranks(tmp_path):
    from tests.distributed import run_on_ranks

    r0, r1 = run_on_ranks(_two_rank_save_and_verify, 2, str(tmp_path))
    d = tmp_path / "iter_0000002"
    flipped = max(d.glob("*.distcp"), key=lambda p: p.stat().st_size)
    assert r0["files"] == r1["files"] and sum(n.endswith(".distcp") for n in r0["files"]) == 2
    assert all(r0["files"][n]["sha256"] == ckpt._sha256(d / n) for n in r0["files"] if n != flipped.name)
    assert r0["error"] == r1["error"] and f"{flipped} does not match its sha256" in r0["error"]
