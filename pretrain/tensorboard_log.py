"""TensorBoard scalars with Megatron-LM's names, and Megatron's stdout line.

Every scalar X is also written as "X vs tokens" (step = consumed tokens), like Megatron's "vs samples" series.
Names: 'lm loss', 'mtp loss' (and 'mtp_<k> loss' per depth, from Megatron's MTPLossLoggingHelper),
'seq_load_balancing_loss' (MoE, from track_moe_metrics), 'learning-rate', 'grad-norm', 'params-norm',
'batch-size', 'iteration-time', 'throughput' (TFLOP/s per device, from the model's FLOP count), 'mfu',
'tokens-per-sec', 'consumed-tokens', 'skipped-iterations', 'nan-iterations', memory ('mem-allocated-bytes',
'mem-max-allocated-bytes': CUDA allocator on GPU, resident set size on CPU), 'moe/layer_<i>/expert-load-max-over-mean',
'data/source-fraction/<source>'. Written by the last rank, as in Megatron (it holds the loss under PP).
"""
from __future__ import annotations

import resource
import time
from typing import Optional

import torch

#: Dense BF16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU when logging.peak_tflops is unset.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "B300": 2250.0, "GB200": 2450.0,
               "A100": 312.0, "L40S": 362.0}


def measured_peak_tflops(dtype: torch.dtype = torch.float32, n: int = 512, reps: int = 6) -> float:
    """Peak of this device measured with a square GEMM (CPU runs have no datasheet number to compare to)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops(configured: Optional[float], dtype: torch.dtype) -> tuple[float, str]:
    if configured:
        return configured, "config"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for frag, v in PEAK_TFLOPS.items():
            if frag in name:
                return v, name
    return measured_peak_tflops(dtype), "measured GEMM"


def memory_scalars() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"mem-allocated-bytes": float(torch.cuda.memory_allocated()),
                "mem-max-allocated-bytes": float(torch.cuda.max_memory_allocated()),
                "mem-reserved-bytes": float(torch.cuda.memory_reserved())}
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize()
    return {"mem-allocated-bytes": float(rss),
            "mem-max-allocated-bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}


class TrainLogger:
    def __init__(self, tb_dir: Optional[str], is_writer: bool, stage: str):
        self.writer = None
        self.stage = stage
        if tb_dir and is_writer:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tb_dir, max_queue=100)

    def scalars(self, values: dict[str, float], iteration: int, tokens: int, vs_tokens: bool = True) -> None:
        """`vs_tokens=False` for per-module diagnostics (quantization telemetry): hundreds of tags, and a
        second copy of each against tokens would only double the event file."""
        if self.writer is None:
            return
        for name, v in values.items():
            if v is None:
                continue
            self.writer.add_scalar(name, float(v), iteration)
            if vs_tokens:
                self.writer.add_scalar(f"{name} vs tokens", float(v), tokens)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _throughput(tflops: float) -> str:
    """Megatron's TFLOP/s/GPU on GPUs; CPUs reach GFLOP/s, which '0.000' would hide."""
    if tflops >= 0.1:
        return f"throughput per GPU (TFLOP/s/GPU): {tflops:.3f}"
    return f"throughput per device (GFLOP/s): {tflops * 1e3:.3f}"


def stdout_line(stage: str, it: int, total: int, v: dict) -> str:
    """Megatron's per-interval line, with the stage in front."""
    parts = [f" [{stage}] iteration {it:8d}/{total:8d}",
             f"consumed tokens: {int(v['consumed-tokens']):12d}",
             f"elapsed time per iteration (ms): {v['iteration-time'] * 1000:.1f}",
             _throughput(v["throughput"]),
             f"tokens per sec: {v['tokens-per-sec']:.1f}",
             f"learning rate: {v['learning-rate']:.6E}",
             f"global batch size: {int(v['batch-size']):5d}",
             f"lm loss: {v['lm loss']:.6E}"]
    if v.get("mtp loss") is not None:
        parts.append(f"mtp loss: {v['mtp loss']:.6E}")
    parts += [f"grad norm: {v['grad-norm']:.3f}" if v.get("grad-norm") is not None else "grad norm: -",
              f"number of skipped iterations: {int(v['skipped-iterations']):3d}",
              f"number of nan iterations: {int(v['nan-iterations']):3d}"]
    return " | ".join(parts) + " |"
