"""ParallelLayout: the 5D layout with MoE parallel folding (arXiv 2504.14960).

Attention and dense parts use TP x CP x DP x PP; expert layers use ETP x EP x EDP x PP over the same ranks.
Field names follow Megatron-LM's arguments (`--tensor-model-parallel-size` -> `tp`, ...).
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class ParallelLayout(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    tp: int = Field(1, ge=1)  # tensor parallel
    cp: int = Field(1, ge=1)  # context parallel (sequence split in 2*cp load-balanced chunks)
    pp: int = Field(1, ge=1)  # pipeline parallel
    vpp: Optional[int] = Field(None, ge=1)  # virtual pipeline stages per rank (interleaved 1F1B)
    ep: int = Field(1, ge=1)  # expert parallel
    etp: int = Field(1, ge=1)  # expert tensor parallel (folded: independent of tp)
    sequence_parallel: bool = False  # shard norms/dropout activations over tp; needed for MoE with tp > 1
    use_distributed_optimizer: bool = True  # ZeRO-1 style optimizer sharding over DP (Megatron DistributedOptimizer)

    def dp(self, world_size: int) -> int:
        """Data-parallel size of the dense part: world / (tp*cp*pp)."""
        return world_size // (self.tp * self.cp * self.pp)

    def edp(self, world_size: int) -> int:
        """Data-parallel size of the expert part: world / (etp*ep*pp)."""
        return world_size // (self.etp * self.ep * self.pp)
