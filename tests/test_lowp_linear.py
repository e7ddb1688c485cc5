"""Emulated low-precision linear: outputs and gradients bit-identical to composing the reference quantizers by hand;
recipe switches; seeds; telemetry."""
import pytest
import torch

from kernels.hadamard import apply_rht, random_signs, te_signs
from kernels.lowp_linear import LowPrecisionLinearFn, LowPrecisionOptions, lowp_linear
from kernels.mxfp8 import quantize_mxfp8
from kernels.nvfp4 import TILE_1D, TILE_2D, quantize_nvfp4
from kernels.telemetry import QuantTelemetry


def _inputs(tokens=(3, 20), k=64, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    dy = torch.randn(*tokens, n, generator=g) * 1e-3
    return x, w, dy


def _run(x, w, dy, bias=None, **kw):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True) if bias is not None else None
    y = lowp_linear(x, w, b, **kw)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _nv(t, **kw):
    return quantize_nvfp4(t, **kw).dequantize()


@pytest.mark.parametrize("rht_seed", [None, 5], ids=["te_signs", "seeded_signs"])
def test_nvfp4_linear_bit_identical_to_hand_composition(rht_seed):
    x, w, dy = _inputs()  # 60 tokens: not a multiple of 16, exercises RHT padding
    bias = torch.randn(48)
    seed = 1234
    opts = LowPrecisionOptions(rht_seed=rht_seed)
    y, dx, dw, db = _run(x, w, dy, bias, fmt="nvfp4", opts=opts, seed=seed)

    x2, dy2 = x.reshape(-1, 64), dy.reshape(-1, 48)
    y_ref = _nv(x2, tile=TILE_1D) @ _nv(w, tile=TILE_2D).t() + bias
    g = torch.Generator().manual_seed(seed)
    dy_row = _nv(dy2, tile=TILE_1D, rounding="stochastic", generator=g)
    signs = te_signs() if rht_seed is None else random_signs(rht_seed)
    dy_col = _nv(apply_rht(dy2.t(), signs), tile=TILE_1D, rounding="stochastic", generator=g)
    x_col = _nv(apply_rht(x2.t(), signs), tile=TILE_1D)
    dx_ref = dy_row @ _nv(w.t(), tile=TILE_2D).t()
    dw_ref = dy_col @ x_col.t()

    assert torch.equal(y, y_ref.reshape(3, 20, 48))
    assert torch.equal(dx, dx_ref.reshape(3, 20, 64))
    assert torch.equal(dw, dw_ref)
    assert torch.equal(db, dy2.sum(0))


def test_mxfp8_linear_bit_identical_to_hand_composition():
    x, w, dy = _inputs(tokens=(2, 40), k=96, n=64)
    y, dx, dw, _ = _run(x, w, dy, fmt="mxfp8")
    x2, dy2 = x.reshape(-1, 96), dy.reshape(-1, 64)
    mx = lambda t, axis="row": quantize_mxfp8(t, axis=axis).dequantize()  # noqa: E731
    assert torch.equal(y, (mx(x2) @ mx(w).t()).reshape(2, 40, 64))
    assert torch.equal(dx, (mx(dy2) @ mx(w, "col").t()).reshape(2, 40, 96))
    assert torch.equal(dw, mx(dy2, "col") @ mx(x2, "col").t())


def test_recipe_switches():
    x, w, dy = _inputs(tokens=(32,))
    opts = LowPrecisionOptions(rht=False, stochastic_rounding=False, two_d_weights=False)
    y, dx, dw, _ = _run(x, w, dy, fmt="nvfp4", opts=opts, seed=1)
    assert torch.equal(y, _nv(x, tile=TILE_1D) @ _nv(w, tile=TILE_1D).t())
    assert torch.equal(dx, _nv(dy) @ _nv(w, axis="col").t())
    assert torch.equal(dw, _nv(dy, axis="col") @ _nv(x, axis="col").t())
    # without SR the seed is irrelevant; with SR it is what makes gradients differ
    assert torch.equal(_run(x, w, dy, fmt="nvfp4", opts=opts, seed=2)[1], dx)
    a = _run(x, w, dy, fmt="nvfp4", seed=7)
    b = _run(x, w, dy, fmt="nvfp4", seed=7)
    c = _run(x, w, dy, fmt="nvfp4", seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])


@pytest.mark.parametrize("fmt,tol", [("fp32", 1e-6), ("bf16", 0.01), ("mxfp8", 0.06), ("nvfp4", 0.25)])
def test_formats_approximate_fp32(fmt, tol):
    x, w, dy = _inputs(tokens=(64,), seed=3)
    exact = _run(x, w, dy, fmt="fp32")
    got = _run(x, w, dy, fmt=fmt, seed=1)
    for e, q in zip(exact[:3], got[:3]):
        assert ((q - e).norm() / e.norm()).item() < tol


def test_bf16_input_keeps_dtype_and_errors():
    x, w, dy = _inputs(tokens=(16,))
    y, dx, dw, _ = _run(x.bfloat16(), w, dy.bfloat16(), fmt="nvfp4")
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown linear format"):
        lowp_linear(x, w, fmt="fp8")
    with pytest.raises(ValueError, match="shapes do not match"):
        lowp_linear(x, w.t(), fmt="nvfp4")
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="fprop.x"):
        lowp_linear(bad, w, fmt="nvfp4")


def test_telemetry_collects_roles_only_on_interval_steps():
    x, w, dy = _inputs(tokens=(32,))
    tel = QuantTelemetry(interval=10)
    assert not tel.step(3) and tel.probe("layer") is None
    assert tel.step(10)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    LowPrecisionLinearFn.apply(xr, wr, None, "nvfp4", LowPrecisionOptions(), 0, tel.probe("decoder.layers.0.mixer.in_proj")).backward(dy)
    stats = tel.read()
    roles = sorted(r for _, r in stats)
    assert roles == ["dgrad.dy", "dgrad.w", "fprop.w", "fprop.x", "wgrad.dy", "wgrad.x"]
    for s in stats.values():
        assert 0.0 <= s["flushed"] <= 1.0 and 0.0 <= s["saturated"] <= 1.0 and 0.0 < s["rel_error"] < 0.5
    assert tel.read() == {}  # reset after read
    # a tensor with a huge outlier flushes most of its other blocks to zero: telemetry must see it
    tel.step(20)
    xo = x.clone()
    xo[0, 0] = 1e12
    lowp_linear(xo, w, fmt="nvfp4", probe=tel.probe("m"))
    flushed = tel.scalars()["quantization/m/fprop.x/flushed"]
    assert flushed > 0.5


def test_rht_output_is_rounded_to_bf16_before_quantising_like_te():
    """TE's non-fused RHT path stores RHT(x^T) in the input dtype (BF16) before quantising; so does the emulation."""
    import torch

    from kernels.hadamard import apply_rht, te_signs
    from kernels.lowp_linear import _nvfp4
    from kernels.nvfp4 import TILE_1D, quantize_nvfp4

    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    signs = te_signs()
    got = _nvfp4(x, tile=TILE_1D, signs=signs)
    want = quantize_nvfp4(apply_rht(x.t(), signs).to(torch.bfloat16), tile=TILE_1D).dequantize()
    fp32 = quantize_nvfp4(apply_rht(x.t(), signs), tile=TILE_1D).dequantize()
    assert torch.equal(got, want)
    assert not torch.equal(want, fp32)  # the rounding is visible, so the test can fail
