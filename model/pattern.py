"""Layer-pattern strings (`MEM*E...`): parsing and splitting over pipeline stages.

Megatron-Core's `allocate_layers` accepts a pattern but, for pipeline parallelism, silently floors
`num_layers // pp` and drops the remainder (ssm/mamba_block.py `_select_layers_for_pipeline_parallel`). Foldtron
checks first and names the problem, then hands Megatron-Core a split it will reproduce exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import LAYER_SYMBOLS, check_pattern


@dataclass(frozen=True)
class StageLayers:
    """The layers one pipeline stage holds: global offset of its first layer and its slice of the pattern."""

    stage: int
    offset: int
    pattern: str


def parse_pattern(pattern: str, num_layers: Optional[int] = None, field: str = "hybrid_override_pattern") -> list[str]:
    """One symbol per layer; a bad symbol or a length that disagrees with num_layers is a ValueError."""
    return list(check_pattern(pattern, field, num_layers))


def layer_kind(symbol: str) -> str:
    return LAYER_SYMBOLS[symbol]


def split_pipeline(
    pattern: str,
    pp_size: int,
    num_layers_in_first_pipeline_stage: Optional[int] = None,
    num_layers_in_last_pipeline_stage: Optional[int] = None,
) -> list[StageLayers]:
    """Per-stage slices, exactly as Megatron-Core's MambaStack will select them, or a ValueError saying why not.

    Even split: num_layers must divide by pp_size. Uneven: first/last stage sizes as Megatron's
    `num_layers_in_{first,last}_pipeline_stage`; the remaining layers must divide over the middle stages.
    """
    parse_pattern(pattern)
    n = len(pattern)
    if pp_size < 1:
        raise ValueError(f"pipeline size must be >= 1, got {pp_size}")
    first, last = num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage
    if first is None and last is None:
        if n % pp_size:
            raise ValueError(
                f"the pattern has {n} layers, which do not split evenly over {pp_size} pipeline stages; "
                f"set num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage or change pp")
        per = n // pp_size
        sizes = [per] * pp_size
    else:
        if pp_size == 1:
            raise ValueError("num_layers_in_first/last_pipeline_stage need pipeline size > 1")
        for name, v in (("num_layers_in_first_pipeline_stage", first), ("num_layers_in_last_pipeline_stage", last)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        middle_stages = pp_size - (first is not None) - (last is not None)
        rest = n - (first or 0) - (last or 0)
        if rest < 0 or (middle_stages == 0 and rest != 0):
            raise ValueError(
                f"first/last stage sizes ({first}, {last}) do not add up with {n} layers over {pp_size} stages")
        if middle_stages and (rest % middle_stages or rest // middle_stages == 0):
            raise ValueError(
                f"{rest} layers left for {middle_stages} middle pipeline stages do not split evenly into non-empty stages")
        per = rest // middle_stages if middle_stages else 0
        sizes = ([first] if first is not None else []) + [per] * middle_stages + ([last] if last is not None else [])
    if any(s == 0 for s in sizes):
        raise ValueError(f"a pipeline stage would hold no layers ({n} layers over {pp_size} stages)")
    stages, offset = [], 0
    for i, s in enumerate(sizes):
        stages.append(StageLayers(i, offset, pattern[offset:offset + s]))
        offset += s
    return stages


@dataclass(frozen=True)
class ChunkLayers:
    """One model chunk of the interleaved schedule: pipeline rank, virtual stage, global offset, its slice."""

    pp_rank: int
    vp_stage: int
    offset: int
    pattern: str


def pipeline_chunks(
    pattern: str,
    pp_size: int,
    vpp_size: Optional[int] = None,
    num_layers_in_first_pipeline_stage: Optional[int] = None,
    num_layers_in_last_pipeline_stage: Optional[int] = None,
) -> list[ChunkLayers]:
    """Every model chunk (pp rank x virtual stage) in global layer order, placed exactly as Megatron-Core's
    `get_transformer_layer_offset` / `get_num_layers_to_build` place TransformerLayers (transformer_layer.py:40,
    transformer_block.py:75), so the hybrid stack's Mamba layers land in the same chunks as its attention/MLP/MoE
    layers. Virtual stage v of every rank comes before virtual stage v+1 of any rank: with 8 layers, pp=2, vpp=2,
    rank 0 holds [0,1] and [4,5], rank 1 holds [2,3] and [6,7]. Without vpp this is `split_pipeline` with vp_stage 0.
    """
    first, last = num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage
    stages = split_pipeline(pattern, pp_size, first, last)
    if vpp_size is None or vpp_size == 1:
        return [ChunkLayers(s.stage, 0, s.offset, s.pattern) for s in stages]
    if vpp_size < 1:
        raise ValueError(f"virtual pipeline size must be >= 1, got {vpp_size}")
    if pp_size < 2:
        raise ValueError(f"virtual pipeline stages (vpp={vpp_size}) need pipeline size >= 2, got pp={pp_size}")
    if first is not None and last is not None and pp_size == 2:
        # Megatron-Core 0.16.1's get_transformer_layer_offset divides by the number of middle stages here (0).
        raise ValueError(
            f"vpp={vpp_size} with pp=2 and both num_layers_in_first_pipeline_stage and "
            "num_layers_in_last_pipeline_stage set is not placeable by Megatron-Core (no middle stage); set only "
            "num_layers_in_first_pipeline_stage (the last stage gets the rest)")
    for s in stages:
        if len(s.pattern) % vpp_size:
            which = ("num_layers_in_first_pipeline_stage" if s.stage == 0 and first is not None else
                     "num_layers_in_last_pipeline_stage" if s.stage == pp_size - 1 and last is not None else
                     "the layers per pipeline stage")
            raise ValueError(
                f"pipeline stage {s.stage} holds {len(s.pattern)} layers, which do not split into vpp={vpp_size} "
                f"virtual stages; make {which} a multiple of {vpp_size} or change vpp")
    # Each virtual stage v is a full pass over the ranks: per rank, its stage size / vpp layers, in rank order.
    per_rank = [len(s.pattern) // vpp_size for s in stages]
    span = sum(per_rank)
    chunks = []
    for v in range(vpp_size):
        offset = v * span
        for rank, n in enumerate(per_rank):
            chunks.append(ChunkLayers(rank, v, offset, pattern[offset:offset + n]))
            offset += n
    return chunks
