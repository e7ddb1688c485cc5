"""The GPU check for a bare single-GPU machine (the lent H200: Python 3.12, torch, triton; no network, no
megatron-core / pydantic / TE / mamba-ssm). One script, under 8 minutes, one JSON:

    # on a machine with network, once: the wheels to carry (megatron-core, pydantic, pydantic-core, mamba-ssm
    # built without compiling: its Triton SSD kernels are pure Python)
    python -m bench.device_check --prepare wheels/
    # on the GPU machine
    python -m bench.device_check --wheels wheels/ --out $OUT/device_check.json

Steps: install the carried wheels (`pip install --no-index --no-deps`; a stub `selective_scan_cuda` so that
`import mamba_ssm` works without its compiled extension), run the `gpu` tests, then measure
  1. tokens/s and MFU of a Nano-shaped proxy (the first layers of the nano-30b-a3b preset at seq 4096, BF16,
     local backend with mamba-ssm kernels) against the 989 TFLOP/s dense BF16 peak (goal >= 45%);
  2. the NVFP4 quantizer's bandwidth against a plain HBM copy of the same tensor (goal >= 70%);
  3. peak GPU memory of the proxy step against parallel/memory.py's prediction for the same run (goal: within 10%).
`--dry-run` does everything a CPU can (arguments, wheel directory, imports, the proxy's config and prediction) and
writes the JSON with the GPU figures absent; a test runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("megatron_core", "pydantic", "pydantic_core", "mamba_ssm")
PEAK_BF16_TFLOPS = 989.0
GOALS = {"proxy_mfu": 0.45, "nvfp4_vs_copy": 0.70, "memory_rel_error": 0.10}


def prepare(dest: Path) -> None:
    """Download/build the wheels to carry (needs network; run it on the CPU machine)."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-deps", "-d", str(dest), "--python-version", "3.12",
                          "--only-binary=:all:", "megatron-core>=0.19.2,<0.20", "pydantic>=2.6", "pydantic-core"],
                   check=True)
    env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "MAMBA_FORCE_BUILD": "TRUE"}
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), "mamba-ssm==2.3.1"],
                   check=True, env=env)


def find_wheels(d: Path) -> dict[str, Path]:
    found = {}
    for name in WHEELS:
        hits = sorted(d.glob(f"{name}-*.whl"))
        if not hits:
            raise SystemExit(f"device_check: no {name} wheel in {d} (run --prepare on a machine with network)")
        found[name] = hits[-1]
    return found


def install(wheels: dict[str, Path], stub_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, wheels.values())],
                   check=True)
    # mamba_ssm/__init__ imports its selective-scan CUDA extension, which a no-compile build lacks; the Triton SSD
    # kernels Megatron-Core's MambaMixer calls do not need it.
    stub_dir.mkdir(parents=True, exist_ok=True)
    (stub_dir / "selective_scan_cuda.py").write_text(
        "def fwd(*a, **k):\n    raise RuntimeError('selective_scan_cuda stub: the CUDA selective scan was not built')\n"
        "bwd = fwd\n")


def proxy_config(num_layers: int):
    from model.presets import get_preset

    full = get_preset("nano-30b-a3b")
    pattern = full.hybrid_override_pattern[:num_layers]
    return get_preset("nano-30b-a3b", hybrid_override_pattern=pattern, num_layers=num_layers, mtp_num_layers=0,
                      mtp_hybrid_override_pattern=None)


def predicted_memory_gib(cfg, seq: int) -> float:
    from parallel.layout import ParallelLayout
    from parallel.memory import GiB, MemoryOptions, memory_per_gpu

    opts = MemoryOptions(seq_length=seq, micro_batch_size=1, global_batch_size=1, profile="local",
                         param_bytes=2.0, grad_bytes=2.0, optimizer_bytes=0.0, activation_bytes=2.0)
    m = memory_per_gpu(cfg, ParallelLayout(use_distributed_optimizer=False), 1, opts)
    return m.total / GiB


def measure_proxy(cfg, seq: int, steps: int) -> dict:
    import torch

    from model import adapt
    from model.build import build_model, init_single_process, transformer_config
    from model.counting import forward_flops

    adapt.apply("local")
    init_single_process(seed=1)
    tc = transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True)
    model = build_model(cfg, config=tc).cuda()
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
    pos = torch.arange(seq, device="cuda").unsqueeze(0)
    for _ in range(2):  # warm-up: Triton autotuning, allocator
        model(ids, pos, None, labels=ids).float().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=False)
        model(ids, pos, None, labels=ids).float().mean().backward()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    flops = forward_flops(cfg, seq)["training_total"] * seq
    return {"tokens_per_s": seq / dt, "step_s": dt, "tflops": flops / dt / 1e12,
            "mfu": flops / dt / 1e12 / PEAK_BF16_TFLOPS, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "mamba_kernels": adapt.environment("local").mamba_ssm}


def measure_nvfp4(rows: int = 8192, cols: int = 8192, reps: int = 10) -> dict:
    import torch

    from kernels.nvfp4 import quantize_nvfp4

    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    copy_s = timed(lambda: x.clone())
    quant_s = timed(lambda: quantize_nvfp4(x))
    moved_copy = 2 * x.numel() * 2  # read + write bf16
    moved_quant = x.numel() * 2 + x.numel() * 1 + x.numel() // 16  # read bf16, write codes (uint8) + scales
    return {"copy_gb_s": moved_copy / copy_s / 1e9, "nvfp4_gb_s": moved_quant / quant_s / 1e9,
            "nvfp4_vs_copy": (moved_quant / quant_s) / (moved_copy / copy_s), "shape": [rows, cols]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", type=Path, help="download/build the wheels to carry, then exit")
    p.add_argument("--wheels", metavar="DIR", type=Path, help="carried wheels to install first")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "device_check.json")
    p.add_argument("--proxy-layers", type=int, default=6, help="first N layers of the nano preset (default 6)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-tests", action="store_true", help="do not run the `gpu` tests")
    p.add_argument("--dry-run", action="store_true", help="no GPU: check arguments, wheels, imports, the plan")
    a = p.parse_args(argv)
    if a.prepare:
        prepare(a.prepare)
        return 0
    if a.proxy_layers < 1 or a.seq < 16 or a.steps < 1:
        p.error("--proxy-layers, --steps must be >= 1 and --seq >= 16")
    result: dict = {"goals": GOALS, "proxy_layers": a.proxy_layers, "seq": a.seq,
                    "memory_profile": "local (unfused attention saving probabilities, as the local backend runs)"}
    if a.wheels:
        wheels = find_wheels(a.wheels)
        result["wheels"] = {k: v.name for k, v in wheels.items()}
        if not a.dry_run:
            stub = a.out.parent / "_stubs"
            install(wheels, stub)
            sys.path.insert(0, str(stub))
            os.environ["PYTHONPATH"] = os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(ROOT))
    cfg = proxy_config(a.proxy_layers)
    result["proxy_pattern"] = cfg.hybrid_override_pattern
    result["predicted_memory_gib"] = predicted_memory_gib(cfg, a.seq)
    if a.dry_run:
        result["dry_run"] = True
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("device_check: no CUDA device (use --dry-run on a CPU machine)")
        result["gpu"] = torch.cuda.get_device_name(0)
        if not a.skip_tests:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
            result["gpu_tests"] = {"exit": r.returncode, "tail": r.stdout[-1500:], "s": time.perf_counter() - t0}
        result["proxy"] = measure_proxy(cfg, a.seq, a.steps)
        result["nvfp4"] = measure_nvfp4()
        pred = result["predicted_memory_gib"]
        result["memory_rel_error"] = abs(result["proxy"]["peak_memory_gib"] - pred) / pred
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
