"""Element formats of the low-precision recipes and the two ways of rounding into them.

Kept apart from the block-scaling code because NVFP4 (E2M1 values, E4M3 scales) and MXFP8 (E4M3 values,
UE8M0 scales) share these primitives, and because the tests check every code and every rounding boundary
of them in isolation.

Rounding: round-to-nearest-even (RTNE) everywhere except gradients, which use stochastic rounding (SR) in the
NVFP4 recipe. Our SR draws one uniform number per element from a caller-owned ``torch.Generator`` so a run is
reproducible from its seed. Hardware SR (PTX ``cvt.rs.satfinite.e2m1x4.f32``, used by Transformer Engine's
``ptx::mul_cvt_*_to_fp4_*_stochastic_rounding``) has the same distribution (round up with probability equal to
the distance to the lower neighbour over the gap) but consumes Philox bits in a thread layout we do not
reproduce: SR results are unbiased and seed-deterministic here, not bit-identical to a GPU run.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

Rounding = Literal["rtne", "stochastic"]

#: E2M1 magnitudes by 3-bit code (sign is bit 3): 0, 0.5, 1, 1.5, 2, 3, 4, 6. No inf/NaN encodings.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0  # float8_e4m3fn: no inf, max normal 448
FP32_MAX = float(torch.finfo(torch.float32).max)

# RTNE boundaries between consecutive E2M1 magnitudes, and whether a tie goes up (to the even code above).
# Codes 0,2,4,6 have mantissa bit 0 (even). Same decision table as TE's python reference
# transformer_engine/pytorch/experimental/quantization_nvfp4.py::cast_to_fp4x2.
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def check_finite(x: torch.Tensor, what: str) -> None:
    """Quantizing inf/NaN would silently produce garbage scales (TE's amax would be inf/NaN): refuse instead."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ValueError(
            f"cannot quantize {what}: it has {n_nan} NaN and {n_inf} inf value(s) out of {x.numel()}; "
            "low-precision formats need finite inputs (check for overflow or a diverged step upstream)"
        )


def e2m1_values(device=None, dtype=torch.float32) -> torch.Tensor:
    """All 16 E2M1 values indexed by 4-bit code (code 8 is -0.0)."""
    mags = list(E2M1_VALUES)
    return torch.tensor(mags + [-m for m in mags], device=device, dtype=dtype)


def e2m1_encode(v: torch.Tensor, rounding: Rounding = "rtne", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round fp32 values already scaled into [-6, 6] (caller clamps, as ``cvt.*.satfinite`` does) to 4-bit codes.

    Returns uint8 codes: bit 3 = sign, bits 0-2 = magnitude index into E2M1_VALUES. Negative values that round to
    zero get code 8 (-0), matching TE's cast_to_fp4x2; an input of -0.0 gets code 0.
    """
    if v.dtype != torch.float32:
        raise TypeError(f"e2m1_encode expects float32 values, got {v.dtype}")
    m = v.abs()
    if rounding == "rtne":
        code = torch.zeros(m.shape, dtype=torch.uint8, device=m.device)
        for bound, tie_up in _E2M1_BOUNDS:
            code += (m >= bound if tie_up else m > bound).to(torch.uint8)
    elif rounding == "stochastic":
        if generator is None:
            raise ValueError("stochastic rounding needs a torch.Generator (seeded) so results are reproducible")
        grid = torch.tensor(E2M1_VALUES, device=m.device, dtype=torch.float32)
        lo_code = torch.zeros(m.shape, dtype=torch.long, device=m.device)
        for g in E2M1_VALUES[1:]:
            lo_code += (m >= g).to(torch.long)
        hi_code = torch.clamp(lo_code + 1, max=7)
        lo, hi = grid[lo_code], grid[hi_code]
        gap = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        frac = (m - lo) / gap  # exact: m - lo is exact, gap is a power of two
        u = torch.rand(m.shape, generator=generator, device=m.device, dtype=torch.float32)
        code = torch.where(u < frac, hi_code, lo_code).to(torch.uint8)
    else:
        raise ValueError(f"unknown rounding {rounding!r}; use 'rtne' or 'stochastic'")
    return code | ((v < 0).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8) -> fp32 values."""
    return e2m1_values(code.device)[code.long()]


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, RTNE with saturation to ±448 (CUDA ``__nv_fp8_e4m3`` conversion is satfinite)."""
    return torch.clamp(v, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def float_to_e8m0(v: torch.Tensor) -> torch.Tensor:
    """fp32 (>= 0, finite) -> UE8M0 biased exponent, rounding up; uint8.

    Bit-for-bit TE's software path ``ptx::float_to_e8m0`` (transformer_engine/common/util/ptx.cuh): take the
    fp32 exponent field and add one if any mantissa bit is set, except at 0xFE (satfinite) and for denormals at
    or below 2^-127 (which code 0 = 2^-127 already covers). 0 -> 0. Blackwell's ``cvt.rp.satfinite.ue8m0x2.f32``
    gives the same codes.
    """
    bits = v.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    bump = (mantissa > 0) & (exponent != 0xFE) & ~((exponent == 0) & (mantissa <= 0x400000))
    return (exponent + bump.to(torch.int32)).to(torch.uint8)


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """UE8M0 code -> 2^(e-127) as fp32, built from bits (code 0 -> 2^-127, a denormal; 0xFF (NaN) never produced)."""
    e32 = e.to(torch.int32)
    bits = torch.where(e32 == 0, torch.full_like(e32, 0x400000), e32 << 23)
    return bits.view(torch.float32)


def e8m0_rcp(e: torch.Tensor) -> torch.Tensor:
    """TE ``ptx::exp2f_rcp``: the fp32 with exponent field 254-e (= 2^(127-e)), and exactly 1 for e == 0."""
    e32 = e.to(torch.int32)
    bits = torch.where(e32 == 0, torch.full_like(e32, 127 << 23), (254 - e32) << 23)
    return bits.view(torch.float32)
