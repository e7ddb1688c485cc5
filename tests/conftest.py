"""Shared pytest set-up: repo root on sys.path, GPU / Slurm tests skipped cleanly when absent."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Megatron-Core's jit_fuser is torch.compile: on the CPU every process would trace, and on a fresh machine compile
# with a C++ compiler, each fused function per shape (~20 s of CPU a new tiny-model config, ~3 s a process with a
# warm cache; the suite starts ~150 training processes). The functions are elementwise (squared ReLU, bias-dropout-
# add, router bias): eager runs the same math. Inherited by every subprocess and rank; test_quickstart.py runs the
# production path (compiled, as `foldtron quickstart` on a laptop) with it removed. FOLDTRON_TEST_COMPILE=1: compile.
if os.environ.get("FOLDTRON_TEST_COMPILE", "") != "1":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    cuda = None
    slurm = shutil.which("sbatch") is not None and os.environ.get("FOLDTRON_SLURM", "") != "0"
    for item in items:
        if "gpu" in item.keywords:
            cuda = _has_cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA (no GPU on this machine)"))
        if "slurm" in item.keywords and not slurm:
            item.add_marker(pytest.mark.skip(
                reason="needs a running Slurm: `bash .ci/slurm.sh start` (Debian slurmctld slurmd slurm-client munge)"))


@pytest.fixture
def repo_root() -> Path:
    return ROOT
