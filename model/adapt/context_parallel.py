"""Context-parallel attention for the local and CPU backends: exact attention over load-balanced chunks.

Megatron-Core splits every sequence into 2*cp chunks and gives CP rank r the chunks r and 2*cp-1-r
(`get_batch_on_this_cp_rank`), so causal work is balanced. Attention then needs the keys and values of the whole
sequence; Megatron-Core implements that only in Transformer Engine (ring attention), and its local
`DotProductAttention` asserts `context_parallel_size == 1` (transformer/dot_product_attention.py:57 in 0.19.2).

Here the local attention learns CP exactly: all-gather K and V over the CP group (backward: reduce-scatter, via
Megatron's own `gather_from_sequence_parallel_region`), give every gathered row its global position, and mask
causally by global positions. Memory is O(s_local * s) per rank instead of ring attention's O(s_local^2), which
is fine for CPU tests and for checking TE's ring against it; the result equals attention on the full sequence.
Mamba layers need nothing here: Megatron-Core's `MambaContextParallel` does the all-to-all in plain torch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_INSTALLED = False


def local_positions(s_local: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global positions of this rank's s_local rows (two chunks: r and 2cp-1-r)."""
    c = s_local // 2
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    j = 2 * cp_size - 1 - cp_rank
    return torch.cat([first, torch.arange(j * c, (j + 1) * c, device=device)])


def gathered_positions(s_local: int, cp_size: int, device=None) -> Tensor:
    """Global positions of the rows of a first-dim all-gather over the CP group (rank order)."""
    return torch.cat([local_positions(s_local, cp_size, r, device) for r in range(cp_size)])


def cp_attention(query: Tensor, key: Tensor, value: Tensor, cp_group, *, scale: float, causal: bool,
                 dropout: Optional[torch.nn.Module] = None) -> Tensor:
    """Exact attention for this CP rank's queries against the whole (gathered) sequence.

    query [s_local, b, np, hn]; key/value [s_local, b, ng, hn] with np % ng == 0 (GQA); returns
    [s_local, b, np*hn]. Softmax in fp32."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    s_local, b, np_, hn = query.shape
    if s_local % 2:
        raise ValueError(f"the local sequence ({s_local}) must hold two equal load-balanced chunks")
    k_all = gather_from_sequence_parallel_region(key.contiguous(), True, group=cp_group)
    v_all = gather_from_sequence_parallel_region(value.contiguous(), True, group=cp_group)
    rep = np_ // key.shape[2]
    if rep > 1:
        k_all = k_all.repeat_interleave(rep, dim=2)
        v_all = v_all.repeat_interleave(rep, dim=2)
    # [b, np, s_local, hn] x [b, np, hn, s] -> [b, np, s_local, s]
    q = query.permute(1, 2, 0, 3)
    k = k_all.permute(1, 2, 3, 0)
    scores = torch.matmul(q.float(), k.float()) * scale
    if causal:
        qpos = local_positions(s_local, cp_size, cp_rank, query.device)
        kpos = gathered_positions(s_local, cp_size, query.device)
        scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout is not None:
        probs = dropout(probs)
    ctx = torch.matmul(probs, v_all.permute(1, 2, 0, 3))  # [b, np, s_local, hn]
    return ctx.permute(2, 0, 1, 3).reshape(s_local, b, np_ * hn)


def install() -> None:
    """Teach Megatron-Core's local DotProductAttention context parallelism (idempotent). With cp == 1 its code
    runs unchanged; TEDotProductAttention (GPU production path) is not touched, TE does CP itself."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer import dot_product_attention as dpa
    from megatron.core.transformer.enums import AttnMaskType

    cls = dpa.DotProductAttention
    orig_init, orig_forward = cls.__init__, cls.forward

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        cp = config.context_parallel_size
        if cp == 1:
            return orig_init(self, config, layer_number, attn_mask_type, attention_type, attention_dropout,
                             softmax_scale, cp_comm_type, pg_collection)
        # dot_product_attention.py:57 asserts cp == 1; build with a cp=1 view of the config, then keep the real one.
        import copy

        cfg1 = copy.copy(config)
        object.__setattr__(cfg1, "context_parallel_size", 1)
        orig_init(self, cfg1, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                  cp_comm_type, pg_collection)
        self.config = config
        group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = group if group is not None else parallel_state.get_context_parallel_group()
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise NotImplementedError("CPU context-parallel attention supports full causal/no-mask softmax attention "
                                      "only (no sliding window, no softmax offset)")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        group = getattr(self, "cp_group", None)
        if group is None or group.size() == 1:
            return orig_forward(self, query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("CPU context-parallel attention: packed sequences and attention bias need TE")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is not None:
            raise NotImplementedError("CPU context-parallel attention takes no explicit attention_mask (causal or "
                                      "no_mask only, like TE's CP)")
        if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise NotImplementedError(f"CPU context-parallel attention: mask type {mask_type} is not supported")
        coeff = self.scale_mask_softmax.scale or 1.0  # apply_query_key_layer_scaling divides then multiplies back
        dropout = self.attention_dropout if self.training and self.attention_dropout.p > 0 else None
        if dropout is not None and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return cp_attention(query, key, value, group, scale=self.softmax_scale * coeff,
                                    causal=mask_type == AttnMaskType.causal, dropout=dropout)
        return cp_attention(query, key, value, group, scale=self.softmax_scale * coeff,
                            causal=mask_type == AttnMaskType.causal, dropout=dropout)

    cls.__init__ = __init__
    cls.forward = forward
    _INSTALLED = True
