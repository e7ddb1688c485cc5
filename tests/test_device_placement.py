"""Device correctness, checked on the CPU: during a real training step (the production loop, tiny model with MoE,
MTP and a pipeline of 2 ranks), no tensor factory called from Foldtron's own code may leave the device implicit.

On a CPU every tensor lands on the CPU whatever the code says, so the class of bug the GPU audit found (a batch
never moved, CPU flags handed to NCCL, Foldtron parameters made on the CPU while Megatron's are on the GPU) is
invisible to an ordinary CPU test. A torch function mode sees every factory call instead: one without a `device=`
from a file of pretrain/, parallel/, model/ or kernels/ is reported with its file and line. Host-side data
(data_pipeline/: batches are assembled on the host and moved in the forward step) is exempt by design.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
CHECKED = tuple(str(ROOT / d) + "/" for d in ("pretrain", "parallel", "model", "kernels"))
# The cpu backend's view of torch forwards Megatron-Core's own factory calls (their device is Megatron's).
FORWARDERS = (str(ROOT / "model" / "adapt" / "cpu.py"),)


def _detector():
    import torch
    from torch.overrides import TorchFunctionMode

    factories = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.rand,
                 torch.randn, torch.randint, torch.linspace, torch.eye, torch.randperm}

    class ImplicitDevice(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.hits: set[str] = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories and kwargs.get("device") is None:
                frame = sys._getframe(1)
                while frame is not None and "/torch/" in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_filename.startswith(CHECKED) \
                        and frame.f_code.co_filename not in FORWARDERS:
                    rel = Path(frame.f_code.co_filename).relative_to(ROOT)
                    self.hits.add(f"{rel}:{frame.f_lineno} {func.__name__}")
            return func(*args, **kwargs)

    return ImplicitDevice()


def _train_under_detector(run_dir: str, plant: bool):
    from pretrain.config import load_config
    from pretrain.train import run_training

    if plant:
        # The audit's bug, planted: the step's loss/flag reduction (all-reduced every step) built without naming
        # the backend's device, as it was before (pretrain/train.py at 65a7a1b, ~351).
        import model.adapt

        orig = model.adapt.current_device

        def planted():
            return None if sys._getframe(1).f_code.co_name == "train_step" else orig()

        model.adapt.current_device = planted
    cfg = load_config(None, ["model.preset=tiny", "model.hybrid_override_pattern=M*-EM*-E", "model.num_layers=8",
                             "data.mock=true", "train.seq_length=16", "train.micro_batch_size=1",
                             "train.global_batch_size=4", "train.train_iters=2", "precision.recipe=fp32",
                             "parallel.pp=2", "logging.peak_tflops_per_device=1.0", f"checkpoint.save={run_dir}",
                             "checkpoint.save_interval=2"])
    mode = _detector()
    with mode:
        summary = run_training(cfg)
    assert summary["exit_code"] == 0
    return sorted(mode.hits)


def _clean_then_planted(root: str):
    """Both runs on one pair of ranks (one start-up): the clean run first, so every lazily made tensor is made
    under its detector; then the planted bug, which stays in this process."""
    return {"clean": _train_under_detector(str(Path(root) / "clean"), False),
            "planted": _train_under_detector(str(Path(root) / "planted"), True)}


@pytest.fixture(scope="module")
def hits(tmp_path_factory):
    ranks = run_on_ranks(_clean_then_planted, 2, str(tmp_path_factory.mktemp("placement")), timeout=600)
    return {k: sorted({h for rank in ranks for h in rank[k]}) for k in ("clean", "planted")}


@pytest.mark.multiproc
def test_training_step_names_every_device(hits):
    found = hits["clean"]
    assert not found, "tensors created without an explicit device during training:\n" + "\n".join(found)


@pytest.mark.multiproc
def test_planted_device_bug_is_caught(hits):
    found = hits["planted"]
    assert any(h.startswith("pretrain/train.py") for h in found), found
