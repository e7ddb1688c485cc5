"""The hybrid model built from Megatron-Core on CPU: names, forward/backward, MTP in the gradient, learning,
expert-bias updates, and clear errors for patterns and pipeline splits."""
import pytest
import torch

from model.build import build_model, init_single_process, update_expert_bias
from model.pattern import split_pipeline
from model.presets import get_preset


@pytest.fixture(scope="module")
def single_process():
    init_single_process(seed=1234)


def _batch(cfg, b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    return ids, torch.arange(s).expand(b, s)


def test_every_layer_kind_and_megatron_names(single_process):
    cfg = get_preset("tiny")
    model = build_model(cfg)
    names = {n for n, _ in model.named_parameters()}
    for expected in ("embedding.word_embeddings.weight", "decoder.final_norm.weight", "output_layer.weight",
                     "decoder.layers.0.mixer.A_log", "decoder.layers.0.mixer.in_proj.layer_norm_weight",
                     "decoder.layers.0.mixer.norm.weight", "decoder.layers.1.self_attention.linear_qkv.weight",
                     "decoder.layers.2.mlp.linear_fc1.weight", "decoder.layers.3.mlp.router.weight",
                     "decoder.layers.3.mlp.fc1_latent_proj.weight", "decoder.layers.3.mlp.shared_experts.linear_fc2.weight",
                     "mtp.layers.0.eh_proj.weight", "mtp.layers.0.enorm.weight", "mtp.layers.0.final_layernorm.weight",
                     "mtp.layers.0.mtp_model_layer.layers.1.mlp.router.weight"):
        assert expected in names, expected
    assert "decoder.layers.3.mlp.router.expert_bias" in dict(model.named_buffers())
    # no biases anywhere except the Mamba conv (Nemotron: conv bias on)
    assert all(n.endswith("conv1d.bias") for n in names if n.endswith(".bias"))


def test_pipeline_schedule_sets_microbatch_on_mtp_layers(single_process):
    """Megatron-Core 0.19's schedules (transformer/cuda_graphs.py:2935 set_current_microbatch) write the micro-batch
    id on every decoder layer and on each MTP layer's `mtp_model_layer` (the shared hybrid stack), which HybridModel
    builds; the MTP block is upstream's (`mtp_use_repeated_layer`: one shared layer), with Foldtron's names."""
    from megatron.core.pipeline_parallel.schedules import set_current_microbatch

    model = build_model(get_preset("tiny"))
    names = {n for n, _ in model.named_parameters()}
    set_current_microbatch(model, 3)
    assert all(layer.current_microbatch == 3 for layer in model.decoder.layers)
    assert len(model.mtp.layers) == 1 and model.mtp.mtp_use_repeated_layer
    stack = model.mtp.layers[0].mtp_model_layer
    assert len(stack.layers) == 2 and stack.current_microbatch == 3
    assert {n for n, _ in model.named_parameters()} == names
    assert not any("transformer_layer" in n for n in names)


def test_forward_backward_all_grads_and_mtp_in_gradient(single_process):
    cfg = get_preset("tiny")
    model = build_model(cfg)
    ids, pos = _batch(cfg)
    loss = model(ids, pos, None, labels=ids)
    assert loss.shape == ids.shape and torch.isfinite(loss).all()
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
    logits = model(ids, pos, None)
    assert logits.shape == (2, 32, cfg.vocab_size)


def test_fifty_steps_drive_loss_down(single_process):
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = build_model(cfg)
    ids, pos = _batch(cfg, b=2, s=32, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        opt.step()
        update_expert_bias([model])
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


def test_expert_bias_moves_toward_balance(single_process):
    cfg = get_preset("tiny-nolatent")
    model = build_model(cfg)
    router = model.decoder.layers[3].mlp.router
    ids, pos = _batch(cfg)
    model(ids, pos, None, labels=ids).mean().backward()
    counts = router.local_tokens_per_expert.clone()
    assert counts.sum() == ids.numel() * cfg.moe_router_topk
    update_expert_bias([model])
    expected = torch.sign(counts.mean() - counts) * cfg.moe_router_bias_update_rate
    torch.testing.assert_close(router.expert_bias, expected)
    assert router.local_tokens_per_expert.sum() == 0


def test_pattern_errors():
    with pytest.raises(ValueError, match="'X' at position 2"):
        get_preset("tiny", hybrid_override_pattern="M*XEM*E")
    with pytest.raises(ValueError, match="has 6 layers but num_layers is 7"):
        get_preset("tiny", hybrid_override_pattern="M*-EM*")
    with pytest.raises(ValueError, match="do not split evenly over 2 pipeline stages"):
        split_pipeline("M*-EM*E", 2)
    assert [s.pattern for s in split_pipeline("M*-EM*E", 2, num_layers_in_first_pipeline_stage=3)] == ["M*-", "EM*E"]
    assert [s.offset for s in split_pipeline("M*-EM*", 3)] == [0, 2, 4]
    with pytest.raises(ValueError, match="middle pipeline stages"):
        split_pipeline("M*-EM*E", 4, num_layers_in_first_pipeline_stage=2)
