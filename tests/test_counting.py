"""Counts: analytic == the model built on the meta device; published Nemotron 3 figures within 0.5% (they are
rounded or truncated to 0.1B); analytic forward FLOPs == torch's flop counter on a CPU forward."""
import math

import pytest
import torch

from model.build import build_model, init_single_process
from model.counting import forward_flops, meta_param_count, param_counts
from model.presets import get_preset


@pytest.fixture(scope="module")
def single_process():
    init_single_process(seed=7)


def _matches_published(x: float, published: float) -> bool:
    """Within 0.5% of the published figure, directly or after rounding / truncating x to 0.1B."""
    b = x / 1e9
    candidates = (b, round(b, 1), math.floor(b * 10) / 10)
    return any(abs(c - published) / published <= 0.005 for c in candidates)


@pytest.mark.parametrize("preset", ["tiny", "tiny-nolatent", "nano-30b-a3b", "super-120b-a12b", "nemotron-h-8b"])
def test_analytic_equals_meta_build(single_process, preset):
    cfg = get_preset(preset)
    built, counted = meta_param_count(cfg), param_counts(cfg)
    assert built["total"] == counted["total"]
    assert built["mtp_block"] == counted["mtp_block"]


def test_published_counts():
    nano, sup = param_counts(get_preset("nano-30b-a3b")), param_counts(get_preset("super-120b-a12b"))
    assert abs(nano["total"] / 1e9 - 31.6) / 31.6 <= 0.005
    assert _matches_published(nano["active_with_embeddings"], 3.6)  # 3.580 -> 3.6
    assert _matches_published(nano["active_with_head"], 3.2)  # 3.228 -> 3.2 (truncated)
    assert abs(sup["total"] / 1e9 - 120.6) / 120.6 <= 0.005  # without MTP
    assert _matches_published(sup["mtp_block"], 2.9)  # 2.942
    assert _matches_published(sup["active_with_embeddings"], 12.7)  # 12.770 -> 12.7 (truncated)


@pytest.mark.parametrize("preset", ["tiny", "tiny-nolatent"])
def test_forward_flops_match_flop_counter(single_process, preset):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset(preset)
    model = build_model(cfg)
    b, s = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    pos = torch.arange(s).expand(b, s)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids, pos, None, labels=ids)
    counted = fc.get_total_flops() / (b * s)
    # The local attention computes the full s x s score matrix: compare with causal=False.
    analytic = forward_flops(cfg, s, causal=False)["total"]
    assert abs(counted - analytic) / analytic <= 0.005, (counted, analytic)


def test_meta_build_first_leaves_mtp_backward_working():
    """A fresh process whose first Megatron-Core import happens through a meta build must still train with MTP
    afterwards (Megatron's MTPLossAutoScaler keeps a class-level tensor made at import time)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from model.build import build_model, init_single_process
        from model.counting import meta_param_count
        from model.presets import get_preset
        import os
        init_single_process(seed=3)
        # No TCP store, nothing exported: children spawned later must not inherit a port this process holds.
        assert "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ
        cfg = get_preset("tiny")
        assert cfg.mtp_num_layers, "the tiny preset is expected to carry MTP"
        meta_param_count(cfg)
        from pretrain.export_hf import meta_model
        meta_model(cfg)
        from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
        assert MTPLossAutoScaler.main_loss_backward_scale.device.type == "cpu"
        model = build_model(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (2, 32))
        pos = torch.arange(32).expand(2, 32)
        loss = model(tokens, pos, None, labels=tokens).float().mean()
        loss.backward()
        print("OK")
    """)
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
