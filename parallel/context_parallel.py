"""Context-parallel sequence sharding: which load-balanced chunks of a sequence each CP rank holds.

Megatron-Core splits every sequence into 2*cp chunks and gives CP rank r the chunks r and 2*cp-1-r
(`megatron.core.utils.get_batch_on_this_cp_rank`), so causal attention work is balanced. The attention over those
chunks for the local/CPU backends is a Megatron-Core patch and lives in model/adapt/context_parallel.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def chunk_order(cp_size: int) -> list[int]:
    """Chunk ids in the order the CP ranks hold them, rank 0 first: [0, 2cp-1, 1, 2cp-2, ...]."""
    return [c for r in range(cp_size) for c in (r, 2 * cp_size - 1 - r)]


def shard_sequence(t: Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> Tensor:
    """This CP rank's two load-balanced chunks of `t` along `seq_dim` (Megatron's get_batch_on_this_cp_rank,
    for one tensor)."""
    if cp_size == 1:
        return t
    s = t.shape[seq_dim]
    if s % (2 * cp_size):
        raise ValueError(f"sequence length {s} is not divisible by 2*cp = {2 * cp_size}")
    chunks = t.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=seq_dim)


def unshard_sequence(parts: list[Tensor], seq_dim: int = 1) -> Tensor:
    """Inverse of `shard_sequence` given every rank's shard (rank order): the full sequence in natural order."""
    cp_size = len(parts)
    chunks: list[Optional[Tensor]] = [None] * (2 * cp_size)
    for r, p in enumerate(parts):
        a, b = p.chunk(2, dim=seq_dim)
        chunks[r], chunks[2 * cp_size - 1 - r] = a, b
    return torch.cat(chunks, dim=seq_dim)
