"""Expert gradients under MoE parallel folding when ep == 1.

Megatron-Core 0.16.1 marks an expert linear's weight as an expert-parallel parameter (`allreduce=False`, so DDP
reduces it over the expert data-parallel group) only when `expert_model_parallel_size > 1`
(tensor_parallel/layers.py:829, :886, :1149, :1209). With ep == 1 the experts are treated as dense parameters and
reduced over the dense DP x CP group. That is only right when the expert grid equals the dense one: with folding
(etp * ep != tp * cp, e.g. tp2 with etp1 ep1) every TP/CP rank runs the full experts on its own tokens, and the
ranks that hold the same expert weights form the expert data-parallel group, not the dense one. Measured on the
matrix test (tp2, ep1, etp1): each TP rank kept its own partial expert gradient, 0.6-0.8 relative off.

The fix marks expert weights `allreduce=False` whenever the two grids differ, so DDP puts them in its expert
buckets and reduces them over `expt_dp` (built by parallel_state for exactly this folding).
"""
from __future__ import annotations

import torch

_INSTALLED = False


def _folded(config) -> bool:
    return (config.expert_tensor_parallel_size or config.tensor_model_parallel_size) * \
        config.expert_model_parallel_size != config.tensor_model_parallel_size * config.context_parallel_size


def install() -> None:
    """Patch Column/RowParallelLinear construction once per process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.tensor_parallel import layers

    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        orig = cls.__init__

        def __init__(self, *args, __orig=orig, **kwargs):
            __orig(self, *args, **kwargs)
            if getattr(self, "is_expert", False) and not self.expert_parallel and _folded(self.config):
                for p in (getattr(self, "weight", None), getattr(self, "bias", None)):
                    if isinstance(p, torch.nn.Parameter):
                        p.allreduce = False

        cls.__init__ = __init__
    _INSTALLED = True
