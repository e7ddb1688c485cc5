"""NVFP4 reference quantize/dequantize, bit-for-bit Transformer Engine's scale arithmetic.

Format (arXiv 2509.25149; TE ``NVFP4BlockScaling``): E2M1 values, one E4M3 decode scale per block of 16
consecutive values, one FP32 per-tensor scale. Blocks are 1x16 along the last (contraction) dimension for
activations and gradients, 16x16 tiles for weights (so W and W^T quantize to the same values).

Scale arithmetic, all in fp32, in the order TE's CUDA kernels do it:
  * per-tensor encode scale ``S_enc = 448*6 / amax`` clamped to FLT_MAX, and 1 when amax == 0 or S_enc == 0:
    ``core::compute_global_encode_scaling_factor_FP4`` in transformer_engine/common/cast/nvfp4/core_nvfp4.cuh.
  * block decode scale ``S_dec_b = e4m3(block_amax * (S_enc * (1.0f/6.0f)))`` (satfinite):
    ``quantization_and_transposition_SF::compute_decoding_scaling_factor`` in the same file. (TE's python
    reference ``experimental/quantization_nvfp4.py::_quantize_blockwise_reference`` writes it as
    ``(vec_max / 6) * global_encode_scale``; we follow the CUDA kernel, which is what runs.)
  * block encode coefficient ``min(1 / (float(S_dec_b) * (1/S_enc)), FLT_MAX)``:
    ``core::compute_scaling_coefficient<float>`` in the same file (= the python reference's ``encode_scale``).
  * values ``x * coeff`` clamped to ±6 (``cvt.rn.satfinite.e2m1x2.f32``) and rounded RTNE or stochastically.
  * dequantize ``e2m1 * ((float(S_dec_b) * amax) * float(1/(6*448)))``: ``dequantize_fp4_kernel`` in
    transformer_engine/common/cast/nvfp4/dequantize_nvfp4.cuh.
The column-wise copy (what TE calls ``data_t``) is the same quantization applied to the transpose, with its own
amax taken after the optional RHT (python reference ``NVFP4QuantizerRef._quantize``).

Shapes that are not multiples of the block are zero-padded for the block computation and cropped after: zeros
never change a block's amax, so this equals quantizing the ragged block (TE's reference pads the same way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch

from .rounding import E2M1_MAX, E4M3_MAX, FP32_MAX, Rounding, check_finite, e2m1_decode, e2m1_encode, to_e4m3

BLOCK = 16
Tile = Tuple[int, int]
TILE_1D: Tile = (1, 16)
TILE_2D: Tile = (16, 16)

_F32 = torch.float32
# fp32 constants exactly as the CUDA code forms them: 1.0f/6.0f (float division) and (float)(1.0/(6.0*448.0)).
# Host constants (device="cpu"), moved to the operand's device at each use.
_RCP_6 = torch.tensor(1.0, dtype=_F32, device="cpu") / torch.tensor(6.0, dtype=_F32, device="cpu")
_DEQ_FACTOR = torch.tensor(1.0 / (6.0 * 448.0), dtype=_F32, device="cpu")
_ENC_NUM = torch.tensor(E4M3_MAX * E2M1_MAX, dtype=_F32, device="cpu")  # 2688, exact


@dataclass
class NVFP4Tensor:
    """One quantized copy (row-wise, or column-wise = of the transpose) of a 2-D tensor.

    ``codes`` keeps one 4-bit code per uint8 for clarity (``pack_fp4x2`` gives TE's byte layout); ``scales`` holds
    one E4M3 decode scale per row and 16-column block (for 16x16 tiles, the tile's scale repeated on its 16 rows).
    """

    codes: torch.Tensor  # uint8 (rows, cols)
    scales: torch.Tensor  # float8_e4m3fn (rows, ceil(cols / 16))
    amax: torch.Tensor  # fp32 0-d: the global amax this copy was scaled with
    tile: Tile
    saturated: Optional[torch.Tensor] = None  # 0-d count of values clipped at ±6 (when asked for)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        final_scale = (self.scales.to(_F32) * self.amax) * _DEQ_FACTOR.to(self.amax.device)
        final_scale = final_scale.repeat_interleave(BLOCK, dim=1)[:, :cols]
        return e2m1_decode(self.codes) * final_scale


def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """TE core_nvfp4.cuh ``compute_global_encode_scaling_factor_FP4`` (E4M3_MAX=448)."""
    amax = amax.to(_F32)
    s = torch.clamp(_ENC_NUM.to(amax.device) / amax, max=FP32_MAX)
    return torch.where((amax == 0) | (s == 0), torch.ones_like(s), s)


def _pad(x: torch.Tensor, rows_to: int, cols_to: int) -> torch.Tensor:
    r, c = x.shape
    pr, pc = (-r) % rows_to, (-c) % cols_to
    return torch.nn.functional.pad(x, (0, pc, 0, pr)) if (pr or pc) else x


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    tile: Tile = TILE_1D,
    rounding: Rounding = "rtne",
    generator: Optional[torch.Generator] = None,
    axis: Literal["row", "col"] = "row",
    amax: Optional[torch.Tensor] = None,
    count_saturated: bool = False,
    what: str = "tensor",
) -> NVFP4Tensor:
    """Quantize ``x`` (any float dtype, >= 1-D; leading dims are flattened as TE does) to NVFP4.

    ``axis="col"`` quantizes the transpose (TE's column-wise copy, blocks run down the columns of ``x``).
    ``amax`` overrides the global amax (e.g. an amax all-reduced over a tensor-parallel group); by default it is
    max|x| of the copy being quantized. ``what`` names the tensor in error messages.
    """
    if tile not in (TILE_1D, TILE_2D):
        raise ValueError(f"NVFP4 tiles are {TILE_1D} (activations, gradients) or {TILE_2D} (weights), got {tile}")
    if x.dim() == 0:
        raise ValueError(f"cannot quantize {what}: it is a scalar; NVFP4 needs at least one dimension")
    check_finite(x, what)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if axis == "col":
        x2 = x2.t()
    elif axis != "row":
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    x2 = x2.to(_F32)
    rows, cols = x2.shape
    if amax is None:
        amax = x2.abs().max() if x2.numel() else torch.zeros((), dtype=_F32, device=x2.device)
    amax = amax.to(_F32).reshape(())
    s_enc = global_encode_scale(amax)

    xp = _pad(x2, tile[0], BLOCK)
    pr, pc = xp.shape
    nb = pc // BLOCK
    xb = xp.view(pr, nb, BLOCK)
    if tile == TILE_2D:
        tile_amax = xp.view(pr // BLOCK, BLOCK, nb, BLOCK).abs().amax(dim=(1, 3))  # (pr/16, nb)
        block_amax = tile_amax.repeat_interleave(BLOCK, dim=0)  # per row, like the reference's vec_max
    else:
        block_amax = xb.abs().amax(dim=-1)
    s_dec_b = to_e4m3(torch.clamp(block_amax * (s_enc * _RCP_6.to(s_enc.device)), max=FP32_MAX))
    coeff = torch.clamp(1.0 / (s_dec_b.to(_F32) * (1.0 / s_enc)), max=FP32_MAX)
    scaled = xb * coeff.unsqueeze(-1)
    saturated = None
    if count_saturated:  # clipped at ±6; blocks whose scale underflowed to 0 flush instead and are not counted
        sat = (scaled.abs() > E2M1_MAX) & (s_dec_b.to(_F32) > 0).unsqueeze(-1)
        saturated = sat.view(pr, pc)[:rows, :cols].sum()
    clipped = torch.clamp(scaled, -E2M1_MAX, E2M1_MAX)
    codes = e2m1_encode(clipped, rounding, generator).view(pr, pc)[:rows, :cols]
    return NVFP4Tensor(codes=codes.contiguous(), scales=s_dec_b[:rows].contiguous(), amax=amax, tile=tile,
                       saturated=saturated)


def nvfp4_fake_quantize(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Quantize-dequantize to fp32 in ``x``'s (2-D flattened) layout; axis="col" returns the transpose's layout."""
    return quantize_nvfp4(x, **kwargs).dequantize()


def pack_fp4x2(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, low nibble first (TE ``cast_to_fp4x2`` layout); needs an even last dimension."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing FP4 needs an even last dimension, got {tuple(codes.shape)}")
    return codes[..., ::2] | (codes[..., 1::2] << 4)


def unpack_fp4x2(packed: torch.Tensor) -> torch.Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
