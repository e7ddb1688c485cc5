"""Causal depthwise 1-D convolution in plain torch: the CPU stand-in for the `causal-conv1d` CUDA package.

Same contract as `causal_conv1d_fn(x, weight, bias, activation)`: x [batch, channels, seqlen], weight
[channels, width]; output t sees inputs t-width+1 .. t only. Written as `width` shifted multiply-adds (width is
4 in every Nemotron model) so that it costs O(width) elementwise passes, optionally continues from a cached
state of the previous width-1 inputs, and can hand back the new state for decoding.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_ACTIVATIONS = {None: lambda t: t, "silu": F.silu, "swish": F.silu}


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    initial_state: Optional[Tensor] = None,
    return_final_state: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """y[:, c, t] = act(bias[c] + sum_j weight[c, j] * x_ext[:, c, t + j]) with x_ext = [state | x] (state: the
    width-1 inputs before x, zeros when not given). Returns y (and the last width-1 inputs of x_ext)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, channels, seqlen], got shape {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.dim() == 3 and weight.shape[1] == 1:  # nn.Conv1d layout [channels, 1, width]
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be [channels={d}, width], got shape {tuple(weight.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(k for k in _ACTIVATIONS if k)} or None, got {activation!r}")
    k = weight.shape[1]
    if initial_state is None:
        xe = F.pad(x, (k - 1, 0))
    else:
        if initial_state.shape != (b, d, k - 1):
            raise ValueError(f"initial_state must be [b, channels, width-1] = {(b, d, k - 1)}, "
                             f"got {tuple(initial_state.shape)}")
        xe = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    # FP32 accumulation and activation, then one rounding to x's dtype, as causal-conv1d and cuDNN do (a BF16
    # running sum rounded after every tap).
    xf, wf = xe.float(), weight.float()
    y = xf[:, :, 0:l] * wf[:, 0, None]
    for j in range(1, k):
        y = y + xf[:, :, j:j + l] * wf[:, j, None]
    if bias is not None:
        y = y + bias.float()[:, None]
    y = _ACTIVATIONS[activation](y).to(x.dtype)
    if return_final_state:
        return y, xe[:, :, xe.shape[-1] - (k - 1):].clone()
    return y
