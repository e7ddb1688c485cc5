"""The causal depthwise conv equals torch's padded nn.functional.conv1d and a per-step loop; states carry over."""
import pytest
import torch
import torch.nn.functional as F

from kernels.conv1d import causal_conv1d


@pytest.mark.parametrize("b,d,l,k", [(2, 6, 17, 4), (1, 3, 2, 4), (3, 8, 9, 2), (1, 5, 11, 1)])
@pytest.mark.parametrize("act", [None, "silu"])
def test_matches_torch_conv(b, d, l, k, act):
    g = torch.Generator().manual_seed(b * 100 + l)
    x, w, bias = torch.randn(b, d, l, generator=g), torch.randn(d, 1, k, generator=g), torch.randn(d, generator=g)
    ref = F.conv1d(x, w, bias, padding=k - 1, groups=d)[..., :l]
    ref = F.silu(ref) if act else ref
    y = causal_conv1d(x, w, bias, activation=act)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_state_continuation_and_stepwise():
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(2, 4, 12, generator=g), torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    full = causal_conv1d(x, w, bias, "silu")
    y1, s = causal_conv1d(x[..., :7], w, bias, "silu", return_final_state=True)
    y2 = causal_conv1d(x[..., 7:], w, bias, "silu", initial_state=s)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-5, atol=1e-6)
    # token-by-token decode
    state, outs = torch.zeros(2, 4, 3), []
    for t in range(12):
        o, state = causal_conv1d(x[..., t:t + 1], w, bias, "silu", initial_state=state, return_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, -1), full, rtol=1e-5, atol=1e-6)


def test_bad_input_named():
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(torch.randn(1, 4, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 4, 5), torch.randn(4, 4), activation="gelu")


def test_bf16_accumulates_in_fp32_and_rounds_once():
    """causal-conv1d and cuDNN accumulate in FP32: the BF16 result is the FP32 one rounded once."""
    import torch

    from kernels.conv1d import causal_conv1d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 128, generator=g).to(torch.bfloat16)
    w = torch.randn(64, 4, generator=g).to(torch.bfloat16)
    b = torch.randn(64, generator=g).to(torch.bfloat16)
    ref = causal_conv1d(x.float(), w.float(), b.float(), activation="silu").to(torch.bfloat16)
    assert torch.equal(causal_conv1d(x, w, b, activation="silu"), ref)
