"""Every model chunk one pipeline rank builds (one per virtual stage, with the embedding / output layer where
Megatron-Core puts them), for tests that inspect the built model under pp / vpp inside `run_on_ranks`."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional


@contextlib.contextmanager
def rank_chunks(cfg, pp: int, vpp: Optional[int]) -> Iterator[list]:
    """Process groups for ParallelLayout(pp, vpp), this rank's fp32 chunks in virtual-stage order, torn down after."""
    import torch

    from model.build import build_model, transformer_config
    from parallel import groups
    from parallel.layout import ParallelLayout

    groups.setup(ParallelLayout(pp=pp, vpp=vpp), seed=1234)
    try:
        # after setup, which applies the CPU compatibility layer
        from megatron.core import parallel_state as ps

        tc = transformer_config(cfg, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                params_dtype=torch.float32, pipeline_dtype=torch.float32)
        chunks = []
        for v in range(vpp or 1):
            vp = v if vpp else None
            chunks.append(build_model(cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                                      post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                                      vp_stage=vp, config=tc))
        yield chunks
    finally:
        groups.teardown()
