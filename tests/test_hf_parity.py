"""Given the same weights, Foldtron's forward (Megatron-Core + CPU Mamba path) and transformers' independent
NemotronHForCausalLM agree on logits within 1e-4 (fp32), for presets covering M, *, -, E with and without the
latent projection. Weights go through model/hf_mapping.py into a real safetensors checkpoint that
`from_pretrained` loads (the released layout: one key per expert)."""
import json

import pytest
import torch

from model.build import build_model, init_single_process
from model.hf_mapping import hf_config_dict, megatron_to_hf
from model.presets import get_preset

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def single_process():
    init_single_process(seed=11)


def _perturb(model, seed):
    """Random values everywhere (norm weights, D, A_log, dt_bias and expert biases included) so that no
    parameter sits at an identity value that would hide a mapping or numerics mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}),                                       # M * - E(latent), + MTP weights (HF ignores them)
    ("tiny-nolatent", {}),                              # E without latent projection
    ("tiny-nolatent", {"mamba_chunk_size": 5, "moe_router_topk": 3}),  # chunk not dividing the length
])
def test_logits_match_transformers(single_process, tmp_path, preset, overrides):
    from safetensors.torch import save_file
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = get_preset(preset, **overrides)
    model = build_model(cfg).eval()
    _perturb(model, seed=len(preset))
    hf_sd = megatron_to_hf(model.state_dict(), cfg)
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items() if not k.startswith("mtp.")}
    save_file(hf_sd, str(tmp_path / "model.safetensors"))
    NemotronHConfig(**hf_config_dict(cfg)).save_pretrained(tmp_path)
    hf = NemotronHForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    loaded = {k for k, _ in hf.named_parameters()}
    assert len(loaded) > 0 and json.loads((tmp_path / "config.json").read_text())["model_type"] == "nemotron_h"

    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ours = model(ids, pos, None)
        theirs = hf(input_ids=ids).logits
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-4, rel


def test_unknown_parameter_is_an_error():
    cfg = get_preset("tiny-nolatent")
    with pytest.raises(KeyError, match="no HF name"):
        megatron_to_hf({"decoder.layers.0.mixer.bogus": torch.zeros(1)}, cfg)
    with pytest.raises(KeyError, match="no HF name"):
        megatron_to_hf({"decoder.layers.1.self_attention.x": torch.zeros(1)}, cfg)
