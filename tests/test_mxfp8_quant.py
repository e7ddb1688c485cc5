"""MXFP8 quantizer (E4M3 values, 32-element blocks, UE8M0 scales) against the slow scalar reference."""
import pytest
import torch

from kernels import scalar_reference as ref
from kernels.mxfp8 import quantize_mxfp8
from kernels.rounding import e8m0_to_float, float_to_e8m0, to_e4m3


def test_e8m0_rounds_up_like_te():
    vals = [0.0, 2.0**-130, 2.0**-127, 5.9e-39, 2.0**-126, 1.0, 1.0000001, 1.5, 2.0, 3.0, 1e30, 2.0**127, 3e38]
    got = float_to_e8m0(torch.tensor(vals, dtype=torch.float32)).tolist()
    want = [ref.e8m0_round_up(torch.tensor(v, dtype=torch.float32).item()) for v in vals]
    assert got == want
    assert e8m0_to_float(torch.tensor([127, 128, 0], dtype=torch.uint8)).tolist() == [1.0, 2.0, 2.0**-127]


def test_e4m3_rounding_matches_scalar_reference():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(2000, generator=g) * 10 ** torch.empty(2000).uniform_(-4, 3, generator=g),
                   torch.tensor([448.0, 460.0, 500.0, -1e6, 2.0**-9, 2.0**-10, 3 * 2.0**-11, 0.0])])
    assert to_e4m3(v).float().tolist() == [ref.e4m3_round(x) for x in v.tolist()]


def _cases():
    g = torch.Generator().manual_seed(1)
    outlier = torch.randn(8, 96, generator=g)
    outlier[2, 40] = 1e20
    return {
        "random": torch.randn(8, 96, generator=g),
        "zeros": torch.zeros(4, 64),
        "outlier": outlier,
        "denormal": torch.randn(8, 64, generator=g) * 1e-40,
        "wide_range": torch.randn(8, 64, generator=g) * torch.logspace(-35, 35, 64),
        "ragged": torch.randn(5, 50, generator=g),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_mxfp8_matches_scalar_reference(case):
    x = _cases()[case]
    q = quantize_mxfp8(x)
    vals, exps = ref.mxfp8_quantize(x.tolist())
    assert q.scales.tolist() == exps
    assert q.values.float().tolist() == vals


def test_mxfp8_columnwise_is_quantized_transpose_and_errors():
    x = torch.randn(64, 32)
    assert torch.equal(quantize_mxfp8(x, axis="col").values.float(), quantize_mxfp8(x.t().contiguous()).values.float())
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="cannot quantize gradient: it has 1 NaN"):
        quantize_mxfp8(x, what="gradient")


def test_mxfp8_error_is_small():
    x = torch.randn(32, 256)
    dq = quantize_mxfp8(x).dequantize()
    assert ((dq - x).norm() / x.norm()).item() < 0.04  # 3 mantissa bits: ~2^-4 relative worst case
