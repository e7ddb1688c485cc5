"""Step-time model: per-layer FLOPs (model/counting.py's exact per-layer counts) at an achieved fraction of peak per
number format, plus the communication each parallel dimension adds, over NVLink inside a domain and the network
between domains.

What is and is not overlapped follows Megatron-Core's defaults: TP/SP all-gathers and reduce-scatters, CP
exchanges, EP all-to-alls and pipeline sends sit on the critical path of every micro-batch; the distributed
optimizer's gradient reduce-scatter overlaps only the last micro-batch's backward and its parameter all-gather
only the first micro-batch's forward (so what exceeds one micro-batch's time is exposed); 1F1B adds a bubble of
(pp - 1) / vpp micro-batches.

Rank order is Megatron's `tp-cp-ep-dp-pp`: a group's members are `stride` ranks apart (TP 1, CP tp, dense DP
tp*cp; ETP 1, EP etp, expert DP etp*ep). A group inside one NVLink domain runs at NVLink speed; a group spanning
domains is costed hierarchically (NVLink among the members sharing a domain, the network for the rest).
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from model.config import ModelConfig
from model.counting import _layer_flops, forward_flops
from model.precision import linear_format

from .gpus import GPUSpec
from .layout import ParallelLayout
from .memory import MemoryOptions, rank_params, stage_patterns


class SpeedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Achieved fraction of the datasheet's dense peak by the GEMMs of each format (quantization overhead makes the
    # low-precision fractions lower). Attention core, SSD scan and the router run at the bf16 fraction.
    efficiency_bf16: float = Field(0.55, gt=0, le=1)
    efficiency_mxfp8: float = Field(0.45, gt=0, le=1)
    efficiency_fp8: float = Field(0.45, gt=0, le=1)  # Hopper FP8 (per-tensor / blockwise scaling)
    efficiency_nvfp4: float = Field(0.35, gt=0, le=1)
    comm_efficiency: float = Field(0.7, gt=0, le=1)  # achieved fraction of link bandwidth by NCCL collectives
    grad_reduce_bytes: float = 4.0  # fp32 gradient reduce-scatter (Megatron's default main-grad dtype)
    param_gather_bytes: float = 2.0  # bf16 parameter all-gather of the distributed optimizer


class StepTime(BaseModel):
    step_s: float
    compute_s: float  # per step, summed over micro-batches, slowest stage
    tp_s: float
    cp_s: float
    ep_s: float
    pp_p2p_s: float
    bubble_s: float
    dp_exposed_s: float
    tokens_per_s_per_gpu: float
    mfu: float  # model training FLOPs (no recompute) per GPU per second / peak dense BF16


_ROLE = {"mamba_proj": "in_proj", "attention_proj": "linear_qkv", "mlp": "linear_fc1",
         "moe_routed_experts": "linear_fc1", "moe_shared_expert": "linear_fc1", "moe_latent_proj": "fc1_latent_proj"}


def _efficiency(fmt: str, so: SpeedOptions) -> float:
    return {"bf16": so.efficiency_bf16, "fp32": so.efficiency_bf16, "mxfp8": so.efficiency_mxfp8, "fp8": so.efficiency_fp8,
            "nvfp4": so.efficiency_nvfp4}[fmt]


def _layer_seconds_per_token(cfg: ModelConfig, sym: str, seq: int, index: Optional[int], is_mtp: bool,
                             gpu: GPUSpec, opts: MemoryOptions, so: SpeedOptions, opts_tp: int = 1) -> float:
    """Forward seconds per token of one layer on one GPU's share (before dividing by the TP x CP split)."""
    flops, _ = _layer_flops(cfg, sym, seq, True)
    t = 0.0
    for comp, f in flops.items():
        if comp == "mamba_proj":  # in_proj and out_proj can differ in format (Super: out_proj MXFP8)
            di, g, n, h = cfg.mamba_d_inner, cfg.mamba_num_groups, cfg.mamba_state_dim, cfg.mamba_num_heads
            width_in = 2 * di + 2 * g * n + h
            parts = [("in_proj", f * width_in / (width_in + di)), ("out_proj", f * di / (width_in + di))]
        elif comp == "attention_proj":  # QKV split over min(tp, groups) only (memory.py), output over tp
            q, kv = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
            redundant = opts_tp / min(opts_tp, cfg.num_query_groups)
            parts = [("linear_qkv", f * (q + 2 * kv) / (2 * q + 2 * kv) * redundant), ("linear_proj", f * q / (2 * q + 2 * kv))]
        elif comp in _ROLE:
            parts = [(_ROLE[comp], f)]
        else:
            parts = [(None, f)]  # attention core, SSD scan, router: BF16 tensor cores
        for role, ff in parts:
            fmt = "bf16" if role is None else linear_format(opts.precision, num_layers=cfg.num_layers,
                                                            layer_index=index, role=role, is_mtp=is_mtp)
            t += ff / (gpu.peak_tflops(fmt) * 1e12 * _efficiency(fmt, so))
    return t


def group_seconds(nbytes: float, n: int, stride: int, gpu: GPUSpec, so: SpeedOptions, kind: str = "ring") -> float:
    """Seconds for one collective of `nbytes` (the full buffer each rank contributes to / receives from a ring
    all-gather or reduce-scatter, or sends in an all-to-all) over a group of n ranks `stride` apart."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    D = gpu.nvlink_domain
    nvl, net = gpu.nvlink_gb_s * 1e9 * so.comm_efficiency, gpu.network_gb_s * 1e9 * so.comm_efficiency
    span = stride * n
    if span <= D and D % span == 0:  # every group of this kind lies inside one NVLink domain
        return (n - 1) / n * nbytes / nvl
    k = max(1, min(n, D // stride)) if stride <= D else 1  # members sharing one domain
    outer = n // k
    if kind == "a2a":
        return max((k - 1) / n * nbytes / nvl, (n - k) / n * nbytes / net)
    # Hierarchical ring: reduce-scatter inside the domain, then across domains on 1/k of the data.
    return (k - 1) / k * nbytes / nvl + (outer - 1) / outer * nbytes / k / net


def step_time(cfg: ModelConfig, layout: ParallelLayout, world_size: int, gpu: GPUSpec, opts: MemoryOptions,
              so: Optional[SpeedOptions] = None) -> StepTime:
    so = so or SpeedOptions()
    tp, cp, pp, ep, etp = layout.tp, layout.cp, layout.pp, layout.ep, layout.etp
    dp, edp = layout.dp(world_size), layout.edp(world_size)
    seq, mbs = opts.seq_length, opts.micro_batch_size
    nmb = max(1, opts.global_batch_size // (mbs * dp))
    a, d = opts.activation_bytes, cfg.hidden_size
    tokens_mb = mbs * seq  # one micro-batch of one DP replica
    tok_rank = tokens_mb / cp  # a rank's sequence shard
    recompute_fwd = 1.0 if opts.recompute == "full" else 0.0
    passes = 3.0 + recompute_fwd  # forward + backward (2x) (+ the recomputed forward)

    def comm_layer(sym: str) -> tuple[float, float, float]:
        """(TP, CP, EP) seconds of one layer for one micro-batch, forward + backward."""
        hidden = tok_rank * d * a
        t_tp = (4 + 2 * recompute_fwd) * group_seconds(hidden, tp, 1, gpu, so) if tp > 1 else 0.0
        t_cp = t_ep = 0.0
        if cp > 1 and sym == "*":
            kv = tok_rank * 2 * max(cfg.num_query_groups / tp, 1) * cfg.kv_channels * a
            t_cp = (3 + recompute_fwd) * group_seconds(kv * cp, cp, tp, gpu, so)  # ring: all other ranks' KV
        if cp > 1 and sym == "M":
            di, g, n, h = cfg.mamba_d_inner, cfg.mamba_num_groups, cfg.mamba_state_dim, cfg.mamba_num_heads
            width = (2 * di + 2 * g * n + h + di) / tp
            t_cp = (2 + recompute_fwd) * group_seconds(tok_rank * width * a, cp, tp, gpu, so, "a2a")
        if sym == "E" and (ep > 1 or etp > 1):
            w = cfg.moe_latent_size or d
            sp = tp if layout.sequence_parallel else 1
            disp = tok_rank / sp * cfg.moe_router_topk * w * a
            t_ep = (4 + 2 * recompute_fwd) * group_seconds(disp, ep, etp, gpu, so, "a2a")
            t_ep += (4 + 2 * recompute_fwd) * group_seconds(disp * etp, etp, 1, gpu, so)
        return t_tp, t_cp, t_ep

    stages = stage_patterns(cfg, layout)
    per_stage = []
    for stage, layers in enumerate(stages):
        comp = tpt = cpt = ept = 0.0
        items = [(i, s, False) for i, s in layers]
        if stage == pp - 1 and cfg.mtp_num_layers:
            items += [(None, s, True) for _ in range(cfg.mtp_num_layers) for s in cfg.mtp_hybrid_override_pattern]
        for index, sym, is_mtp in items:
            comp += _layer_seconds_per_token(cfg, sym, seq, index, is_mtp, gpu, opts, so, tp)
            x, y, z = comm_layer(sym)
            tpt, cpt, ept = tpt + x, cpt + y, ept + z
        if stage == pp - 1:
            heads = 1 + cfg.mtp_num_layers
            fl = forward_flops(cfg, seq)
            head_flops = fl["logits"] + fl.get("mtp_logits", 0.0) + fl.get("mtp_eh_proj", 0.0)
            comp += head_flops / (gpu.bf16_tflops * 1e12 * so.efficiency_bf16)
            if tp > 1:
                tpt += heads * 2 * group_seconds(tok_rank * d * a, tp, 1, gpu, so)
        comp = comp * passes * tokens_mb / (tp * cp)
        p2p = 0.0
        if pp > 1:
            sp = tp if layout.sequence_parallel else 1
            p2p = 2 * group_seconds(tok_rank * d / sp * a * 2, 2, tp * cp * dp, gpu, so)
        per_stage.append((comp, tpt, cpt, ept, p2p))
    per_mb = [sum(x) for x in per_stage]
    slow = max(range(pp), key=lambda i: per_mb[i])
    t_mb = per_mb[slow]
    bubble = (pp - 1) / (layout.vpp or 1) * t_mb

    # Distributed-optimizer traffic per step: gradients reduce-scattered, parameters all-gathered, over DP x CP
    # (dense) and expert-DP (experts). Without it, an all-reduce (twice the reduce-scatter).
    dp_s = 0.0
    for stage in range(pp):
        rp = rank_params(cfg, layout, stage, opts.precision)
        gb = so.grad_reduce_bytes
        if layout.use_distributed_optimizer:
            t = (group_seconds(rp.dense * gb, dp * cp, tp, gpu, so)
                 + group_seconds(rp.dense * so.param_gather_bytes, dp * cp, tp, gpu, so)
                 + group_seconds(rp.expert * gb, edp, etp * ep, gpu, so)
                 + group_seconds(rp.expert * so.param_gather_bytes, edp, etp * ep, gpu, so))
        else:
            t = 2 * (group_seconds(rp.dense * gb, dp * cp, tp, gpu, so) + group_seconds(rp.expert * gb, edp, etp * ep, gpu, so))
        dp_s = max(dp_s, t)
    dp_exposed = max(0.0, dp_s - t_mb)
    comp, tpt, cpt, ept, p2p = per_stage[slow]
    step = nmb * t_mb + bubble + dp_exposed
    tokens_step = opts.global_batch_size * seq
    tps = tokens_step / step / world_size
    model_flops = forward_flops(cfg, seq)["training_total"]
    return StepTime(step_s=step, compute_s=nmb * comp, tp_s=nmb * tpt, cp_s=nmb * cpt, ep_s=nmb * ept,
                    pp_p2p_s=nmb * p2p, bubble_s=bubble, dp_exposed_s=dp_exposed, tokens_per_s_per_gpu=tps,
                    mfu=model_flops * tps / (gpu.bf16_tflops * 1e12))
