"""GPU tests (marker `gpu`; skipped cleanly without CUDA, see conftest.py). Written for a single-GPU machine such as
the lent H200 (bench/device_check.py runs them there); on CPU machines they are collected and skipped.

- one-GPU training through the production loop (`foldtron train` code path: run_training -> train_step) in BF16
  with the local backend and, when importable, mamba-ssm's Triton kernels;
- parity with the CPU path: the same initial weights and batch give the same loss and gradients (fp32 within
  1e-5 relative; BF16 within 2e-2, the BF16 GEMM rounding of a 2-layer model);
- NVFP4 emulation on the GPU bit-exact with the CPU reference (kernels/nvfp4.py);
- export and verify on a GPU machine (the meta build must not materialise the model on the GPU).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, *extra):
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "model.preset=tiny", "data.mock=true", "backend=local",
           "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=4",
           "logging.peak_tflops_per_device=989", f"checkpoint.save={tmp_path / 'run'}", "--summary", str(summary),
           *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(summary.read_text()), r.stdout


def test_one_gpu_training_bf16_local_backend(tmp_path):
    import math

    summary, out = _train(tmp_path, "precision.recipe=bf16")
    assert "backend local: cuda" in out
    losses = summary["stages"][0]["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def _loss_and_grads(device: str, dtype):
    import torch

    from model import adapt
    from model.build import build_model, init_single_process, transformer_config
    from model.presets import get_preset

    adapt.apply("local" if device == "cuda" else "cpu")
    init_single_process(seed=7)
    cfg = get_preset("tiny", mtp_num_layers=0, mtp_hybrid_override_pattern=None)
    torch.manual_seed(7)
    model = build_model(cfg, config=transformer_config(cfg, params_dtype=dtype, use_cpu_initialization=True,
                                                       perform_initialization=True)).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=g).to(device)
    pos = torch.arange(32, device=device).expand(2, 32)
    loss = model(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    return float(loss), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}


def _in_process(fn, *args):
    """Each backend in its own process: the cpu and local backends' patches cannot share one."""
    from tests.distributed import run_on_ranks

    (res,) = run_on_ranks(fn, 1, *args, timeout=600)
    return res


def _run(device, dtype_name):
    import torch

    return _loss_and_grads(device, getattr(torch, dtype_name))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_gpu_matches_cpu(dtype, tol):
    import torch

    cpu_loss, cpu_grads = _in_process(_run, "cpu", dtype)
    gpu_loss, gpu_grads = _in_process(_run, "cuda", dtype)
    assert abs(gpu_loss - cpu_loss) <= tol * abs(cpu_loss)
    for name, g in cpu_grads.items():
        rel = float(torch.linalg.vector_norm(gpu_grads[name] - g) / torch.linalg.vector_norm(g).clamp(min=1e-12))
        assert rel <= 10 * tol, f"{name}: {rel:.2e}"


def test_nvfp4_emulation_on_gpu_is_bit_exact_with_cpu():
    import torch

    from kernels.nvfp4 import TILE_1D, quantize_nvfp4

    g = torch.Generator().manual_seed(3)
    for shape in ((128, 256), (1024, 4096)):
        x = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])).to(torch.bfloat16)
        a = quantize_nvfp4(x, tile=TILE_1D)
        b = quantize_nvfp4(x.cuda(), tile=TILE_1D)
        assert torch.equal(a.codes, b.codes.cpu()), shape
        assert torch.equal(a.scales.view(torch.uint8), b.scales.cpu().view(torch.uint8)), shape
        assert torch.equal(a.amax, b.amax.cpu()), shape


def test_export_and_verify_on_a_gpu_machine(tmp_path):
    _train(tmp_path, "precision.recipe=bf16")
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "export-hf", "--checkpoint", str(tmp_path / "run"),
                        "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "verify-hf", str(out), "--checkpoint",
                        str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
