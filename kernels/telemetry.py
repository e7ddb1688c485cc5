"""Quantization telemetry: per layer and tensor role, how much of a tensor flushed to zero, how much saturated, and
the relative quantization error — the three numbers that show a recipe going wrong (underflowing gradients, the
reason Super's Mamba out_proj is MXFP8; clipping outliers; growing error before a loss spike).

Cheap enough to leave on: nothing is computed except on recording steps (every ``interval`` steps), and then
only a few reductions per quantized operand, accumulated as tensors (no host sync until ``read``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Optional, Tuple

import torch

Key = Tuple[str, str]  # (layer/module name, role such as "fprop.x", "dgrad.dy", "wgrad.dy")


class QuantTelemetry:
    """Collects statistics while ``active``; the training loop calls ``step(n)`` each step and ``read()`` to log.

    Definitions, per (module, role), summed over all calls in the recording steps:
      flushed   = #(x != 0 and q(x) == 0) / #(x != 0)
      saturated = #(|x| clipped at the format's max after block scaling) / #elements
      rel_error = ||q(x) - x||_2 / ||x||_2
    For NVFP4 a few percent "saturated" is normal: when a block's E4M3 scale rounds down, its largest element
    lands just above 6 and is clipped (TE's ``cvt.rn.satfinite``), at most one or two elements per 16-block.
    """

    def __init__(self, interval: int):
        if interval < 0:
            raise ValueError(f"telemetry interval must be >= 0 (0 = off), got {interval}")
        self.interval = interval
        self.active = False
        self._acc: Dict[Key, Dict[str, torch.Tensor]] = defaultdict(dict)

    def step(self, step: int) -> bool:
        """Arm recording for this step when it is a multiple of the interval; returns whether it is armed."""
        self.active = self.interval > 0 and step % self.interval == 0
        return self.active

    def probe(self, name: str) -> Optional[Callable]:
        """A probe for ``kernels.lowp_linear`` bound to a module name, or None when not recording (zero cost)."""
        if not self.active:
            return None

        def _probe(role: str, hp: torch.Tensor, dq: torch.Tensor, saturated: Optional[torch.Tensor]) -> None:
            self.record(name, role, hp, dq, saturated)

        return _probe

    @torch.no_grad()
    def record(self, name: str, role: str, hp: torch.Tensor, dq: torch.Tensor,
               saturated: Optional[torch.Tensor] = None) -> None:
        if hp.shape != dq.shape:
            raise ValueError(f"telemetry for {name}/{role}: shapes differ, {tuple(hp.shape)} vs {tuple(dq.shape)}")
        hp, dq = hp.float(), dq.float()
        nz = hp != 0
        stats = {
            "n": torch.tensor(float(hp.numel()), device=hp.device),
            "nonzero": nz.sum().float(),
            "flushed": (nz & (dq == 0)).sum().float(),
            "saturated": (saturated.float() if saturated is not None else torch.zeros((), device=hp.device)),
            "err_sq": (dq - hp).double().square().sum(),
            "ref_sq": hp.double().square().sum(),
        }
        acc = self._acc[(name, role)]
        for k, v in stats.items():
            acc[k] = acc[k] + v if k in acc else v

    def read(self, reset: bool = True) -> Dict[Key, Dict[str, float]]:
        out = {}
        for key, a in self._acc.items():
            ref = a["ref_sq"].item()
            out[key] = {
                "flushed": a["flushed"].item() / max(a["nonzero"].item(), 1.0),
                "saturated": a["saturated"].item() / max(a["n"].item(), 1.0),
                "rel_error": (a["err_sq"].item() / ref) ** 0.5 if ref > 0 else 0.0,
            }
        if reset:
            self._acc.clear()
        return out

    def scalars(self, prefix: str = "quantization", reset: bool = True) -> Dict[str, float]:
        """Flat ``{prefix}/{module}/{role}/{stat}: value`` dict, ready for ``SummaryWriter.add_scalar``."""
        return {f"{prefix}/{name}/{role}/{stat}": v
                for (name, role), stats in self.read(reset).items() for stat, v in stats.items()}
