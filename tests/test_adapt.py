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


def _gpt_step(tp=1, ep=1, pp=1, cp=1, sp=False, moe=False, seed=0):
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
                                 expert_model_parallel_size=ep, context_parallel_size=cp)
    try:
        model_parallel_cuda_manual_seed(seed)
        cfg = TransformerConfig(
            num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, use_cpu_initialization=True,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
            context_parallel_size=cp,
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
                         pre_process=pre, post_process=post, position_embedding_type="none")
        torch.manual_seed(123)  # same batch on every rank
        tokens = torch.randint(0, 64, (2, 16))
        labels = torch.roll(tokens, -1, dims=1)
        pos = torch.arange(16).unsqueeze(0).expand(2, -1)
        if cp > 1:
            from parallel.context_parallel import shard_sequence

            r = ps.get_context_parallel_rank()
            tokens, labels, pos = (shard_sequence(t, cp, r) for t in (tokens, labels, pos))

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


@pytest.mark.multiproc
def test_gpt_cp2():
    res = run_on_ranks(_on_rank, 2, cp=2)
    assert all(n_grads == n_params for _, n_grads, n_params in res)


# ---------------------------------------------------------------------------------------------------------------
# Scenarios for the removal tests

@pytest.fixture(scope="module")
def single_process():
    from model.build import init_single_process

    init_single_process(seed=1234)

# small, single-purpose, each fails without the patch named in REMOVAL.

def test_scenario_tiny_hybrid_builds_and_trains(single_process):
    import torch

    from model.build import build_model
    from model.presets import get_preset

    cfg = get_preset("tiny")
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = model(ids, torch.arange(32).expand(2, 32), None, labels=ids)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_scenario_rng_tracker_forks_the_cpu_generator(single_process):
    """Without the patch, Megatron's _set_cuda_rng_state queues its work with torch's _lazy_call, which never runs
    without CUDA: forking silently leaves the default stream advanced (dropout and resumes draw wrong numbers)."""
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    assert torch.equal(before, torch.get_rng_state())  # the default stream is restored
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked model-parallel stream advanced


def test_scenario_megatron_optimizer_steps_on_cpu(single_process):
    import torch

    from model.build import build_model, transformer_config
    from model.presets import get_preset
    from parallel.layout import ParallelLayout
    from pretrain.config import TrainConfig
    from pretrain.optimizer import build_optimizer, install_grad_sync, optimizer_step, wrap_ddp

    cfg = get_preset("tiny", mtp_num_layers=0, mtp_hybrid_override_pattern=None)
    model = wrap_ddp([build_model(cfg, config=transformer_config(cfg, calculate_per_token_loss=True))],
                     ParallelLayout(), bf16=False)
    install_grad_sync(model)
    opt = build_optimizer(model, TrainConfig(), ParallelLayout(), bf16=False)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    model[0](ids, torch.arange(16).expand(1, 16), None, labels=ids).sum().backward()
    ok, _, _ = optimizer_step(opt)
    assert ok


def test_scenario_expert_params_are_expert_parallel_on_every_layout(single_process):
    from model.build import build_model
    from model.presets import get_preset

    model = build_model(get_preset("tiny"))
    experts = [n for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(not getattr(p, "allreduce", True) for n, p in model.named_parameters() if n in experts)


# patch -> the test that shows it is needed (run with the patch switched off; it must fail)
MATRIX_CP2 = "tests/test_parallel_matrix.py::test_layout_equals_one_process[cp2]"
REMOVAL = {
    "cpu.torch_cuda": "tests/test_adapt.py::test_scenario_tiny_hybrid_builds_and_trains",
    "cpu.rng_tracker": "tests/test_adapt.py::test_scenario_rng_tracker_forks_the_cpu_generator",
    "cpu.cuda_literals": "tests/test_adapt.py::test_gpt_pp2",
    "cpu.moe_split_sizes": "tests/test_adapt.py::test_gpt_moe_ep2",
    "cpu.uneven_collectives": "tests/test_adapt.py::test_gpt_moe_tp2_ep2_sp",
    "cpu.batched_p2p_tags": "tests/test_vpp.py::test_batched_p2p_pairs_activations_and_gradients_on_gloo",
    "cpu.triton_free_imports": "tests/test_adapt.py::test_scenario_tiny_hybrid_builds_and_trains",
    "cpu.tensor_type_names": "tests/test_adapt.py::test_scenario_megatron_optimizer_steps_on_cpu",
    "local.cp_attention": "tests/test_adapt.py::test_gpt_cp2",
    "mtp.cp_global_token_counts": MATRIX_CP2,
    "moe.expert_params_always_expert_parallel":
        "tests/test_adapt.py::test_scenario_expert_params_are_expert_parallel_on_every_layout",
    "stand_in.mamba_mixer_without_mamba_ssm": "tests/test_adapt.py::test_scenario_tiny_hybrid_builds_and_trains",
    "stand_in.latent_moe_without_te": "tests/test_adapt.py::test_scenario_tiny_hybrid_builds_and_trains",
    "optimizer.empty_expert_optimizer_step": "tests/test_train.py::test_vpp_checkpoint_resumes_at_vpp_and_at_pp1",
    "optimizer.unpadded_param_index_maps": "tests/test_train.py::test_mtp_at_pp2_resumes_bit_identically[distopt]",
    "optimizer.torch_adam_step": "tests/test_train.py::test_mtp_at_pp2_resumes_bit_identically[distopt]",
}
HEAVY = {"mtp.cp_global_token_counts", "optimizer.empty_expert_optimizer_step", "optimizer.unpadded_param_index_maps",
         "optimizer.torch_adam_step", "cpu.uneven_collectives"}


def test_every_patch_has_a_removal_test():
    from model import adapt

    assert set(REMOVAL) == {p.name for p in adapt.PATCHES}


def _removal_params():
    return [pytest.param(name, node, id=name, marks=[pytest.mark.slow] if name in HEAVY else [])
            for name, node in REMOVAL.items()]


# One subprocess per patch (~40 s each, several minutes for the HEAVY ones): run on a Megatron-Core upgrade with
# `make test-upgrade` (pytest -m upgrade), not in every `make test`.
@pytest.mark.upgrade
@pytest.mark.multiproc
@pytest.mark.parametrize("name,node", _removal_params())
def test_removing_a_patch_fails_its_scenario(name, node):
    """The next Megatron-Core upgrade runs this first: a patch whose scenario passes without it is no longer needed."""
    from model import adapt

    env = adapt.environment("cpu")
    patch = next(p for p in adapt.PATCHES if p.name == name)
    if not patch.needed(env):
        pytest.skip(f"{name} is not needed in this environment ({env}); its removal cannot be shown here")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           node], cwd=root, env={**os.environ, "FOLDTRON_ADAPT_SKIP": name},
                          capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-3000:]
    assert proc.returncode == 1, f"without {name}, {node} should fail (exit 1), got exit {proc.returncode}:\n{tail}"
    last = tail.strip().splitlines()[-1]
    assert "failed" in last or "error" in last, tail  # a failing test, or its fixture (exit 1 either way)
