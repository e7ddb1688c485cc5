"""Memory per GPU of the hybrid model under a folded layout: weights, gradients, optimizer state, activations.

Why our own and not Megatron's `theoretical_memory_usage`: that report treats every layer as attention + dense MLP
(it knows no Mamba, no LatentMoE dispatch in the latent dimension, no hybrid MTP) and users found it wrong for
MoE (Megatron-LM issue 1784). Here every term is listed per layer kind, from what the layers actually save for
backward, and tests hold the `local` profile to tensors measured on real CPU forward/backward passes.

Parameters per rank follow Megatron-Core's sharding exactly (tests compare with the built model on gloo ranks):
TP splits attention/Mamba/MLP/shared-expert/vocab matrices, the router, the LatentMoE projections and the norms
are replicated; EP splits the routed experts, ETP each expert's FFN; CP and DP split no parameter.

Bytes per parameter (Megatron mixed precision): BF16 weight (2) + FP32 main gradient (4) + FP32 master weight
and Adam m, v (12). The distributed optimizer shards the 12 over the DP group (dense parameters) and the expert-DP
group (expert parameters); Megatron 0.16 keeps the full FP32 grad buffer (its reduce-scatter writes in place).
Low-precision linears (MXFP8/NVFP4, Transformer Engine) also cache the quantized weight, row- and column-wise.

Activations: bytes per token of one micro-batch on one rank, per layer kind, for two implementation profiles:
- `te`: the GPU production path (Transformer Engine fused norm+linear, flash attention saving q, k, v, out and
  the softmax log-sum-exp, mamba-ssm's fused `mamba_split_conv1d_scan_combined` saving only its input and the
  pre-norm output). Linear inputs are saved in the linear's number format (TE saves the quantized column-wise
  copy for the weight gradient).
- `local`: the CPU path (Megatron-Core local layers, unfused attention saving the softmax probabilities,
  the torch chunked SSD scan of kernels/ssd.py saving its chunk intermediates); what the tests measure.
Under TP with sequence parallelism the hidden-size tensors are split over TP (Megatron's column-parallel linear
saves its input before the all-gather); TP-sharded widths are always split. CP splits the sequence (Mamba's
all-to-all trades the sequence split for a head split: same bytes). Recompute: `full` keeps only each layer's
input (plus one layer's activations while it is recomputed); `selective` recomputes norms, the expert/MLP
activation function and the core attention (Megatron `recompute_modules` layernorm, moe_act, mlp act, core_attn).
Pipeline (1F1B): stage i of pp holds min(pp - i, micro-batches) micro-batches in flight; interleaved (vpp)
multiplies stage 0 by (1 + (pp - 1) / (pp * vpp)) (Korthikanti et al. 2022).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from model.config import ModelConfig
from model.pattern import split_pipeline
from model.precision import PrecisionConfig, linear_format

from .layout import ParallelLayout

GiB = 1024 ** 3
Recompute = Literal["none", "selective", "full"]
Profile = Literal["te", "local"]

#: Bytes a linear's saved input takes per element, by number format (TE saves the column-wise quantized copy:
#: MXFP8 1 byte + one E8M0 scale per 32, NVFP4 half a byte + one E4M3 scale per 16).
FORMAT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "mxfp8": 1.0 + 1 / 32, "nvfp4": 0.5 + 1 / 16}


class MemoryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_length: int = Field(8192, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    global_batch_size: int = Field(1, ge=1)
    recompute: Recompute = "none"
    profile: Profile = "te"  # te: GPU kernels; local: the CPU path (tests)
    activation_bytes: float = 2.0  # bf16 activations (4 for the fp32 CPU tests)
    param_bytes: float = 2.0  # bf16 model weights
    grad_bytes: float = 4.0  # fp32 main-gradient buffer
    optimizer_bytes: float = 12.0  # fp32 master weight + Adam m + v
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)  # which linears are MXFP8/NVFP4
    # Not in the model: CUDA context, NCCL buffers, allocator fragmentation; the planner subtracts it from HBM.
    reserved_gib: float = 6.0


class RankParams(BaseModel):
    """Parameters held by one rank of one pipeline stage, split by who shards their optimizer state."""

    dense: int  # sharded by the distributed optimizer over DP (x CP)
    expert: int  # sharded over expert-DP
    low_precision: float  # parameters of MXFP8/NVFP4 linears (weighted by their cached-copy bytes / 1 byte)


class MemoryBreakdown(BaseModel):
    stage: int  # the pipeline stage this breakdown is for (the fullest one)
    weights: float
    grads: float
    optimizer: float
    weight_cache: float  # quantized weight copies of low-precision linears
    activations: float
    in_flight: float  # micro-batches whose activations are alive at the peak
    total: float

    def gib(self) -> dict:
        return {k: (v / GiB if isinstance(v, float) and k not in ("in_flight",) else v)
                for k, v in self.model_dump().items()}


# ------------------------------------------------------------------------------------------------ parameters
def _layer_params_local(cfg: ModelConfig, sym: str, tp: int, ep: int, etp: int) -> tuple[int, int]:
    """(dense, expert) parameters of one layer on one rank, as Megatron-Core shards them."""
    d = cfg.hidden_size
    if sym == "M":
        di, g, n, h, k = cfg.mamba_d_inner, cfg.mamba_num_groups, cfg.mamba_state_dim, cfg.mamba_num_heads, cfg.mamba_conv_kernel
        conv = di + 2 * g * n
        return d + (d * (2 * di + 2 * g * n + h) + conv * (k + 1) + 3 * h + di + di * d) // tp, 0
    if sym == "*":
        # tp > num_query_groups (a multiple of it): each rank computes its KV group's whole QKV projection
        # (Megatron-Core attention.py:289), so QKV is split over min(tp, groups) only.
        q, kv = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
        return d + d * (q + 2 * kv) // min(tp, cfg.num_query_groups) + q * d // tp, 0
    if sym == "-":
        return d + 2 * d * cfg.ffn_hidden_size // tp, 0
    if sym == "E":
        lat = cfg.moe_latent_size
        dense = d + cfg.num_moe_experts * d + (2 * d * lat if lat else 0)
        dense += 2 * d * (cfg.moe_shared_expert_intermediate_size or 0) // tp
        expert = cfg.num_moe_experts // ep * 2 * (lat or d) * cfg.moe_ffn_hidden_size // etp
        return dense, expert
    raise ValueError(f"unknown layer symbol {sym!r}")


def stage_patterns(cfg: ModelConfig, layout: ParallelLayout) -> list[list[tuple[int, str]]]:
    """Per pipeline rank: (global layer index, symbol) of every layer it holds (all its virtual chunks)."""
    chunks = split_pipeline(cfg.hybrid_override_pattern, layout.pp * (layout.vpp or 1))
    out: list[list[tuple[int, str]]] = [[] for _ in range(layout.pp)]
    for c in chunks:
        out[c.stage % layout.pp] += [(c.offset + i, s) for i, s in enumerate(c.pattern)]
    return out


def _lowp_params(cfg: ModelConfig, sym: str, index: Optional[int], tp: int, ep: int, etp: int,
                 prec: PrecisionConfig, is_mtp: bool) -> float:
    """Parameters of the layer's linears in MXFP8/NVFP4, weighted by bytes of their row+column quantized cache."""
    d = cfg.hidden_size
    L = cfg.num_layers

    def w(role: str, n: float) -> float:
        fmt = linear_format(prec, num_layers=L, layer_index=index, role=role, is_mtp=is_mtp)
        return 2 * FORMAT_BYTES[fmt] * n if fmt in ("fp8", "mxfp8", "nvfp4") else 0.0

    if sym == "M":
        di, g, nn, h = cfg.mamba_d_inner, cfg.mamba_num_groups, cfg.mamba_state_dim, cfg.mamba_num_heads
        return w("in_proj", d * (2 * di + 2 * g * nn + h) / tp) + w("out_proj", di * d / tp)
    if sym == "*":
        q, kv = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
        return w("linear_qkv", d * (q + 2 * kv) / min(tp, cfg.num_query_groups)) + w("linear_proj", q * d / tp)
    if sym == "-":
        return w("linear_fc1", d * cfg.ffn_hidden_size / tp) * 2
    if sym == "E":
        lat = cfg.moe_latent_size
        out = w("linear_fc1", cfg.num_moe_experts / ep * 2 * (lat or d) * cfg.moe_ffn_hidden_size / etp)
        out += w("linear_fc1", 2 * d * (cfg.moe_shared_expert_intermediate_size or 0) / tp)
        if lat:
            out += w("fc1_latent_proj", 2 * d * lat)
        return out
    raise ValueError(f"unknown layer symbol {sym!r}")


def rank_params(cfg: ModelConfig, layout: ParallelLayout, stage: int = 0,
                precision: Optional[PrecisionConfig] = None) -> RankParams:
    """Parameters on one rank of pipeline stage `stage` (embedding on the first, head + final norm + MTP on the
    last, as Megatron-Core places them)."""
    tp, ep, etp = layout.tp, layout.ep, layout.etp
    prec = precision or PrecisionConfig()
    stages = stage_patterns(cfg, layout)
    if not 0 <= stage < layout.pp:
        raise ValueError(f"stage {stage} is outside 0..{layout.pp - 1}")
    dense = expert = 0
    lowp = 0.0
    for index, sym in stages[stage]:
        a, b = _layer_params_local(cfg, sym, tp, ep, etp)
        dense, expert = dense + a, expert + b
        lowp += _lowp_params(cfg, sym, index, tp, ep, etp, prec, False)
    d, V = cfg.hidden_size, cfg.vocab_size
    if stage == 0:
        dense += V * d // tp
    if stage == layout.pp - 1:
        dense += V * d // tp + d
        if cfg.mtp_num_layers:
            dense += 3 * d + 2 * d * d // tp
            if layout.pp > 1:
                # MTP looks up the next tokens' embeddings on the last stage: Megatron-Core keeps a full copy of
                # the embedding there (mtp_process), with its own gradient and optimizer state.
                dense += V * d // tp
            for sym in cfg.mtp_hybrid_override_pattern:
                a, b = _layer_params_local(cfg, sym, tp, ep, etp)
                dense, expert = dense + a, expert + b
                lowp += _lowp_params(cfg, sym, None, tp, ep, etp, prec, True)
    return RankParams(dense=dense, expert=expert, low_precision=lowp)


# ------------------------------------------------------------------------------------------------ activations
class _Acc:
    """Sums activation terms (bytes per local token) and remembers which recompute option drops each."""

    def __init__(self, recompute: Recompute):
        self.recompute = recompute
        self.total = 0.0

    def add(self, nbytes: float, selective_drops: bool = False) -> None:
        if self.recompute == "selective" and selective_drops:
            return
        self.total += nbytes


def layer_activation_bytes(cfg: ModelConfig, sym: str, layout: ParallelLayout, opts: MemoryOptions,
                           index: Optional[int] = None, is_mtp: bool = False) -> float:
    """Bytes saved for backward by one layer per token of a micro-batch on this rank's sequence shard
    (tokens = micro_batch_size * seq_length / cp), without recomputation of the whole layer."""
    tp, cp, etp = layout.tp, layout.cp, layout.etp
    sp = tp if layout.sequence_parallel else 1  # hidden-size tensors are split over TP only with SP
    a = opts.activation_bytes
    te = opts.profile == "te"
    d = cfg.hidden_size
    s = opts.seq_length
    acc = _Acc(opts.recompute)

    def lin_in(role: str) -> float:
        """Bytes per element of a linear's saved input (its quantized copy under TE low precision)."""
        if not te:
            return a
        fmt = linear_format(opts.precision, num_layers=cfg.num_layers, layer_index=index, role=role, is_mtp=is_mtp)
        return min(a, FORMAT_BYTES[fmt])

    def norm_linear(role: str) -> None:
        # Pre-norm fused into the first linear: input x and rstd; TE keeps the norm output (its linear's input);
        # the local path keeps the normalized and the weighted output separately.
        acc.add(d / sp * a + 4 / sp)
        acc.add(d / sp * lin_in(role), selective_drops=True)
        if not te:
            acc.add(d / sp * a, selective_drops=True)

    if sym == "M":
        di, g, n, h, p = (cfg.mamba_d_inner / tp, cfg.mamba_num_groups / tp, cfg.mamba_state_dim,
                          cfg.mamba_num_heads / tp, cfg.mamba_head_dim)
        T, k = cfg.mamba_chunk_size, cfg.mamba_conv_kernel
        norm_linear("in_proj")
        acc.add((2 * di + 2 * g * n + h) * a)  # in_proj output zxBCdt (the fused kernel's only big input)
        if te:
            acc.add(di * a)  # pre-norm SSM output (out_x)
        else:
            conv = di + 2 * g * n
            acc.add(conv * (s / cp + k - 1) / (s / cp) * a + conv * a)  # padded conv input, conv output
            acc.add(2 * h * a + conv * a)  # dt before/after softplus, silu output (x, B, C)
            acc.add((2 * g * n + 2 * h * T + g * T + 4 * di + 2 * h + h / T + 2 * h * n + 2 * h * p * n / T) * a)
            acc.add(3 * di * a)  # gated RMSNorm: y, gate product, normalized
        acc.add(cfg.mamba_num_groups / tp * 4)  # gated-norm rstd per group
        acc.add(di * lin_in("out_proj"))  # out_proj input
        return acc.total
    if sym == "*":
        nq, ng, dh = cfg.num_attention_heads / tp, max(cfg.num_query_groups / tp, 1), cfg.kv_channels
        norm_linear("linear_qkv")
        if te:
            acc.add((nq + 2 * ng) * dh * a + nq * dh * a + nq * 4)  # q, k, v, output, softmax log-sum-exp
        else:
            acc.add(3 * nq * dh * a + nq * dh * a)  # q, k and v expanded to the query heads, core output
            acc.add(nq * s * a + s / opts.micro_batch_size, selective_drops=True)  # softmax probs, causal mask
        return acc.total
    if sym == "-":
        f = cfg.ffn_hidden_size / tp
        norm_linear("linear_fc1")
        acc.add(f * a, selective_drops=True)  # fc1 output (activation input)
        acc.add(f * lin_in("linear_fc2"))  # fc2 input
        return acc.total
    if sym == "E":
        lat = cfg.moe_latent_size
        w, f, K, E = lat or d, cfg.moe_ffn_hidden_size / etp, cfg.moe_router_topk, cfg.num_moe_experts
        fs = (cfg.moe_shared_expert_intermediate_size or 0) / tp
        acc.add(d / sp * a + 4 / sp)  # pre-MLP norm: input, rstd
        acc.add(d / sp * a, selective_drops=True)  # norm output (router, shared expert, latent projection input)
        if not te:
            acc.add(d / sp * a, selective_drops=True)  # the local norm keeps normalized and weighted outputs
        # Router in fp32: fp32 copy of its input, logits/scores and the top-k bookkeeping.
        acc.add((4 * d if te else 0) / sp + (2 * E * 4 + K * 16 + 2 * 4) / sp)
        if lat:
            acc.add(w / sp * a)  # fc2_latent_proj input (combined tokens, in l)
        # Routed experts: each token goes to K experts; with ETP the expert rank sees its ETP group's tokens.
        tokens = K * etp / sp
        acc.add(tokens * w * a)  # permuted tokens (experts' fc1 input)
        acc.add(tokens * f * a, selective_drops=True)  # fc1 output (squared-ReLU input)
        acc.add(tokens * f * a)  # fc2 input (activation output)
        acc.add(tokens * (4 + f * a * (0 if te else 1)))  # routing prob per copy; local relu keeps one more
        if te:
            acc.add(K / sp * w * a)  # expert outputs kept by the unpermute for the probs gradient
        if fs:
            acc.add(fs * a, selective_drops=True)  # shared fc1 output
            acc.add(fs * a)  # shared fc2 input
            if not te:
                acc.add(d / sp * a)  # shared fc1 input (a separate copy on the local path)
        return acc.total
    raise ValueError(f"unknown layer symbol {sym!r}")


def _head_bytes(cfg: ModelConfig, layout: ParallelLayout, opts: MemoryOptions) -> float:
    """One output head per token: its input and the fp32 logits the vocab-parallel cross-entropy keeps."""
    sp = layout.tp if layout.sequence_parallel else 1
    return cfg.hidden_size / sp * opts.activation_bytes + cfg.vocab_size / layout.tp * 4 + 16


def stage_activation_bytes(cfg: ModelConfig, layout: ParallelLayout, opts: MemoryOptions, stage: int) -> float:
    """Activation bytes of ONE micro-batch on one rank of pipeline stage `stage`."""
    sp = layout.tp if layout.sequence_parallel else 1
    tokens = opts.micro_batch_size * opts.seq_length / layout.cp
    a, d = opts.activation_bytes, cfg.hidden_size
    layers = stage_patterns(cfg, layout)[stage]
    last = stage == layout.pp - 1
    per_layer = [layer_activation_bytes(cfg, s, layout, opts, index=i) for i, s in layers]
    mtp_layers: list[float] = []
    if last and cfg.mtp_num_layers:
        for _ in range(cfg.mtp_num_layers):
            mtp_layers += [layer_activation_bytes(cfg, s, layout, opts, is_mtp=True)
                           for s in cfg.mtp_hybrid_override_pattern]
    if opts.recompute == "full":
        # Only layer inputs stay; one layer's activations exist again while it is recomputed in backward.
        body = (len(per_layer) + len(mtp_layers)) * d / sp * a + max(per_layer + mtp_layers)
    else:
        body = sum(per_layer) + sum(mtp_layers)
    extra = 8.0 if stage == 0 else 0.0  # token ids
    if last:
        extra += (2 * d / sp * a + 4 / sp) * (1 + cfg.mtp_num_layers)  # final norm(s): input, output, rstd
        extra += _head_bytes(cfg, layout, opts) * (1 + cfg.mtp_num_layers)
        if cfg.mtp_num_layers:
            # per depth: enorm and hnorm (input, output, rstd), eh_proj input (concat, 2d), embedding lookup ids
            extra += cfg.mtp_num_layers * (2 * (2 * d / sp * a + 4 / sp) + 2 * d / sp * a + 8)
    return tokens * (body + extra)


def in_flight_microbatches(layout: ParallelLayout, stage: int, num_microbatches: int) -> float:
    """Micro-batches whose activations a 1F1B stage holds at its peak."""
    held = min(layout.pp - stage, num_microbatches)
    if layout.vpp and layout.pp > 1 and stage == 0:
        held = held * (1 + (layout.pp - 1) / (layout.pp * layout.vpp))
    return float(held)


def memory_per_gpu(cfg: ModelConfig, layout: ParallelLayout, world_size: int, opts: MemoryOptions) -> MemoryBreakdown:
    """Peak memory of the fullest pipeline stage (the one with the largest total)."""
    dp = layout.dp(world_size)
    edp = layout.edp(world_size)
    if dp < 1 or edp < 1:
        raise ValueError(f"layout {layout.describe(world_size)} does not fit {world_size} GPUs")
    nmb = max(1, opts.global_batch_size // (opts.micro_batch_size * dp))
    best: Optional[MemoryBreakdown] = None
    for stage in range(layout.pp):
        rp = rank_params(cfg, layout, stage, opts.precision)
        n = rp.dense + rp.expert
        if layout.use_distributed_optimizer:
            # Megatron shards the optimizer over DP x CP for dense parameters (CP ranks hold the same weights).
            opt = opts.optimizer_bytes * (rp.dense / (dp * layout.cp) + rp.expert / edp)
        else:
            opt = opts.optimizer_bytes * n
        held = in_flight_microbatches(layout, stage, nmb)
        act = stage_activation_bytes(cfg, layout, opts, stage) * held
        br = MemoryBreakdown(stage=stage, weights=float(opts.param_bytes * n), grads=float(opts.grad_bytes * n),
                             optimizer=float(opt), weight_cache=float(rp.low_precision), activations=float(act),
                             in_flight=held, total=0.0)
        br.total = br.weights + br.grads + br.optimizer + br.weight_cache + br.activations
        if best is None or br.total > best.total:
            best = br
    assert best is not None
    return best


def fits(breakdown: MemoryBreakdown, hbm_gb: float, reserved_gib: float) -> bool:
    return breakdown.total + reserved_gib * GiB <= hbm_gb * 1e9
