"""Mamba-2 SSD (state-space duality) scan in plain torch: the CPU path of the Mamba-2 mixer.

On GPU the mixer runs mamba-ssm's Triton kernels; this module computes the same recurrence

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        (per head; state [headdim, d_state])
    y_t = h_t C_t + D * x_t

in the chunked form of the Mamba-2 paper (arXiv 2405.21060, "ssd_minimal"): inside a chunk of T tokens the
output is a masked (T x T) attention-like product; between chunks only the [headdim, d_state] state travels,
through a short sequential loop. All contractions are explicit matmuls so that `torch.utils.flop_counter`
sees exactly the FLOPs that `model.counting` reports for the scan (see `ssd_matmul_flops`).

`ssd_recurrent` is the naive step-by-step recurrence, kept as the reference the tests compare against.
Imports nothing of ours (kernels/ is the bottom layer).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[int, int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seqlen, heads, headdim], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be [batch, seqlen, heads] = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [heads] = ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"B and C must both be [batch, seqlen, groups, d_state]; got {tuple(B.shape)}, {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    return b, l, h, p, g, n


def _d_skip(y: Tensor, x: Tensor, D: Optional[Tensor]) -> Tensor:
    if D is None:
        return y
    if D.dim() == 1:  # one value per head
        return y + x * D[:, None].to(x.dtype)
    return y + x * D.to(x.dtype)  # [heads, headdim]


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Chunked SSD scan.

    x [b, l, h, p]; dt [b, l, h] (already biased, softplus'ed and clamped: the caller owns those choices);
    A [h] (negative); B, C [b, l, g, n] with heads h // (h/g) .. sharing group g (mamba-ssm's layout);
    D [h] or [h, p]; initial_states [b, h, p, n]. Returns y [b, l, h, p] (and the final state [b, h, p, n]).
    Computes in fp32 and returns x's dtype. Any length works: the tail chunk is padded with dt = 0, which
    leaves both the outputs before it and the state unchanged.
    """
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype = x.dtype
    r = h // g  # heads per group
    T = chunk_size
    pad = (-l) % T
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // T

    # [b, c, T, ...] chunks; heads split as (g, r) so B/C are never copied per head.
    xc = xf.view(b, c, T, g, r, p)
    dA = (dtf * A.float()).view(b, c, T, g, r)
    Acs = torch.cumsum(dA, dim=2)  # within-chunk cumulative log-decay
    Bc = Bf.view(b, c, T, g, n)
    Cc = Cf.view(b, c, T, g, n)
    xdt = xc * dtf.view(b, c, T, g, r, 1)

    # 1. Intra-chunk (diagonal blocks): y_l = sum_{s<=l} (C_l.B_s) exp(Acs_l - Acs_s) dt_s x_s
    CB = torch.matmul(Cc.permute(0, 1, 3, 2, 4), Bc.permute(0, 1, 3, 4, 2))  # [b, c, g, T(l), T(s)]
    Acs_h = Acs.permute(0, 1, 3, 4, 2)  # [b, c, g, r, T]
    seg = Acs_h[..., :, None] - Acs_h[..., None, :]  # [b, c, g, r, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    M = CB[:, :, :, None] * decay  # [b, c, g, r, T, T]
    xdt_h = xdt.permute(0, 1, 3, 4, 2, 5)  # [b, c, g, r, T, p]
    y = torch.matmul(M, xdt_h)  # [b, c, g, r, T, p]

    # 2. State contributed by each chunk, decayed to the chunk's end: sum_s exp(Acs_end - Acs_s) dt_s x_s B_s^T
    decay_to_end = torch.exp(Acs_h[..., -1:] - Acs_h)  # [b, c, g, r, T]
    xw = xdt_h * decay_to_end[..., None]  # [b, c, g, r, T, p]
    chunk_states = torch.matmul(xw.transpose(-1, -2), Bc.permute(0, 1, 3, 2, 4)[:, :, :, None])  # [b,c,g,r,p,n]

    # 3. Inter-chunk recurrence on the small state (sequential over chunks; elementwise only).
    chunk_decay = torch.exp(Acs_h[..., -1])  # [b, c, g, r]
    if initial_states is None:
        state = torch.zeros(b, g, r, p, n, dtype=torch.float32, device=x.device)
    else:
        if initial_states.shape != (b, h, p, n):
            raise ValueError(f"initial_states must be [b, h, p, n] = {(b, h, p, n)}, got {tuple(initial_states.shape)}")
        state = initial_states.float().reshape(b, g, r, p, n)
    entering = []
    for k in range(c):
        entering.append(state)
        state = state * chunk_decay[:, k, :, :, None, None] + chunk_states[:, k]
    states_in = torch.stack(entering, dim=1)  # [b, c, g, r, p, n]: state entering each chunk

    # 4. Off-diagonal: y_l += exp(Acs_l) C_l . state_in
    Cg = Cc.permute(0, 1, 3, 2, 4)[:, :, :, None]  # [b, c, g, 1, T, n]
    y_off = torch.matmul(Cg, states_in.transpose(-1, -2))  # [b, c, g, r, T, p]
    y = y + y_off * torch.exp(Acs_h)[..., None]

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * T, h, p)[:, :l]
    y = _d_skip(y, x.float(), None if D is None else D.float()).to(out_dtype)
    if return_final_states:
        return y, state.reshape(b, h, p, n)
    return y


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The naive token-by-token recurrence (the definition); same arguments as `ssd_scan`. Also the decode step."""
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C)
    r = h // g
    Bh = B.float().repeat_interleave(r, dim=2)  # [b, l, h, n]
    Ch = C.float().repeat_interleave(r, dim=2)
    state = (torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device) if initial_states is None
             else initial_states.float().clone())
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, t].float() * A.float())  # [b, h]
        state = state * dA[:, :, None, None] + (dt[:, t].float()[:, :, None, None]
                                                * x[:, t].float()[..., None] * Bh[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.float() * 0
    y = _d_skip(y, x.float(), None if D is None else D.float()).to(x.dtype)
    if return_final_states:
        return y, state
    return y


def ssd_matmul_flops(seqlen: int, heads: int, headdim: int, groups: int, d_state: int, chunk_size: int) -> int:
    """Forward matmul FLOPs of `ssd_scan` for one sequence (what the flop counter sees; 2 per multiply-add).

    Per chunk of T tokens: C B^T per group (2 T^2 n g), the masked product with x dt per head (2 T^2 p h), the
    chunk state (2 T p n h) and the off-diagonal read-out (2 T p n h). The decay exponentials, the mask and the
    inter-chunk recurrence are elementwise and not counted.
    """
    T = chunk_size
    c = -(-seqlen // T)
    return c * (2 * T * T * d_state * groups + 2 * T * T * headdim * heads + 4 * T * headdim * d_state * heads)
