"""MXFP8 reference quantize/dequantize (OCP MX: E4M3 values, 32-element blocks, UE8M0 power-of-two scales).

Super keeps the Mamba output projection in MXFP8 to avoid the underflow it sees in NVFP4. Scale arithmetic is
bit-for-bit TE's MXFP8 cast kernels (transformer_engine/common/cast/mxfp8/quantize_mxfp8.cuh, "2. Compute E8M0
scaling factor" / "3. Scale elements"):
  ``biased_exponent = ptx::float_to_e8m0(block_amax * Quantized_Limits<fp8e4m3>::max_norm_rcp)``
  ``out = static_cast<fp8e4m3>(x * ptx::exp2f_rcp(biased_exponent))``
with ``max_norm_rcp`` = (float)(1.0/448). There is no per-tensor scale and no stochastic rounding in TE's
``MXFP8BlockScaling``; the column-wise copy is the same quantization of the transpose (32x1 blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .rounding import E4M3_MAX, check_finite, e8m0_rcp, e8m0_to_float, float_to_e8m0, to_e4m3

BLOCK = 32
_F32 = torch.float32
_MAX_NORM_RCP = torch.tensor(1.0 / 448.0, dtype=_F32, device="cpu")  # host constant, moved at use


@dataclass
class MXFP8Tensor:
    values: torch.Tensor  # float8_e4m3fn (rows, cols)
    scales: torch.Tensor  # uint8 UE8M0 biased exponents (rows, ceil(cols / 32))
    saturated: Optional[torch.Tensor] = None  # 0-d count of values clipped at ±448 (when asked for)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self) -> torch.Tensor:
        cols = self.values.shape[1]
        scale = e8m0_to_float(self.scales).repeat_interleave(BLOCK, dim=1)[:, :cols]
        return self.values.to(_F32) * scale


def quantize_mxfp8(
    x: torch.Tensor,
    *,
    axis: Literal["row", "col"] = "row",
    count_saturated: bool = False,
    what: str = "tensor",
) -> MXFP8Tensor:
    """Quantize ``x`` (leading dims flattened) with 1x32 blocks along the last dim, or of its transpose (axis="col")."""
    if x.dim() == 0:
        raise ValueError(f"cannot quantize {what}: it is a scalar; MXFP8 needs at least one dimension")
    check_finite(x, what)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if axis == "col":
        x2 = x2.t()
    elif axis != "row":
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    x2 = x2.to(_F32)
    rows, cols = x2.shape
    pc = (-cols) % BLOCK
    xp = torch.nn.functional.pad(x2, (0, pc)) if pc else x2
    xb = xp.view(rows, -1, BLOCK)
    block_amax = xb.abs().amax(dim=-1)
    e = float_to_e8m0(block_amax * _MAX_NORM_RCP.to(x2.device))
    scaled = xb * e8m0_rcp(e).unsqueeze(-1)
    saturated = (scaled.abs() > E4M3_MAX).view(rows, -1)[:, :cols].sum() if count_saturated else None
    values = to_e4m3(scaled).view(rows, -1)[:, :cols]
    return MXFP8Tensor(values=values.contiguous(), scales=e, saturated=saturated)


def mxfp8_fake_quantize(x: torch.Tensor, **kwargs) -> torch.Tensor:
    return quantize_mxfp8(x, **kwargs).dequantize()
