"""The compute backend: a validated run setting, not a guess from `torch.cuda.is_available()`.

| backend | linears / norms / attention | Mamba-2 kernels | collectives |
|---------|-----------------------------|-----------------|-------------|
| `te`    | Transformer Engine          | mamba-ssm (+ causal-conv1d when present) | NCCL |
| `local` | Megatron-Core local layers on CUDA | mamba-ssm Triton kernels when they import, else the torch scan | NCCL |
| `cpu`   | Megatron-Core local layers  | the torch chunked SSD scan in kernels/ | gloo |

`auto` takes `te` when Transformer Engine imports and CUDA is present, `local` on CUDA without it, `cpu` otherwise.
Every backend builds the same parameter names and shapes (model/specs.py), so checkpoints move between them.
Asking for a backend whose packages are not installed is a clear error, raised before any process group exists.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal, Optional

import torch

Backend = Literal["te", "local", "cpu"]
BACKENDS = ("auto", "te", "local", "cpu")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _te_imports() -> bool:
    if not _importable("transformer_engine"):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a TE wheel built for another torch/CUDA raises all sorts of errors at import
        return False
    return True


@functools.lru_cache(maxsize=None)
def _mamba_ssm_imports() -> bool:
    if not _importable("mamba_ssm"):
        return False
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class BackendInfo:
    """What a run computes with; printed at start (`describe()`)."""

    name: Backend
    device: str                 # "cuda" or "cpu": where parameters, batches and collectives' tensors live
    mamba_kernels: str          # "mamba-ssm" | "torch-scan"
    causal_conv1d: bool         # mamba-ssm's fused conv path needs it; without it the mixer convolves in torch
    dist_backend: str           # "nccl" | "gloo"

    def describe(self) -> str:
        conv = "causal-conv1d" if self.causal_conv1d else "torch conv1d"
        return (f"backend {self.name}: {self.device}, Mamba-2 {self.mamba_kernels} ({conv}), "
                f"{self.dist_backend} collectives")


def resolve_backend(requested: Optional[str] = "auto") -> BackendInfo:
    """The backend for `requested` (`auto` | `te` | `local` | `cpu`), or a ValueError saying what is missing."""
    req = requested or "auto"
    if req not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {req!r}")
    cuda = torch.cuda.is_available()
    if req == "auto":
        req = "te" if cuda and _te_imports() else ("local" if cuda else "cpu")
    if req in ("te", "local") and not cuda:
        raise ValueError(f"backend {req!r} needs CUDA, and torch sees no GPU here; use backend=cpu (or auto)")
    if req == "te" and not _te_imports():
        raise ValueError("backend 'te' needs transformer-engine[pytorch] importable (pip install "
                         "'foldtron[gpu]' or use an NGC container); use backend=local for Megatron-Core's local layers")
    if req == "te" and not _mamba_ssm_imports():
        raise ValueError("backend 'te' builds Megatron-Core's MambaMixer, which needs mamba-ssm; install it "
                         "(pip install mamba-ssm) or use backend=local (torch scan fallback)")
    on_gpu = req in ("te", "local")
    kernels = "mamba-ssm" if on_gpu and _mamba_ssm_imports() else "torch-scan"
    return BackendInfo(name=req, device="cuda" if on_gpu else "cpu", mamba_kernels=kernels,
                       causal_conv1d=on_gpu and _importable("causal_conv1d"),
                       dist_backend="nccl" if on_gpu else "gloo")


def device_of(info: BackendInfo) -> torch.device:
    """The device tensors of this backend live on (the current CUDA device on GPU backends)."""
    if info.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
