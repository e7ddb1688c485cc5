"""ParallelLayout: the 5D layout with MoE parallel folding (arXiv 2504.14960).

Attention and dense parts use TP x CP x DP x PP; expert layers use ETP x EP x EDP x PP over the same ranks.
Field names follow Megatron-LM's arguments (`--tensor-model-parallel-size` -> `tp`, ...).

`validate()` checks a layout against a model config and the batch shape before any process group exists, so a
bad layout is one readable error at startup instead of an assertion deep inside Megatron-Core on some rank after
minutes of start-up (or, worse, a silently wrong split: MambaStack floors `num_layers // pp`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, ConfigDict, Field

from model.fielddocs import documented

if TYPE_CHECKING:  # model/ is imported lazily: the layout alone must load without Megatron-Core
    from model.config import ModelConfig


class LayoutError(ValueError):
    """A parallel layout that cannot run this model/batch; the message lists every violation and its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            f"invalid parallel layout ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n"
            + "\n".join(f"  - {p}" for p in problems))


@documented
class ParallelLayout(BaseModel):
    """How one stage is laid out over the ranks: dense parts on TP x CP x DP x PP, experts folded onto
    ETP x EP x EDP x PP over the same ranks (MoE parallel folding)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    tp: int = Field(1, ge=1)  # tensor parallel
    cp: int = Field(1, ge=1)  # context parallel (sequence split in 2*cp load-balanced chunks)
    pp: int = Field(1, ge=1)  # pipeline parallel
    vpp: Optional[int] = Field(None, ge=1)  # virtual pipeline stages per rank (interleaved 1F1B)
    ep: int = Field(1, ge=1)  # expert parallel
    etp: int = Field(1, ge=1)  # expert tensor parallel (folded: independent of tp)
    sequence_parallel: bool = False  # shard norms/dropout activations over tp; needed for MoE with tp > 1
    use_distributed_optimizer: bool = True  # ZeRO-1 style optimizer sharding over DP (Megatron DistributedOptimizer)

    # ---------------------------------------------------------------- derived sizes
    def dp(self, world_size: int) -> int:
        """Data-parallel size of the dense part: world / (tp*cp*pp)."""
        return world_size // (self.tp * self.cp * self.pp)

    def edp(self, world_size: int) -> int:
        """Data-parallel size of the expert part: world / (etp*ep*pp)."""
        return world_size // (self.etp * self.ep * self.pp)

    def num_microbatches(self, world_size: int, micro_batch_size: int, global_batch_size: int) -> int:
        """Micro-batches per step on each DP replica (what Megatron-Core's schedules take)."""
        return global_batch_size // (micro_batch_size * self.dp(world_size))

    def describe(self, world_size: int) -> str:
        vpp = f" vpp{self.vpp}" if self.vpp else ""
        sp = "+sp" if self.sequence_parallel else ""
        return (f"world {world_size}: tp{self.tp}{sp} cp{self.cp} pp{self.pp}{vpp} dp{self.dp(world_size)} | "
                f"experts: etp{self.etp} ep{self.ep} edp{self.edp(world_size)}")

    # ---------------------------------------------------------------- validation
    def problems(self, model_cfg: "ModelConfig", world_size: int, seq_length: int, micro_batch_size: int,
                 global_batch_size: int) -> list[str]:
        """Every reason this layout cannot run `model_cfg` at this world size and batch shape, one message per
        violation naming the dimension and the fix. Empty list: the layout is valid."""
        from model.pattern import split_pipeline

        out: list[str] = []
        tp, cp, pp, vpp, ep, etp = self.tp, self.cp, self.pp, self.vpp, self.ep, self.etp
        m = model_cfg
        symbols = m.all_symbols
        has_moe = "E" in symbols
        has_attn = "*" in symbols
        has_mamba = "M" in symbols
        has_mlp = "-" in symbols

        # World size: both the dense and the folded expert grid must tile it.
        if world_size < 1:
            out.append(f"world size: must be >= 1, got {world_size}")
            return out
        dense = tp * cp * pp
        if world_size % dense:
            out.append(f"world size {world_size}: not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {dense}; "
                       f"use a multiple of {dense} ranks or shrink tp/cp/pp")
        expert = etp * ep * pp
        if world_size % expert:
            out.append(f"world size {world_size}: not divisible by etp*ep*pp = {etp}*{ep}*{pp} = {expert} (the folded "
                       f"expert grid); use a multiple of {expert} ranks or shrink etp/ep")
        dp = world_size // dense if world_size % dense == 0 else None

        # Tensor parallelism: every sharded dimension must split evenly.
        def tp_divides(value: int, what: str, field: str, size: int = tp, dim: str = "tp") -> None:
            if value % size:
                out.append(f"{dim}={size}: {what} ({field}={value}) is not divisible by {dim}; "
                           f"use {dim} in {_divisors(value)} or change model.{field}")

        if has_attn:
            tp_divides(m.num_attention_heads, "attention heads", "num_attention_heads")
            # Megatron-Core 0.16 (transformer_config.py:939-946) takes tp a divisor OR a multiple of the KV group
            # count: with tp > groups each group is replicated over tp/groups ranks (attention.py:289), which the
            # published Nano/Super layouts (TP4, 2 KV groups) rely on.
            g = m.num_query_groups
            if g % tp and tp % g:
                multiples = [g * k for k in range(1, 5)]
                out.append(f"tp={tp}: KV heads (num_query_groups={g}) and tp must divide one another (each tp rank "
                           f"holds whole KV groups, or a group is replicated over tp/groups ranks); use tp in "
                           f"{sorted(set(_divisors(g)) | set(multiples))} or change model.num_query_groups")
        if has_mamba:
            tp_divides(m.mamba_num_heads, "Mamba heads", "mamba_num_heads")
            tp_divides(m.mamba_num_groups, "Mamba groups", "mamba_num_groups")
        if has_mlp:
            tp_divides(m.ffn_hidden_size, "dense MLP width", "ffn_hidden_size")
        if has_moe and m.moe_shared_expert_intermediate_size:
            tp_divides(m.moe_shared_expert_intermediate_size, "shared-expert width (sharded over tp)",
                       "moe_shared_expert_intermediate_size")
        tp_divides(m.vocab_size, "vocabulary (output layer and embedding are split over tp)", "vocab_size")

        if self.sequence_parallel and tp == 1:
            out.append("sequence_parallel: has no effect with tp=1 (it shards activations over tp); "
                       "set sequence_parallel=false or tp > 1")
        if has_moe and tp > 1 and not self.sequence_parallel:
            out.append(f"sequence_parallel: MoE layers with tp={tp} need sequence parallelism (Megatron-Core's "
                       "MoELayer refuses to train without it); set sequence_parallel=true")

        # Experts: EP splits the experts, ETP splits each expert's FFN.
        if has_moe:
            if m.num_moe_experts % ep:
                out.append(f"ep={ep}: {m.num_moe_experts} experts (num_moe_experts) are not divisible by ep; "
                           f"use ep in {_divisors(m.num_moe_experts)}")
            tp_divides(m.moe_ffn_hidden_size, "expert FFN width", "moe_ffn_hidden_size", size=etp, dim="etp")
        else:
            if ep > 1:
                out.append(f"ep={ep}: the model has no MoE ('E') layers to split; set ep=1")
            if etp > 1:
                out.append(f"etp={etp}: the model has no MoE ('E') layers to split; set etp=1")

        # Context parallelism: 2*cp load-balanced chunks; Mamba heads (and groups) are split over cp by the
        # all-to-all of MambaContextParallel.
        if cp > 1:
            if seq_length % (2 * cp):
                out.append(f"cp={cp}: seq_length {seq_length} is not divisible by 2*cp = {2 * cp} (each rank holds "
                           f"two load-balanced chunks); use a seq_length multiple of {2 * cp}")
            if has_mamba and m.mamba_num_heads % tp == 0:
                heads_tp = m.mamba_num_heads // tp
                groups_tp = m.mamba_num_groups // tp if m.mamba_num_groups % tp == 0 else None
                if heads_tp % cp:
                    out.append(f"cp={cp}: Mamba heads per tp rank ({m.mamba_num_heads}/{tp} = {heads_tp}) are not "
                               f"divisible by cp (Mamba under CP splits heads across cp ranks); "
                               f"use tp*cp dividing mamba_num_heads={m.mamba_num_heads}")
                if groups_tp and (cp % groups_tp if groups_tp < cp else groups_tp % cp):
                    out.append(f"cp={cp}: Mamba groups per tp rank ({groups_tp}) and cp must divide one another "
                               f"(MambaContextParallel shards or replicates whole groups); change cp or "
                               f"mamba_num_groups")
        if self.sequence_parallel and tp > 1:
            local = seq_length // cp if seq_length % cp == 0 else None
            if local is None or local % tp:
                step = math.lcm(2 * cp if cp > 1 else 1, cp * tp)
                out.append(f"sequence_parallel: the per-cp-rank sequence ({seq_length}/{cp}) is not divisible by "
                           f"tp={tp} (sequence parallelism splits it over tp); use a seq_length multiple of {step}")

        # Pipeline: the layer pattern must split into pp (x vpp) equal stages, as MambaStack will split it.
        if vpp is not None:
            if pp < 2:
                out.append(f"vpp={vpp}: virtual pipeline stages need pp >= 2 (pp={pp}); set vpp=null or pp >= 2")
        chunks = pp * (vpp or 1)
        if chunks > 1:
            try:
                split_pipeline(m.hybrid_override_pattern, chunks)
            except ValueError as err:
                what = f"pp*vpp = {pp}*{vpp}" if vpp else f"pp={pp}"
                out.append(f"{what}: the layer pattern {m.hybrid_override_pattern!r} ({m.num_layers} layers) cannot be "
                           f"split into {chunks} equal pipeline chunks ({err}); use "
                           f"{'pp*vpp' if vpp else 'pp'} in {_divisors(m.num_layers)}")

        # Batch: the global batch is micro-batches x DP replicas x accumulation steps.
        if micro_batch_size < 1 or global_batch_size < 1:
            out.append(f"batch: micro_batch_size ({micro_batch_size}) and global_batch_size ({global_batch_size}) "
                       "must be >= 1")
        elif dp is not None:
            if global_batch_size % (micro_batch_size * dp):
                out.append(f"dp={dp}: global_batch_size {global_batch_size} is not divisible by micro_batch_size*dp "
                           f"= {micro_batch_size}*{dp} = {micro_batch_size * dp}; use a global batch multiple of "
                           f"{micro_batch_size * dp}")
            elif vpp is not None and pp > 1:
                nmb = global_batch_size // (micro_batch_size * dp)
                if nmb % pp:
                    out.append(f"vpp={vpp}: the interleaved schedule needs the number of micro-batches ({nmb} = "
                               f"global/(micro*dp)) to be a multiple of pp={pp}; use a global batch multiple of "
                               f"{micro_batch_size * dp * pp}")
        return out

    def validate(self, model_cfg: "ModelConfig", world_size: int, seq_length: int, micro_batch_size: int,
                 global_batch_size: int) -> None:
        """Raise LayoutError listing every problem (see `problems`); return None when the layout is valid."""
        found = self.problems(model_cfg, world_size, seq_length, micro_batch_size, global_batch_size)
        if found:
            raise LayoutError(found)


def _divisors(n: int, limit: int = 64) -> list[int]:
    """Divisors of n up to `limit`: the sizes a parallel dimension could take (a readable list for big n)."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0] if n > 0 else []
