"""The chunked SSD scan equals the naive recurrence (fp32, <= 1e-5 relative) over groups, heads, chunk sizes
that divide the length and that do not, initial states, and final states; gradients flow to every input."""
import pytest
import torch

from kernels.ssd import ssd_matmul_flops, ssd_recurrent, ssd_scan


def _inputs(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 1.0)
    A = -torch.rand(h, generator=gen) * 4 - 0.1
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return x, dt, A, B, C, D


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("b,l,h,p,g,n,T", [
    (2, 32, 4, 8, 2, 16, 8),    # chunk divides the length
    (1, 37, 6, 4, 3, 8, 8),     # it does not
    (2, 5, 2, 3, 1, 4, 16),     # shorter than one chunk
    (1, 64, 8, 16, 8, 16, 64),  # one group per head, one chunk
    (3, 50, 4, 4, 1, 32, 7),    # odd chunk size, one group
])
@pytest.mark.parametrize("with_init", [False, True])
def test_scan_matches_recurrence(b, l, h, p, g, n, T, with_init):
    x, dt, A, B, C, D = _inputs(b, l, h, p, g, n, seed=l + T)
    init = torch.randn(b, h, p, n) if with_init else None
    y, s = ssd_scan(x, dt, A, B, C, T, D=D, initial_states=init, return_final_states=True)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, D=D, initial_states=init, return_final_states=True)
    assert y.shape == (b, l, h, p) and s.shape == (b, h, p, n)
    assert _rel(y, y_ref) <= 1e-5
    assert _rel(s, s_ref) <= 1e-5


def test_per_channel_D_and_chunk_invariance():
    x, dt, A, B, C, _ = _inputs(2, 40, 4, 8, 2, 16)
    D = torch.randn(4, 8)
    ys = [ssd_scan(x, dt, A, B, C, T, D=D) for T in (4, 8, 13, 40, 64)]
    ref = ssd_recurrent(x, dt, A, B, C, D=D)
    for y in ys:
        assert _rel(y, ref) <= 1e-5


def test_split_sequence_continues_from_final_state():
    x, dt, A, B, C, D = _inputs(1, 30, 4, 4, 2, 8)
    y_full = ssd_scan(x, dt, A, B, C, 8, D=D)
    y1, s1 = ssd_scan(x[:, :17], dt[:, :17], A, B[:, :17], C[:, :17], 8, D=D, return_final_states=True)
    y2 = ssd_scan(x[:, 17:], dt[:, 17:], A, B[:, 17:], C[:, 17:], 8, D=D, initial_states=s1)
    assert _rel(torch.cat([y1, y2], 1), y_full) <= 1e-5


def test_gradients_match_recurrence():
    ins = [t.clone().requires_grad_(True) for t in _inputs(1, 19, 4, 4, 2, 8)]
    ins_ref = [t.detach().clone().requires_grad_(True) for t in ins]
    x, dt, A, B, C, D = ins
    ssd_scan(x, dt, A, B, C, 8, D=D).square().sum().backward()
    x, dt, A, B, C, D = ins_ref
    ssd_recurrent(x, dt, A, B, C, D=D).square().sum().backward()
    for a, r in zip(ins, ins_ref):
        assert a.grad is not None and _rel(a.grad, r.grad) <= 1e-4


def test_bad_shapes_are_named():
    x, dt, A, B, C, D = _inputs(1, 8, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_scan(x, dt, A, B[:, :, :1].expand(1, 8, 3, 8).contiguous(), C[:, :, :1].expand(1, 8, 3, 8).contiguous(), 4)
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan(x, dt[:, :4], A, B, C, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(x, dt, A, B, C, 0)


def test_flop_formula_matches_counter():
    from torch.utils.flop_counter import FlopCounterMode
    x, dt, A, B, C, D = _inputs(2, 40, 4, 8, 2, 16)
    with FlopCounterMode(display=False) as fc:
        ssd_scan(x, dt, A, B, C, 16, D=D)
    assert fc.get_total_flops() == 2 * ssd_matmul_flops(40, 4, 8, 2, 16, 16)
