"""The only places Foldtron reads Megatron-Core's private (`_`-prefixed) names, each with why no public API does.
A rename upstream breaks here, in one file, with the removal tests pointing at it."""
from __future__ import annotations

from typing import Sequence

import torch


def update_router_expert_bias(model_chunks: Sequence[torch.nn.Module], config) -> None:
    """The aux-loss-free expert-bias step that finalize_model_grads runs (distributed/finalize_model_grads.py:334
    `_update_router_expert_bias`, 0.19.2): all-reduce token counts over TPxCPxDP, bias += rate * sign(mean - count).
    For loops that do not call finalize_model_grads (tests, benchmarks); no public wrapper exists."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    _update_router_expert_bias(list(model_chunks), config)


def megatron_process_groups() -> list:
    """Every process group parallel_state created (core/parallel_state.py `_global_process_group_list`):
    destroy_model_parallel only drops Megatron's references, so tearing a layout down between stages or tests
    destroys the communicators from this list."""
    from megatron.core import parallel_state as ps

    return [g for g in (getattr(ps, "_global_process_group_list", None) or []) if g is not None]
