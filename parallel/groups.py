"""Process groups for a ParallelLayout on Megatron-Core's `parallel_state`, with MoE parallel folding.

Dense parts get TP x CP x DP x PP groups; expert layers get their own ETP x EP x EDP x PP groups over the same
ranks (Megatron-Core builds both from `expert_model_parallel_size` / `expert_tensor_parallel_size`).
`teardown()` destroys them (the communicators too, not only Megatron's references) so one process can build
several layouts in tests or between stages.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from model import adapt
from parallel.layout import ParallelLayout

if TYPE_CHECKING:
    from model.config import ModelConfig

#: Megatron's default rank order: TP varies fastest, so TP (and the folded ETP x EP) ranks are neighbours.
ORDER = "tp-cp-ep-dp-pp"


def world_size_from_env() -> int:
    """The world size torchrun/srun announce, known before `init_process_group` (so validation can run first)."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return dist.get_world_size() if dist.is_initialized() else 1


def setup(layout: ParallelLayout, seed: int = 1234, *, model_cfg: Optional["ModelConfig"] = None,
          seq_length: Optional[int] = None, micro_batch_size: Optional[int] = None,
          global_batch_size: Optional[int] = None, backend: Optional[str] = None) -> None:
    """Create Megatron-Core's groups for `layout` on the already-initialised default process group, and seed
    the model-parallel RNG tracker (TP ranks differ, DP ranks agree).

    Given `model_cfg` (and the batch shape), the layout is validated first: every rank raises the same
    LayoutError before a single group exists, instead of an assertion deep in Megatron-Core."""
    if model_cfg is not None:
        if None in (seq_length, micro_batch_size, global_batch_size):
            raise ValueError("setup(model_cfg=...) validates the layout and needs seq_length, micro_batch_size "
                             "and global_batch_size too")
        layout.validate(model_cfg, world_size_from_env(), seq_length, micro_batch_size, global_batch_size)
    adapt.apply(backend)
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
        order=ORDER,
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    # Python's and numpy's generators too (shuffles, sampling in user hooks); checkpoints save and restore them.
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


def teardown() -> None:
    """Destroy every group Megatron-Core created for the current layout and reset its globals."""
    from megatron.core import parallel_state as ps

    groups = adapt.private.megatron_process_groups()
    ps.destroy_model_parallel()
    seen: set[int] = set()
    for g in groups:
        if id(g) in seen:
            continue
        seen.add(id(g))
        try:
            dist.destroy_process_group(g)
        except (ValueError, RuntimeError):  # already destroyed (shared between two of Megatron's globals)
            pass


def describe() -> dict[str, list[int]]:
    """The global ranks of this rank's groups, dense and folded expert: for logs and for tests that check the
    folding (e.g. with tp2 ep4 etp1 on 4 ranks the EP group spans both TP groups)."""
    from megatron.core import parallel_state as ps

    def ranks(group) -> list[int]:
        return dist.get_process_group_ranks(group)

    return {
        "tp": ranks(ps.get_tensor_model_parallel_group()),
        "cp": ranks(ps.get_context_parallel_group()),
        "pp": ranks(ps.get_pipeline_model_parallel_group()),
        "dp": ranks(ps.get_data_parallel_group()),
        "dp_cp": ranks(ps.get_data_parallel_group(with_context_parallel=True)),
        "ep": ranks(ps.get_expert_model_parallel_group()),
        "etp": ranks(ps.get_expert_tensor_parallel_group()),
        "edp": ranks(ps.get_expert_data_parallel_group()),
        "etp_ep": ranks(ps.get_expert_tensor_and_model_parallel_group()),
    }
