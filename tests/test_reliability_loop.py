"""Issue 20, the training-loop items: an NVFP4 run with stochastic rounding resumes bit-identically (the SR
stream is positioned by the training step, not by a running count), and no checkpoint is written inside a NaN
streak (the last good ones are kept)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.preset=tiny", "data.mock=true", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.lr_decay_style=constant", "train.lr_warmup_iters=0",
        "logging.peak_tflops_per_device=1.0", "checkpoint.save_interval=2", "checkpoint.keep_last=3"]
pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def _train(run_dir, *extra):
    summary = Path(str(run_dir) + f".{len(extra)}.json")
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", *BASE, f"checkpoint.save={run_dir}", *extra,
                        "--summary", str(summary)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    return r, (json.loads(summary.read_text()) if summary.exists() else None)


def test_nvfp4_with_stochastic_rounding_resumes_bit_identically(tmp_path):
    nv = ["precision.recipe=nvfp4"]
    r, whole = _train(tmp_path / "a", *nv, "train.train_iters=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A fresh process resumes from the iteration-2 checkpoint (its SR stream starts a new running count there).
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "main" / "iter_0000004")
    (b / "main" / "latest").write_text("iter_0000002\n")
    r, resumed = _train(b, *nv, "train.train_iters=4", "train.seed=1234")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (a,), (b,) = whole["stages"], resumed["stages"]
    assert b["resumed_from"] == 2
    assert b["losses"] == a["losses"][2:], (a["losses"], b["losses"])  # bit-identical, SR on


def test_no_checkpoint_inside_a_nan_streak(tmp_path):
    """lr=1e30 makes the first update overflow: every later step is non-finite and skipped. The periodic saves
    inside the streak are refused, so keep_last never rotates the good checkpoint out."""
    r, _ = _train(tmp_path / "run", "precision.recipe=fp32", "train.train_iters=8", "train.lr=1e30",
                  "train.max_consecutive_nan_skips=20")
    text = r.stdout + r.stderr
    assert "not saving during a non-finite streak" in text, text[-3000:]
    stage = tmp_path / "run" / "main"
    saved = sorted(p.name for p in stage.glob("iter_*"))
    assert "iter_0000002" in saved or "iter_0000008" in saved
