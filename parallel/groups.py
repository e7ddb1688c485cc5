"""Process groups for a ParallelLayout on Megatron-Core's `parallel_state`, with MoE parallel folding.

Dense parts get TP x CP x DP x PP groups; expert layers get their own ETP x EP x EDP x PP groups over the same
ranks (Megatron-Core builds both from `expert_model_parallel_size` / `expert_tensor_parallel_size`).
`teardown()` destroys them so one process can build several layouts (tests, stage changes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model import mcore_compat
from parallel.layout import ParallelLayout


def setup(layout: ParallelLayout, seed: int = 1234) -> None:
    """Create Megatron-Core's groups for `layout` on the already-initialised default process group, and seed
    the model-parallel RNG tracker (TP ranks differ, DP ranks agree)."""
    mcore_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        raise RuntimeError("parallel.groups.setup needs torch.distributed initialised (torchrun/srun or init_process_group)")
    world = dist.get_world_size()
    per_dense = layout.tp * layout.cp * layout.pp
    per_expert = layout.etp * layout.ep * layout.pp
    if world % per_dense or world % per_expert:
        raise ValueError(
            f"world size {world} is not divisible by tp*cp*pp={per_dense} and etp*ep*pp={per_expert}; "
            "change the layout or the number of ranks"
        )
    if ps.model_parallel_is_initialized():
        teardown()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        order="tp-cp-ep-dp-pp",
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def teardown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
