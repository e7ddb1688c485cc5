"""Packing: windows of a source's token stream (documents back to back, EOS-separated) into training tensors.

Each window holds seq_length + 1 tokens, so inputs and next-token labels come from the same window and every
token of the stream is a label exactly once. Windows are always full (a source's stream is endless: epochs
follow one another), so there is no padding and `loss_mask` is 1 except, with `eod_mask_loss` (Megatron's
flag), where the input token is EOS (the prediction that crosses into an unrelated document).

Document boundaries come as `segment_ids` [mb, seq] (0, 1, ... per document within a row) and `cu_seqlens`
(int32, THD layout over the flattened micro-batch, what `PackedSeqParams(cu_seqlens_q=...)` takes) with
`max_seqlen`; `position_ids` restart at each document with `reset_position_ids`, else run 0..seq-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    tokens: np.ndarray  # seq_length + 1 token ids
    starts: list[int]  # positions in `tokens` where a document begins (0 always counts as one)
    source: int  # index of the source in the phase's sorted source list
    sample: int  # index of this window among the source's windows in the phase


def pack(windows: list[Window], eos_id: int | None = None, eod_mask_loss: bool = False,
         reset_position_ids: bool = False) -> dict:
    import torch

    mb = len(windows)
    seq = len(windows[0].tokens) - 1
    arr = np.stack([w.tokens for w in windows]).astype(np.int64)
    tokens, labels = arr[:, :-1], arr[:, 1:]
    flags = np.zeros((mb, seq), dtype=np.int32)
    for r, w in enumerate(windows):
        flags[r, [s for s in w.starts if 0 < s < seq]] = 1
    segment_ids = np.cumsum(flags, axis=1, dtype=np.int32)
    loss_mask = np.ones((mb, seq), dtype=np.float32)
    if eod_mask_loss and eos_id is not None:
        loss_mask[tokens == eos_id] = 0.0
    if reset_position_ids:
        idx = np.broadcast_to(np.arange(seq), (mb, seq))
        seg_start = np.maximum.accumulate(np.where(flags == 1, idx, 0), axis=1)
        position_ids = (idx - seg_start).astype(np.int64)
    else:
        position_ids = np.broadcast_to(np.arange(seq, dtype=np.int64), (mb, seq)).copy()
    bounds = [0]
    for r in range(mb):
        inner = np.flatnonzero(flags[r]) + r * seq
        bounds.extend(int(x) for x in inner)
        bounds.append((r + 1) * seq)
    cu = np.asarray(bounds, dtype=np.int32)
    return {
        "tokens": torch.from_numpy(tokens.copy()),
        "labels": torch.from_numpy(labels.copy()),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": torch.tensor(int(np.diff(cu).max()), dtype=torch.int32),
        "source_ids": torch.tensor([w.source for w in windows], dtype=torch.int64),
        "sample_ids": torch.tensor([w.sample for w in windows], dtype=torch.int64),
    }
