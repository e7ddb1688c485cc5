"""Slow, element-at-a-time NVFP4 / MXFP8 quantizers in plain Python, used only by the tests.

Written independently of the vectorized code (different rounding logic: nearest neighbour by distance with
explicit tie-breaking instead of a threshold table; power-of-two search instead of exponent bit tricks) so that
agreement between the two is evidence, not a tautology. fp32 arithmetic is emulated by rounding each double
result to fp32: for +, -, *, / of fp32 operands the double result rounded once to fp32 equals the fp32 op
(53 >= 2*24 + 2), so every step matches IEEE fp32 exactly.
"""
from __future__ import annotations

import math
import struct
from typing import List, Sequence, Tuple

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FLT_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]


def f32(v: float) -> float:
    """Round a double to the nearest fp32 (ties to even) — struct does IEEE conversion."""
    if math.isinf(v) or abs(v) > FLT_MAX * (1 + 2**-25):
        return math.copysign(math.inf, v)
    return struct.unpack("<f", struct.pack("<f", v))[0]


def e2m1_round(v: float) -> Tuple[int, float]:
    """RTNE of a value in [-6, 6] to E2M1: (4-bit code, value). Negative values rounding to 0 give code 8."""
    m = abs(v)
    best = 0
    for i in range(1, 8):
        d_best, d_i = abs(m - E2M1[best]), abs(m - E2M1[i])
        if d_i < d_best or (d_i == d_best and i % 2 == 0):  # even code = mantissa bit 0
            best = i
    code = best | (8 if v < 0 else 0)
    return code, (-E2M1[best] if v < 0 else E2M1[best])


def e4m3_round(v: float) -> float:
    """RTNE to float8_e4m3fn with saturation at ±448 (bias 7, 3 mantissa bits, subnormal step 2^-9)."""
    m = abs(v)
    if m >= 448.0:
        return math.copysign(448.0, v)
    if m == 0.0:
        return 0.0
    e = max(math.floor(math.log2(m)), -6)
    if 2.0**e > m:  # guard log2 rounding
        e -= 1
    elif 2.0 ** (e + 1) <= m:
        e += 1
    e = max(e, -6)
    step = 2.0 ** (e - 3)
    q = round(m / step)  # Python round() is ties-to-even; m/step is exact
    return math.copysign(min(q * step, 448.0), v)


def nvfp4_quantize(x: Sequence[Sequence[float]], tile: Tuple[int, int] = (1, 16)) -> Tuple[List[List[int]], List[List[float]], float]:
    """Quantize a 2-D list row-wise: (codes, per-row-block e4m3 decode scales, amax)."""
    rows, cols = len(x), len(x[0])
    amax = max((abs(f32(v)) for r in x for v in r), default=0.0)
    s_enc = f32(2688.0 / amax) if amax > 0 else math.inf
    s_enc = min(s_enc, FLT_MAX)
    if amax == 0.0 or s_enc == 0.0:
        s_enc = 1.0
    rcp6 = f32(1.0 / 6.0)
    nb = (cols + 15) // 16
    scales = [[0.0] * nb for _ in range(rows)]
    codes = [[0] * cols for _ in range(rows)]
    for r in range(rows):
        for b in range(nb):
            c0, c1 = 16 * b, min(16 * b + 16, cols)
            if tile == (16, 16):
                r0 = 16 * (r // 16)
                block_amax = max(abs(f32(x[rr][c])) for rr in range(r0, min(r0 + 16, rows)) for c in range(c0, c1))
            else:
                block_amax = max(abs(f32(x[r][c])) for c in range(c0, c1))
            s_dec_b = e4m3_round(min(f32(block_amax * f32(s_enc * rcp6)), FLT_MAX))
            denom = f32(s_dec_b * f32(1.0 / s_enc))
            coeff = FLT_MAX if denom == 0.0 else min(f32(1.0 / denom), FLT_MAX)
            scales[r][b] = s_dec_b
            for c in range(c0, c1):
                scaled = f32(f32(x[r][c]) * coeff)
                codes[r][c] = e2m1_round(max(-6.0, min(6.0, scaled)))[0]
    return codes, scales, amax


def nvfp4_dequantize(codes, scales, amax: float) -> List[List[float]]:
    factor = f32(1.0 / (6.0 * 448.0))
    out = []
    for r, row in enumerate(codes):
        vals = []
        for c, code in enumerate(row):
            final = f32(f32(scales[r][c // 16] * amax) * factor)
            mag = E2M1[code & 7]
            vals.append(f32((-mag if code & 8 else mag) * final))
        out.append(vals)
    return out


def e8m0_round_up(v: float) -> int:
    """Smallest power of two >= v as a UE8M0 biased exponent, saturating at 254; 0 for v <= 2^-127."""
    if v <= 2.0**-127:
        return 0
    k = -127
    while 2.0**k < v and k < 127:
        k += 1
    return k + 127


def mxfp8_quantize(x: Sequence[Sequence[float]]) -> Tuple[List[List[float]], List[List[int]]]:
    """Row-wise 1x32 MXFP8: (e4m3 values as floats, UE8M0 codes)."""
    rcp448 = f32(1.0 / 448.0)
    rows, cols = len(x), len(x[0])
    nb = (cols + 31) // 32
    vals = [[0.0] * cols for _ in range(rows)]
    exps = [[0] * nb for _ in range(rows)]
    for r in range(rows):
        for b in range(nb):
            c0, c1 = 32 * b, min(32 * b + 32, cols)
            block_amax = max(abs(f32(x[r][c])) for c in range(c0, c1))
            e = e8m0_round_up(f32(block_amax * rcp448))
            inv = 1.0 if e == 0 else 2.0 ** (127 - e)
            exps[r][b] = e
            for c in range(c0, c1):
                vals[r][c] = e4m3_round(f32(f32(x[r][c]) * inv))
    return vals, exps
