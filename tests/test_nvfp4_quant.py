"""NVFP4 quantizer: every E2M1 code and rounding boundary, random and adversarial tensors against the slow scalar
reference, SR unbiasedness and reproducibility, 2-D weight quantization W vs W^T, and the RHT."""
import math

import pytest
import torch

from kernels import scalar_reference as ref
from kernels.hadamard import TE_WGRAD_SIGNS, apply_rht, hadamard, random_signs, rht_matrix, te_signs
from kernels.nvfp4 import TILE_1D, TILE_2D, global_encode_scale, pack_fp4x2, quantize_nvfp4, unpack_fp4x2
from kernels.rounding import E2M1_VALUES, e2m1_decode, e2m1_encode


def _f32_next(v: float, direction: float) -> float:
    return torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(direction, dtype=torch.float32)).item()


# ---------------------------------------------------------------- E2M1 codes and rounding boundaries

def test_all_16_codes_decode_and_roundtrip():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    expected = list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    assert vals.tolist() == expected
    assert math.copysign(1.0, vals[8].item()) == -1.0  # code 8 is -0
    back = e2m1_encode(vals)
    # every code maps back to itself, except -0.0 which encodes as +0 (sign of zero is not kept, as in TE's reference)
    assert back.tolist() == [c if c != 8 else 0 for c in range(16)]
    for c in range(16):
        if c != 8:
            assert ref.e2m1_round(vals[c].item())[0] == c


def _boundary_cases():
    cases = []
    grid = list(E2M1_VALUES)
    for lo, hi in zip(grid, grid[1:]):
        mid = (lo + hi) / 2
        for sign in (1.0, -1.0):
            cases += [sign * mid, sign * _f32_next(mid, 0.0), sign * _f32_next(mid, 10.0)]
        cases += [lo, hi, -lo, -hi]
    return cases


def test_every_rounding_boundary_rtne_matches_scalar_reference():
    vals = torch.tensor(_boundary_cases(), dtype=torch.float32)
    got = e2m1_encode(vals).tolist()
    want = [ref.e2m1_round(v)[0] for v in vals.tolist()]
    assert got == want
    # explicit tie-to-even table: ties go to the code with mantissa bit 0
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    for t, to in ties.items():
        assert e2m1_decode(e2m1_encode(torch.tensor([t, -t]))).tolist() == [to, -to]
        below, above = _f32_next(t, 0.0), _f32_next(t, 10.0)
        lo = max(v for v in E2M1_VALUES if v < t)
        hi = min(v for v in E2M1_VALUES if v > t)
        assert e2m1_decode(e2m1_encode(torch.tensor([below, above]))).tolist() == [lo, hi]


# ---------------------------------------------------------------- full quantizer vs scalar reference

def _adversarial():
    g = torch.Generator().manual_seed(1)
    outlier = torch.randn(32, 48, generator=g)
    outlier[5, 7] = 3.0e4  # one huge outlier: most blocks' scales underflow relative to it
    denormal = torch.randn(32, 48, generator=g) * 1e-39  # fp32 denormal-scale values
    mixed = torch.randn(32, 48, generator=g) * torch.logspace(-30, 30, 48).unsqueeze(0)
    ragged = torch.randn(20, 40, generator=g)  # not multiples of 16 in either dim
    boundary = torch.tensor(_boundary_cases(), dtype=torch.float32)[:48].repeat(32, 1)
    boundary[:, 0] = 6.0  # pins amax so that scales are simple
    return {
        "random": torch.randn(32, 48, generator=g),
        "zeros": torch.zeros(32, 48),
        "outlier": outlier,
        "denormal": denormal,
        "mixed": mixed,
        "ragged": ragged,
        "boundary": boundary,
        "bf16": torch.randn(32, 48, generator=g).to(torch.bfloat16),
    }


@pytest.mark.parametrize("tile", [TILE_1D, TILE_2D], ids=["1x16", "16x16"])
@pytest.mark.parametrize("case", list(_adversarial()))
def test_quantize_matches_scalar_reference(case, tile):
    x = _adversarial()[case]
    q = quantize_nvfp4(x, tile=tile)
    xs = x.float().tolist()
    codes, scales, amax = ref.nvfp4_quantize(xs, tile=tile)
    assert q.amax.item() == amax
    assert q.codes.tolist() == codes
    assert q.scales.float().tolist() == scales
    assert q.dequantize().tolist() == ref.nvfp4_dequantize(codes, scales, amax)


def test_adversarial_semantics():
    zeros = quantize_nvfp4(torch.zeros(16, 32))
    assert zeros.dequantize().abs().sum().item() == 0.0 and global_encode_scale(torch.tensor(0.0)).item() == 1.0
    x = torch.ones(16, 32)
    x[0, 0] = 1e30
    q = quantize_nvfp4(x, count_saturated=True)
    dq = q.dequantize()
    assert dq[0, 0].item() == pytest.approx(1e30, rel=0.07)  # the outlier itself is representable
    assert dq[0, 16:].abs().sum().item() == 0.0  # other blocks' E4M3 scales underflow: flushed to zero
    assert q.saturated.item() == 0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_input_is_a_clear_error(bad):
    x = torch.randn(16, 16)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="cannot quantize activations: it has .*(NaN|inf)"):
        quantize_nvfp4(x, what="activations")


def test_bad_arguments():
    with pytest.raises(ValueError, match="tiles"):
        quantize_nvfp4(torch.randn(16, 16), tile=(4, 4))
    with pytest.raises(ValueError, match="Generator"):
        quantize_nvfp4(torch.randn(16, 16), rounding="stochastic")


def test_pack_roundtrip():
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    assert torch.equal(unpack_fp4x2(pack_fp4x2(codes)), codes)


# ---------------------------------------------------------------- 2-D weights: W and W^T identical

def test_2d_quantization_w_and_wt_identical():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(2)) * 0.02
    w[3, 70] = 0.9
    row = quantize_nvfp4(w, tile=TILE_2D)
    col = quantize_nvfp4(w, tile=TILE_2D, axis="col")  # the copy TE uses for dgrad: W^T
    assert torch.equal(row.dequantize(), col.dequantize().t())
    assert torch.equal(row.codes, col.codes.t())
    # 1x16 quantization does not have this property (the reason weights use 16x16 tiles)
    assert not torch.equal(quantize_nvfp4(w).dequantize(), quantize_nvfp4(w, axis="col").dequantize().t())


# ---------------------------------------------------------------- stochastic rounding

def test_sr_unbiased_at_code_level():
    g = torch.Generator().manual_seed(3)
    v = torch.rand(64, generator=g) * 12 - 6
    draws = 4000
    acc = torch.zeros(64, dtype=torch.float64)
    for _ in range(draws // 100):
        rep = v.repeat(100, 1)
        acc += e2m1_decode(e2m1_encode(rep, "stochastic", g)).double().sum(0)
    mean = acc / draws
    # per-element std of one draw <= gap/2 <= 1; 5 sigma of the mean
    assert (mean - v.double()).abs().max().item() < 5 * 1.0 / math.sqrt(draws)
    # and it is not RTNE in disguise: RTNE's error on these values is far larger than SR's mean error
    rtne_err = (e2m1_decode(e2m1_encode(v)).double() - v.double()).abs().mean().item()
    assert (mean - v.double()).abs().mean().item() < rtne_err / 3


def test_sr_unbiased_through_quantizer():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 64, generator=g)
    det = quantize_nvfp4(x)  # scales are deterministic; SR only changes the element rounding
    scale = (det.scales.float() * det.amax * (1.0 / 2688)).repeat_interleave(16, 1)
    draws = 400
    mean = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        mean += quantize_nvfp4(x, rounding="stochastic", generator=g).dequantize().double()
    mean /= draws
    tol = 5 * scale.double() * 1.0 / math.sqrt(draws)  # gap <= 2 code units -> std <= 1 code unit
    clipped = (x.abs() / scale) > 6  # values clipped at 6 are biased by design (satfinite), skip them
    assert ((mean - x.double()).abs() <= tol)[~clipped].all()


def test_sr_reproducible_from_seed():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    a = quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(42)).codes
    b = quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(42)).codes
    c = quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(43)).codes
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- random Hadamard transform

@pytest.mark.parametrize("signs", [te_signs(), random_signs(7), random_signs(8)], ids=["te", "seed7", "seed8"])
def test_rht_orthonormal(signs):
    q = rht_matrix(signs).double()
    assert torch.allclose(q @ q.t(), torch.eye(16, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(q.t() @ q, torch.eye(16, dtype=torch.float64), atol=1e-7)


def test_hadamard_self_inverse_up_to_scale():
    h = hadamard(16)
    assert torch.equal(h @ h, 16 * torch.eye(16))  # Sylvester H is symmetric: H H = n I
    x = torch.randn(8, 64)
    ones = torch.ones(16)
    assert torch.allclose(apply_rht(apply_rht(x, ones), ones), x, atol=1e-5)  # Q = H/4 is its own inverse


def test_rht_preserves_wgrad_product_and_seeds():
    g = torch.Generator().manual_seed(9)
    x, dy = torch.randn(40, 24, generator=g), torch.randn(40, 8, generator=g)  # 40 tokens: padded to 48
    s = random_signs(11)
    xt, dyt = apply_rht(x.t(), s), apply_rht(dy.t(), s)
    assert xt.shape == (24, 48)
    assert torch.allclose(dyt @ xt.t(), dy.t() @ x, atol=1e-4)
    assert torch.equal(random_signs(11), s) and not torch.equal(random_signs(12), s)
    assert te_signs().tolist() == list(TE_WGRAD_SIGNS)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


def test_rht_spreads_outlier():
    x = torch.zeros(1, 16)
    x[0, 3] = 8.0
    y = apply_rht(x, te_signs())
    assert y.abs().max().item() == pytest.approx(2.0)  # 8 spread evenly over 16 entries (8/sqrt(16))
