"""Emulated low-precision linear layer: the three GEMMs of a training step the way TE's recipes quantize them.

NVFP4 (TE ``NVFP4BlockScaling``; arXiv 2509.25149):
  fprop  y  = x @ W^T      x row-wise 1x16 RTNE,               W 16x16 (2-D) RTNE
  dgrad  dx = dy @ W       dy row-wise 1x16 stochastic,        W^T 16x16 RTNE — the same values as W (2-D tiles)
  wgrad  dW = dy^T @ x     x^T and dy^T 1x16 along tokens after the 16x16 RHT; dy^T stochastic, x^T RTNE
MXFP8 (TE ``MXFP8BlockScaling``, E4M3 everywhere): the same three GEMMs with 1x32 E4M3 blocks along each GEMM's
contraction dimension, RTNE, no RHT. Every quantized copy is made from the high-precision source, never from
another quantized copy. Operands are dequantized to fp32 and multiplied in fp32 (fp32 accumulation); outputs
and gradients come back in the input / weight dtype.

What is bit-exact and what is not: each quantized operand has TE's bits (see nvfp4.py / mxfp8.py); the fp32
GEMM's summation order is torch's, not the tensor core's, so GEMM outputs agree with hardware to fp32 rounding,
not bit for bit; stochastic rounding draws from a seeded ``torch.Generator``, not TE's Philox stream.

Randomness: ``seed`` seeds one generator per backward call; the rows of dy are drawn first, then the RHT'd dy^T.
Callers pass a new seed per step/call (``model/lowp.py`` derives it from a base seed, module and call count) so
draws are fresh each step and a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from .hadamard import apply_rht, random_signs, te_signs
from .mxfp8 import quantize_mxfp8
from .nvfp4 import TILE_1D, TILE_2D, quantize_nvfp4

Format = Literal["fp32", "bf16", "mxfp8", "nvfp4"]
FORMATS = ("fp32", "bf16", "mxfp8", "nvfp4")
#: probe(role, high-precision operand as quantized (fp32, GEMM layout), its dequantized copy, saturated count)
Probe = Callable[[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


@dataclass(frozen=True)
class LowPrecisionOptions:
    """NVFP4 recipe switches, named after TE ``NVFP4BlockScaling``'s ``disable_*`` fields (inverted)."""

    rht: bool = True  # 16x16 RHT on the wgrad inputs (disable_rht=False)
    stochastic_rounding: bool = True  # SR on gradients (disable_stochastic_rounding=False)
    two_d_weights: bool = True  # 16x16 weight tiles (disable_2d_quantization=False); else 1x16
    rht_seed: Optional[int] = None  # None: TE's fixed wgrad sign vector; an int: seeded random signs

    def signs(self) -> torch.Tensor:
        return te_signs() if self.rht_seed is None else random_signs(self.rht_seed)


def _nvfp4(t2, *, tile, rounding="rtne", gen=None, axis="row", probe=None, role="", signs=None):
    """Dequantized NVFP4 copy of a 2-D tensor in the layout the GEMM consumes ((rows, K) for axis=row,
    the transpose for axis=col; with ``signs``, the RHT'd transpose)."""
    if signs is not None:
        src, axis = apply_rht(t2.t(), signs), "row"
        if t2.dtype in (torch.bfloat16, torch.float16):
            # TE's non-fused RHT path writes RHT(x^T) in the input dtype before quantising (csrc/quantizer.cpp,
            # v2.10 ~1608-1632, as read in shared/reference/gpu-audit.md): the same rounding here.
            src = src.to(t2.dtype)
    else:
        src = t2
    q = quantize_nvfp4(src, tile=tile, rounding=rounding, generator=gen, axis=axis,
                       count_saturated=probe is not None, what=role)
    dq = q.dequantize()
    if probe is not None:
        probe(role, (src if axis == "row" else src.t()).float(), dq, q.saturated)
    return dq


def _mxfp8(t2, *, axis="row", probe=None, role=""):
    q = quantize_mxfp8(t2, axis=axis, count_saturated=probe is not None, what=role)
    dq = q.dequantize()
    if probe is not None:
        probe(role, (t2 if axis == "row" else t2.t()).float(), dq, q.saturated)
    return dq


def _seed_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


class LowPrecisionLinearFn(torch.autograd.Function):
    """y = x @ W^T (+ b) with operands quantized per ``fmt``. ``apply(x, weight, bias, fmt, opts, seed, probe)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, fmt: Format, opts: LowPrecisionOptions, seed: int, probe: Optional[Probe]):
        if fmt not in FORMATS:
            raise ValueError(f"unknown linear format {fmt!r}; use one of {FORMATS}")
        if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear shapes do not match: input {tuple(x.shape)}, weight {tuple(weight.shape)}")
        x2 = x.reshape(-1, x.shape[-1])
        if fmt == "nvfp4":
            xq = _nvfp4(x2, tile=TILE_1D, probe=probe, role="fprop.x")
            wq = _nvfp4(weight, tile=TILE_2D if opts.two_d_weights else TILE_1D, probe=probe, role="fprop.w")
        elif fmt == "mxfp8":
            xq = _mxfp8(x2, probe=probe, role="fprop.x")
            wq = _mxfp8(weight, probe=probe, role="fprop.w")
        elif fmt == "bf16":
            xq, wq = x2.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float()
        else:
            xq, wq = x2.float(), weight.float()
        y = xq @ wq.t()
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x, weight)
        ctx.fmt, ctx.opts, ctx.seed, ctx.probe, ctx.has_bias = fmt, opts, seed, probe, bias is not None
        out = y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
        # a view of a tensor made here must not leave a custom Function (callers such as Megatron's
        # cross-entropy modify outputs in place), so return an owning tensor
        return out.clone() if out._base is not None else out

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        fmt, opts, probe = ctx.fmt, ctx.opts, ctx.probe
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = None
        if fmt == "nvfp4":
            gen = _seed_generator(ctx.seed, dy.device)
            sr = "stochastic" if opts.stochastic_rounding else "rtne"
            wtile = TILE_2D if opts.two_d_weights else TILE_1D
            dyq = _nvfp4(dy2, tile=TILE_1D, rounding=sr, gen=gen, probe=probe, role="dgrad.dy")
            if need_dx:
                wtq = _nvfp4(weight, tile=wtile, axis="col", probe=probe, role="dgrad.w")  # W^T, from the source
                dx = dyq @ wtq.t()
            if need_dw:
                signs = opts.signs() if opts.rht else None
                dytq = _nvfp4(dy2, tile=TILE_1D, rounding=sr, gen=gen, axis="col", signs=signs, probe=probe,
                              role="wgrad.dy")
                xtq = _nvfp4(x2, tile=TILE_1D, axis="col", signs=signs, probe=probe, role="wgrad.x")
                dw = dytq @ xtq.t()
        elif fmt == "mxfp8":
            if need_dx:
                dx = _mxfp8(dy2, probe=probe, role="dgrad.dy") @ _mxfp8(weight, axis="col", probe=probe,
                                                                         role="dgrad.w").t()
            if need_dw:
                dw = _mxfp8(dy2, axis="col", probe=probe, role="wgrad.dy") @ _mxfp8(
                    x2, axis="col", probe=probe, role="wgrad.x").t()
        else:
            cast = (lambda t: t.to(torch.bfloat16).float()) if fmt == "bf16" else (lambda t: t.float())
            if need_dx:
                dx = cast(dy2) @ cast(weight)
            if need_dw:
                dw = cast(dy2).t() @ cast(x2)
        if dx is not None:
            dx = dx.to(x.dtype).reshape(x.shape)
        if dw is not None:
            dw = dw.to(weight.dtype)
        db = dy2.float().sum(0).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def lowp_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    fmt: Format = "nvfp4",
    opts: Optional[LowPrecisionOptions] = None,
    seed: int = 0,
    probe: Optional[Probe] = None,
) -> torch.Tensor:
    """Functional entry (like ``F.linear``) used by the model's linear layers."""
    return LowPrecisionLinearFn.apply(x, weight, bias, fmt, opts or LowPrecisionOptions(), seed, probe)
