"""`foldtron plan` and its models: the published Nemotron 3 layouts come out feasible on their hardware, obviously
wrong layouts do not, the per-rank parameter split adds up to model/counting.py's exact count, and the CLI prints
a ranked table and JSON."""
from __future__ import annotations

import json

import pytest

from model.counting import param_counts
from model.precision import PrecisionConfig
from model.presets import get_preset
from parallel.gpus import get_gpu
from parallel.layout import ParallelLayout
from parallel.memory import GiB, MemoryOptions, memory_per_gpu, rank_params
from parallel.planner import evaluate, plan

SUPER_NVFP4 = PrecisionConfig(recipe="nvfp4", first_last_layers_bf16=True, num_layers_at_end_in_bf16=14)


def _feasible(preset, layout, world, gpu, seq, gbs, precision):
    p, why = evaluate(get_preset(preset), layout, world, get_gpu(gpu), seq, gbs, precision=precision)
    return p, why


@pytest.mark.parametrize("gpu", ["b200", "gb200"])
def test_super_tp4_ep8_at_8k_fits_blackwell(gpu):
    p, why = _feasible("super-120b-a12b", ParallelLayout(tp=4, ep=8, sequence_parallel=True), 4096, gpu, 8192,
                       3072, SUPER_NVFP4)
    assert p is not None, why
    assert p.memory.total < get_gpu(gpu).hbm_gb * 1e9
    assert 0.05 < p.time.mfu < 1.0


def test_super_long_context_cp64_tp2_ep64_at_1m_fits_gb200():
    p, why = _feasible("super-120b-a12b", ParallelLayout(tp=2, cp=64, ep=64, sequence_parallel=True), 1024, "gb200",
                       1 << 20, 16, SUPER_NVFP4)
    assert p is not None, why
    # a million-token sequence: activations dominate, and the planner had to keep them in check
    assert p.memory.activations > p.memory.weights


def test_nano_long_context_cp8_tp8_ep8_pp4_fits_h100():
    p, why = _feasible("nano-30b-a3b", ParallelLayout(tp=8, cp=8, ep=8, pp=4, sequence_parallel=True), 256, "h100",
                       1 << 20, 48, PrecisionConfig(recipe="fp8", mamba_out_proj="fp8"))
    assert p is not None, why
    assert p.memory.in_flight == 4  # 1F1B: the first of 4 stages holds 4 micro-batches


@pytest.mark.parametrize("preset,layout,world,gpu,seq,gbs", [
    # every expert on every GPU: 120B parameters x 6 bytes cannot fit 186 GB
    ("super-120b-a12b", dict(tp=1, ep=1), 1024, "gb200", 8192, 3072),
    # a million tokens without context parallelism
    ("super-120b-a12b", dict(tp=2, ep=16, sequence_parallel=True), 32, "gb200", 1 << 20, 16),
    # Super's published layout on an 80 GB Hopper: 14B expert parameters per GPU (weights + fp32 grads) > 80 GB
    ("super-120b-a12b", dict(tp=4, ep=8, sequence_parallel=True), 4096, "h100", 8192, 3072),
])
def test_obviously_wrong_layouts_are_out_of_memory(preset, layout, world, gpu, seq, gbs):
    prec = PrecisionConfig(recipe="fp8", mamba_out_proj="fp8") if gpu == "h100" else SUPER_NVFP4
    p, why = _feasible(preset, ParallelLayout(**layout), world, gpu, seq, gbs, prec)
    assert p is None and why[0].startswith("memory"), why


def test_invalid_layout_is_rejected_with_the_layout_validation_message():
    p, why = _feasible("super-120b-a12b", ParallelLayout(tp=3, ep=8, sequence_parallel=True), 3072, "gb200", 8192,
                       3072, SUPER_NVFP4)
    assert p is None and any("tp=3" in w for w in why)


@pytest.mark.parametrize("preset", ["super-120b-a12b", "nano-30b-a3b", "tiny"])
def test_rank_params_add_up_to_the_exact_count(preset):
    cfg = get_preset(preset)
    one = rank_params(cfg, ParallelLayout())
    assert one.dense + one.expert == param_counts(cfg)["total_with_mtp"]
    # EP splits only the experts: EP ranks together hold each expert exactly once
    if "E" in cfg.all_symbols:
        ep = 4
        split = rank_params(cfg, ParallelLayout(ep=ep))
        assert split.dense == one.dense and split.expert * ep == one.expert


def test_distributed_optimizer_shards_state_over_dp_and_expert_dp():
    cfg = get_preset("super-120b-a12b")
    opts = MemoryOptions(seq_length=8192, global_batch_size=3072)
    base = dict(tp=4, ep=8, sequence_parallel=True)
    sharded = memory_per_gpu(cfg, ParallelLayout(**base), 4096, opts)
    full = memory_per_gpu(cfg, ParallelLayout(**base, use_distributed_optimizer=False), 4096, opts)
    assert full.optimizer > 100 * sharded.optimizer
    assert full.weights == sharded.weights and full.activations == sharded.activations
    # recompute only ever lowers activation memory
    acts = [memory_per_gpu(cfg, ParallelLayout(**base), 4096, opts.model_copy(update={"recompute": r})).activations
            for r in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2] > 0


def test_plan_ranks_feasible_layouts_fastest_first():
    cfg = get_preset("nano-30b-a3b")
    plans, discarded = plan(cfg, 64, get_gpu("b200"), 8192, 256, precision=PrecisionConfig(recipe="nvfp4"))
    assert plans and set(discarded) == {"invalid", "out_of_memory"}
    speeds = [p.time.tokens_per_s_per_gpu for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    assert all(p.memory.total + 6 * GiB <= get_gpu("b200").hbm_gb * 1e9 for p in plans)


def test_cli_table_and_json(capsys):
    from pretrain.cli import main

    assert main(["plan", "--preset", "nano-30b-a3b", "--gpus", "64", "--gpu", "b200", "--seq-len", "8192",
                 "--global-batch", "256", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "tok/s/GPU" in out and "MFU" in out and len(out.strip().splitlines()) >= 5
    assert main(["plan", "--preset", "nano-30b-a3b", "--gpus", "64", "--gpu", "b200", "--seq-len", "8192",
                 "--global-batch", "256", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plans"][0]["mem_gib"]["total"] > 0 and data["plans"][0]["tokens_per_s_per_gpu"] > 0
    assert main(["plan", "--preset", "nano-30b-a3b", "--gpus", "64", "--gpu", "h100", "--global-batch", "256",
                 "--precision", "nvfp4"]) == 2
    assert "no nvfp4" in capsys.readouterr().out


def test_hopper_formats_are_fp8_not_mxfp8():
    """TE's MXFP8 and NVFP4 need compute capability >= 10.0: Hopper plans FP8 (per-tensor / blockwise)."""
    from parallel.gpus import get_gpu

    h200, b200 = get_gpu("h200"), get_gpu("b200")
    assert h200.formats() == ["bf16", "fp8"]
    assert b200.formats() == ["bf16", "fp8", "mxfp8", "nvfp4"]
    with pytest.raises(ValueError, match="no mxfp8"):
        h200.peak_tflops("mxfp8")
    from pretrain.commands.plan import _precision

    prec = _precision("auto", h200, 52, None)
    assert prec.recipe == "fp8" and prec.mamba_out_proj == "fp8"


def test_a_plan_prints_overrides_the_run_config_accepts():
    """A planned layout can actually be run: its overrides (layout, micro-batch, recompute) validate."""
    from parallel.gpus import get_gpu
    from parallel.planner import plan
    from pretrain.config import load_config

    plans, _ = plan(get_preset("nano-30b-a3b"), 64, get_gpu("h100"), 8192, 512, (1,),
                    PrecisionConfig(recipe="fp8", mamba_out_proj="fp8"))
    assert plans
    for p in plans[:5]:
        cfg = load_config(None, ["model.preset=nano-30b-a3b", *p.overrides()])
        assert cfg.performance.recompute == p.recompute and cfg.parallel.tp == p.layout.tp
