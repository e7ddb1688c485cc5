"""The training loop end to end through `foldtron train --nproc N` (gloo ranks on 127.0.0.1, tiny hybrid model
with 2 MTP depths, synthetic data): determinism, bit-identical resume after kill -9, a crash inside a checkpoint
write, resume under another layout, the three-stage example and its TensorBoard scalars served by a real
tensorboard, and an emulated-NVFP4 run with quantization telemetry."""
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.preset=tiny", "data.mock=true", "train.seq_length=32",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.train_iters=6", "train.lr_warmup_iters=1",
        "precision.recipe=fp32", "logging.peak_tflops_per_device=1.0", "checkpoint.save_interval=2",
        "checkpoint.keep_last=2"]
pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _cmd(run_dir, *extra, nproc=2, summary=None):
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--nproc", str(nproc), *BASE,
           f"checkpoint.save={run_dir}", *extra]
    return cmd + (["--summary", str(summary)] if summary else [])


def _train(run_dir, *extra, nproc=2):
    summary = Path(str(run_dir) + ".json")
    r = subprocess.run(_cmd(run_dir, *extra, nproc=nproc, summary=summary), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(summary.read_text()), r.stdout


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    d = tmp_path_factory.mktemp("a") / "run"
    summary, _ = _train(d)
    return d, summary["stages"][0]


def test_two_runs_identical(run_a, tmp_path):
    _, a = run_a
    summary, out = _train(tmp_path / "b")
    assert summary["stages"][0]["losses"] == a["losses"]
    assert a["iterations"] == [1, 2, 3, 4, 5, 6]
    assert "lm loss:" in out and "consumed tokens:" in out  # Megatron-style line


def test_kill9_resume_is_bit_identical(run_a, tmp_path):
    _, a = run_a
    d = tmp_path / "k"
    kill_at = random.Random(os.getpid()).randint(3, 5)
    p = subprocess.Popen(_cmd(d), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    try:
        for line in p.stdout:
            if f"iteration {kill_at:8d}/" in line:
                os.killpg(p.pid, signal.SIGKILL)
                break
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    saved = (d / "main" / "latest").read_text().strip()
    resumed_at = int(saved.split("_")[1])
    assert resumed_at < 6
    summary, out = _train(d)
    s = summary["stages"][0]
    assert s["resumed_from"] == resumed_at and f"resumed from {d / 'main' / saved}" in out
    assert s["iterations"] == list(range(resumed_at + 1, 7))
    assert s["losses"] == a["losses"][resumed_at:]  # bit-identical


# A process that dies right after dist_checkpointing wrote iteration 4's shards, before the rename. The main guard
# matters: the torch_dist writer starts helper processes with `spawn`, which re-imports the main module.
_CRASH = """
import os, sys

def main():
    from megatron.core import dist_checkpointing
    orig = dist_checkpointing.save

    def save(sd, path, *a, **k):
        orig(sd, path, *a, **k)            # shards written into iter_N.tmp, not yet renamed
        if path.endswith("iter_0000004.tmp"):
            os._exit(9)
    dist_checkpointing.save = save
    from pretrain.cli import main as cli
    return cli(sys.argv[1:])

if __name__ == "__main__":
    sys.exit(main())
"""


def test_crash_during_checkpoint_write_resumes_from_previous(run_a, tmp_path):
    _, a = run_a
    d = tmp_path / "c"
    base = _cmd(d, nproc=1)[3:]  # single process: no --nproc
    base.remove("--nproc"), base.remove("1")
    script = tmp_path / "crash_in_save.py"
    script.write_text(_CRASH)
    log = tmp_path / "crash.log"
    with open(log, "w") as out:  # a file, not a pipe: the dead process's writer helpers may still hold a pipe
        p = subprocess.Popen([sys.executable, str(script), *base], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=600)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # helpers orphaned by the crash
            except ProcessLookupError:
                pass
    assert rc == 9, log.read_text()[-2000:]
    assert (d / "main" / "iter_0000004.tmp").is_dir() and (d / "main" / "latest").read_text().strip() == "iter_0000002"
    summary, _ = _train(d, nproc=1)
    s = summary["stages"][0]
    assert s["resumed_from"] == 2 and s["iterations"] == [3, 4, 5, 6]
    assert not list((d / "main").glob("*.tmp"))
    # one rank with the same global batch reproduces the 2-rank run up to float summation order
    assert s["losses"] == pytest.approx(a["losses"][2:], abs=1e-5)


def test_resume_under_another_layout(run_a, tmp_path):
    d0, a = run_a
    d = tmp_path / "l"
    shutil.copytree(d0, d)
    shutil.rmtree(d / "main" / "iter_0000006")
    (d / "main" / "latest").write_text("iter_0000004\n")
    summary, out = _train(d, "parallel.tp=2", "parallel.sequence_parallel=true")
    s = summary["stages"][0]
    assert "new layout" in out and s["iterations"] == [5, 6] and s["layout"]["tp"] == 2
    assert s["losses"] == pytest.approx(a["losses"][4:], abs=1e-5)


SCALARS = ["lm loss", "mtp loss", "mtp_1 loss", "learning-rate",
           "grad-norm", "params-norm", "batch-size", "iteration-time", "throughput",
           "mfu", "tokens-per-sec", "consumed-tokens", "mem-allocated-bytes", "mem-max-allocated-bytes",
           "seq_load_balancing_loss"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_stages_and_tensorboard(tmp_path):
    d = tmp_path / "tiny"
    summary_file = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--config", "examples/configs/tiny.yaml",
                        "--nproc", "2", f"checkpoint.save={d}", f"logging.tensorboard_dir={d}/tb",
                        "--summary", str(summary_file)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    names = [s["name"] for s in summary["stages"]]
    assert names == ["phase1", "phase2", "long-context"] and all(s["completed"] for s in summary["stages"])
    assert summary["stages"][1]["started_from"].endswith("phase1/iter_0000006")
    assert summary["stages"][2]["layout"]["cp"] == 2
    assert summary["consumed_tokens"] == 6 * 8 * 32 + 4 * 8 * 32 + 2 * 4 * 128

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in SCALARS:
        assert name in tags and f"{name} vs tokens" in tags, name
    assert any(t.startswith("moe/") and t.endswith("expert-load-max-over-mean") for t in tags)
    assert "data/source-fraction/synthetic" in tags
    mtp = [e.value for e in acc.Scalars("mtp loss")]  # the tiny example trains with 2 MTP depths
    assert len(mtp) == 12 and all(0 < v < 20 for v in mtp)
    lr = [e.value for e in acc.Scalars("learning-rate")]
    assert len(lr) == 12 and lr[-1] == pytest.approx(1e-5)  # 6 + 4 + 2 iterations; long context at constant 1e-5

    port = _free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(d / "tb"), "--host",
                           "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        served = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as resp:
                    served = json.loads(resp.read())
                if served:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert served, "tensorboard did not serve scalar tags"
        run_tags = set().union(*[set(v) for v in served.values()])
        for name in SCALARS:
            assert name in run_tags, name
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def test_nvfp4_with_mtp_and_telemetry(tmp_path):
    """precision.recipe=nvfp4: built in BF16, linears patched by model.lowp; telemetry lands in TensorBoard."""
    d = tmp_path / "fp4"
    # A bigger batch than BASE's (still ~15 s): per-batch noise of 8 samples hides the trend over a few steps.
    mine = ["precision.recipe=nvfp4", "precision.telemetry_interval=3", "train.lr=3e-3", "train.seq_length=64",
            "train.micro_batch_size=8", "train.global_batch_size=32", "train.train_iters=8",
            "checkpoint.save_interval=100"]
    keys = {a.split("=")[0] for a in mine}
    base = [a for a in BASE if a.split("=")[0] not in keys] + mine
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--nproc", "2", *base, f"checkpoint.save={d}",
           f"logging.tensorboard_dir={d}/tb", "--summary", str(tmp_path / "s.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = json.loads((tmp_path / "s.json").read_text())["stages"][0]["losses"]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses  # learning, through 4-bit GEMMs
    assert "mtp loss:" in r.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "mtp loss" in tags
    quant = {t for t in tags if t.startswith("nvfp4/")}
    # an NVFP4 MoE expert (forward input, backward gradient) and the MXFP8 Mamba out_proj carve-out
    for tag in ("nvfp4/decoder.layers.3.mlp.experts.local_experts.0.linear_fc1/fprop.x/flushed",
                "nvfp4/decoder.layers.3.mlp.experts.local_experts.0.linear_fc1/dgrad.dy/rel_error",
                "nvfp4/decoder.layers.0.mixer.out_proj/fprop.x/saturated"):
        assert tag in quant, sorted(quant)[:20]
    assert not any(".linear_qkv/" in t or t.startswith("nvfp4/mtp.") for t in quant)  # BF16 by the policy
    rel = acc.Scalars("nvfp4/decoder.layers.3.mlp.experts.local_experts.0.linear_fc1/fprop.x/rel_error")
    assert [e.step for e in rel] == [3, 6]  # every telemetry_interval steps
    assert all(0.01 < e.value < 0.5 for e in rel), rel  # 4-bit error: clearly nonzero, far from garbage


# Interleaved pipeline: "M*-E" twice splits into 4 chunks (pp=2 x vpp=2); rank 0 then holds "M*" twice and no expert.
# MTP off: hybrid MTP needs pp=1. A fresh run's initial weights depend on the layout (each pipeline rank draws its
# own layers from its own RNG stream, as in Megatron), so the runs compare from a shared checkpoint.
VPP_MODEL = ["model.hybrid_override_pattern=M*-EM*-E", "model.num_layers=8", "model.mtp_num_layers=0",
             "checkpoint.keep_last=3"]
VPP = ["parallel.pp=2", "parallel.vpp=2"]


def _from(src, dst, iteration):
    """A copy of run dir `src` whose newest checkpoint is `iteration` (the later ones removed)."""
    shutil.copytree(src, dst)
    for p in (dst / "main").glob("iter_*"):
        if int(p.name.split("_")[1]) > iteration:
            shutil.rmtree(p)
    (dst / "main" / "latest").write_text(f"iter_{iteration:07d}\n")
    return dst


@pytest.fixture(scope="module")
def vpp_runs(tmp_path_factory):
    """The pp=1 reference (6 steps), and a pp2-vpp2 run that loads its iteration-2 checkpoint and trains 3..6."""
    root = tmp_path_factory.mktemp("vpp")
    ref, _ = _train(root / "pp1", *VPP_MODEL)
    d = _from(root / "pp1", root / "vpp", 2)
    vpp, out = _train(d, *VPP_MODEL, *VPP)
    return root, ref["stages"][0], vpp["stages"][0], out


def test_vpp_training_matches_pp1(vpp_runs):
    _, ref, vpp, out = vpp_runs
    assert "new layout" in out and vpp["layout"]["pp"] == 2 and vpp["layout"]["vpp"] == 2
    assert vpp["iterations"] == [3, 4, 5, 6]
    assert vpp["losses"] == pytest.approx(ref["losses"][2:], rel=1e-5)  # 4 interleaved steps, optimizer included


def test_vpp_checkpoint_resumes_at_vpp_and_at_pp1(vpp_runs):
    root, ref, vpp, _ = vpp_runs
    # the same layout: RNG restored, bit-identical
    same, out = _train(_from(root / "vpp", root / "vpp-again", 4), *VPP_MODEL, *VPP)
    s = same["stages"][0]
    assert s["resumed_from"] == 4 and "new layout" not in out
    assert s["losses"] == vpp["losses"][2:]
    # a pp2-vpp2 checkpoint (entries model0/model1) continued at pp1 gives the uninterrupted pp1 losses
    back, out = _train(_from(root / "vpp", root / "back", 4), *VPP_MODEL)
    b = back["stages"][0]
    assert "new layout" in out and b["iterations"] == [5, 6] and b["layout"]["pp"] == 1
    assert b["losses"] == pytest.approx(ref["losses"][4:], rel=1e-5)


# MTP under pipeline parallelism: the last stage runs the MTP block with its own copy of the embedding, which DDP
# gives a grad bucket of its own (the case Megatron-Core 0.16.1's distributed-optimizer checkpoint got wrong).
MTP_PP = ["model.hybrid_override_pattern=M*-EM*-E", "model.num_layers=8", "parallel.pp=2", "checkpoint.keep_last=3"]


def _saved_master_params_match_model(ckpt: Path) -> list[str]:
    """Names whose saved optimizer master copy ('optimizer.state.param.*', fp32 here) is not the saved parameter."""
    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
          if hasattr(v, "size") and (k.startswith("module.") or ".optimizer.state.param." in k)}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    pairs = [(k, k.split(".optimizer.state.param.", 1)[1]) for k in sd if ".optimizer.state.param." in k]
    assert len(pairs) > 50
    return [m for k, m in pairs if not torch.equal(sd[k], sd[m])]


@pytest.mark.parametrize("distopt", [True, False], ids=["distopt", "no-distopt"])
def test_mtp_at_pp2_resumes_bit_identically(tmp_path, distopt):
    extra = [*MTP_PP, f"parallel.use_distributed_optimizer={str(distopt).lower()}"]
    full, _ = _train(tmp_path / "full", *extra)
    f = full["stages"][0]
    assert f["iterations"] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(x) for x in f["losses"])
    if distopt:
        assert _saved_master_params_match_model(tmp_path / "full" / "main" / "iter_0000004") == []
    resumed, _ = _train(_from(tmp_path / "full", tmp_path / "resumed", 4), *extra)
    r = resumed["stages"][0]
    assert r["resumed_from"] == 4 and r["losses"] == f["losses"][4:]
