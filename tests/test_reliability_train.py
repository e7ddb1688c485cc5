"""Issue 20 through `foldtron train` itself (tiny model, synthetic data, 1 gloo rank): a second run on one
checkpoint directory is refused naming the first's pid and host; flipped bits in a saved tensor stop the resume
with an error naming the file; a `latest` pointing at a deleted checkpoint resumes from the newest complete one
(not iteration 1); `checkpoint.load` that does not exist fails before training."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.preset=tiny", "data.mock=true", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.train_iters=4", "train.lr_warmup_iters=1", "precision.recipe=fp32",
        "logging.peak_tflops_per_device=1.0", "checkpoint.save_interval=2", "checkpoint.keep_last=3"]
pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.multiproc]


def _cmd(run_dir, *extra, summary=None):
    cmd = [sys.executable, "-m", "pretrain.cli", "train", *BASE, f"checkpoint.save={run_dir}", *extra]
    return cmd + (["--summary", str(summary)] if summary else [])


def _run(run_dir, *extra):
    summary = Path(str(run_dir) + ".json")
    summary.unlink(missing_ok=True)
    r = subprocess.run(_cmd(run_dir, *extra, summary=summary), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    return r, (json.loads(summary.read_text()) if summary.is_file() else None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("t") / "run"
    r, summary = _run(d)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (d / "main").glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    return d, summary["stages"][0]


def test_second_run_on_one_checkpoint_directory(tmp_path):
    d = tmp_path / "run"
    first = subprocess.Popen(_cmd(d, "train.train_iters=100000", "checkpoint.save_interval=100000"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in first.stdout:  # training has started: the lock is held
            if "iteration        2/" in line:
                break
        else:
            pytest.fail(f"first run ended early (rc {first.wait()})")
        r, _ = _run(d)
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in r.stderr
        assert first.poll() is None  # the first run is untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    r, summary = _run(d, "train.train_iters=2")  # the killed run left no stale lock
    assert r.returncode == 0, r.stderr[-3000:]


def test_flipped_bits_in_a_checkpoint_stop_the_resume(trained, tmp_path):
    d0, _ = trained
    d = tmp_path / "run"
    shutil.copytree(d0, d)
    it = d / "main" / "iter_0000004"
    assert "files" in json.loads((it / "foldtron.json").read_text())
    f = max(it.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    for i in range(8):
        raw[len(raw) // 2 + i] ^= 0xFF
    f.write_bytes(bytes(raw))
    r, _ = _run(d, "train.train_iters=6")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"{f} does not match its sha256" in r.stderr and "iter_0000002" in r.stderr


def test_latest_pointing_at_a_deleted_checkpoint_resumes_from_the_newest_complete(trained, tmp_path):
    d0, a = trained
    d = tmp_path / "run"
    shutil.copytree(d0, d)
    shutil.rmtree(d / "main" / "iter_0000004")
    r, summary = _run(d)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary["stages"][0]
    assert s["resumed_from"] == 2 and s["iterations"] == [3, 4]
    assert s["losses"] == a["losses"][2:]
    assert "names 'iter_0000004', which does not exist; resuming from the newest complete" in r.stderr


def test_checkpoint_load_that_does_not_exist_fails_before_training(tmp_path):
    t0 = time.time()
    r, _ = _run(tmp_path / "run", "checkpoint.load=/no/such/run")
    assert r.returncode == 2 and "checkpoint.load: /no/such/run does not exist" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists() and time.time() - t0 < 120
