"""Expert gradients under MoE parallel folding when ep == 1.

Megatron-Core 0.16.1 marks an expert linear's weight as an expert-parallel parameter (`allreduce=False`, so DDP
reduces it over the expert data-parallel group) only when `expert_model_parallel_size > 1`
(tensor_parallel/layers.py:829, :886, :1149, :1209). With ep == 1 the experts are treated as dense parameters and
reduced over the dense DP x CP group. That is only right when the expert grid equals the dense one: with folding
(etp * ep != tp * cp, e.g. tp2 with etp1 ep1) every TP/CP rank runs the full experts on its own tokens, and the
ranks that hold the same expert weights form the expert data-parallel group, not the dense one. Measured on the
matrix test (tp2, ep1, etp1): each TP rank kept its own partial expert gradient, 0.6-0.8 relative off.

The fix marks every expert weight `allreduce=False`, so DDP puts it in its expert buckets and reduces it over
`expt_dp` (built by parallel_state for exactly this folding). When the grids are equal (e.g. dp2 alone) `expt_dp`
is the dense DP group, so the reduction is unchanged; marking always (not only when folded) keeps Megatron's
optimizer layout-independent: an MoE model always gets the dense + expert ChainedOptimizer, so the checkpoint keys
(`chained_0.` / `chained_1.`) are the same under every layout and a run can resume or start a stage under another
one (marking only when folded gave dp2 checkpoints without the prefix, which tp2 and cp2 runs could not load).
"""
from __future__ import annotations

import torch

_INSTALLED = False


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
            if getattr(self, "is_expert", False) and not self.expert_parallel:
                for p in (getattr(self, "weight", None), getattr(self, "bias", None)):
                    if isinstance(p, torch.nn.Parameter):
                        p.allreduce = False

        cls.__init__ = __init__
    _INSTALLED = True
