"""MoE patch: every expert weight is an expert-parallel parameter, whatever the layout.

Megatron-Core 0.19.2 marks an expert linear's weight `allreduce=False` (reduced over the expert data-parallel
group, in DDP's expert buckets and the expert optimizer) only when `ep > 1 or etp != tp`
(tensor_parallel/layers.py:961 `use_expert_pgs`; TE's `_set_expert_parameter_attributes`,
extensions/transformer_engine.py:91, for TEGroupedLinear's `weight{e}`). 0.16.1 did it only for ep > 1, which gave
wrong expert gradients under folding with ep == 1; 0.19 fixed that part. What remains is the optimizer layout:
unmarked, a dp-only MoE run has one optimizer and a tp2 run a dense + expert chain (checkpoint keys `chained_0.` /
`chained_1.`), so a checkpoint cannot load under another layout. Marking always keeps one chain everywhere; when the
expert grid equals the dense one, expert DP *is* the dense DP group, so the reduction is unchanged.
"""
from __future__ import annotations

import torch

_INSTALLED = False


def install_expert_marking() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.tensor_parallel import layers

    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        orig = cls.__init__

        def __init__(self, *args, __orig=orig, **kwargs):
            __orig(self, *args, **kwargs)
            if getattr(self, "is_expert", False):
                for p in (getattr(self, "weight", None), getattr(self, "bias", None)):
                    if isinstance(p, torch.nn.Parameter):
                        p.allreduce = False

        cls.__init__ = __init__
    from megatron.core.extensions import transformer_engine as te_ext

    if getattr(te_ext, "HAVE_TE", False) and hasattr(te_ext, "_set_expert_parameter_attributes"):
        # Written against 0.19.2 extensions/transformer_engine.py:91-110; not run here (no TE on CPU machines).
        orig_mark = te_ext._set_expert_parameter_attributes

        def _set_expert_parameter_attributes(module, parallel_mode, use_expert_pgs):
            orig_mark(module, parallel_mode, use_expert_pgs)
            for _, param in module.named_parameters(recurse=False):
                param.allreduce = False

        te_ext._set_expert_parameter_attributes = _set_expert_parameter_attributes
    _INSTALLED = True
