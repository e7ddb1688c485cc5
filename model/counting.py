"""Parameter and FLOP counts of a hybrid model, by layer kind.

Parameters are counted twice, independently: analytically from the config (`param_counts`), and by building the
real Megatron-Core model on the meta device (`meta_param_count`: no memory, every tensor factory redirected to
`meta`); tests hold the two equal. FLOPs are analytic (`forward_flops`), with the formulas below; a test
compares them with `torch.utils.flop_counter` on an actual CPU forward.

FLOP formulas (forward, per token, 2 FLOPs per multiply-add; s = sequence length):
- linear in->out: 2*in*out. Mamba in_proj d->(2*di + 2*g*n + h), out_proj di->d.
- Mamba SSD scan (chunk T): per chunk 2*T^2*n*g (C.B^T) + 2*T^2*p*h (masked product) + 4*T*p*n*h (chunk state
  and read-out); kernels/ssd.py computes exactly these matmuls. The depthwise conv (2*k*(di+2*g*n)), gates,
  norms, softmax and the scan's exponentials are elementwise: listed under `elementwise_not_counted`, excluded
  from the totals (and invisible to torch's flop counter, which only counts matmul/conv/attention ops).
- attention core: QK^T and PV, 4*nq*dh per (query, key) pair: 4*nq*dh*s per token for the full matrix that the
  local (non-fused) attention computes, 4*nq*dh*(s+1)/2 with causal masking exploited (flash attention).
- MoE: router 2*d*E; latent projections 2*2*d*l; routed experts top_k * 2*2*l_or_d*f; shared expert 2*2*d*fs.
- logits 2*d*V (main head, and once more per MTP depth); MTP eh_proj 2*(2d)*d per depth.
- training = 3 x forward (backward = 2 x forward, the usual convention; recomputation not included).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from kernels.ssd import ssd_matmul_flops

from .config import ModelConfig

KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def _layer_params(cfg: ModelConfig, sym: str, active: bool = False) -> int:
    d = cfg.hidden_size
    if sym == "M":
        di, g, n, h, k = cfg.mamba_d_inner, cfg.mamba_num_groups, cfg.mamba_state_dim, cfg.mamba_num_heads, cfg.mamba_conv_kernel
        conv_ch = di + 2 * g * n
        return d + d * (2 * di + 2 * g * n + h) + conv_ch * k + conv_ch + 3 * h + di + di * d
    if sym == "*":
        q, kv = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
        return d + d * (q + 2 * kv) + q * d
    if sym == "-":
        return d + 2 * d * cfg.ffn_hidden_size
    if sym == "E":
        lat = cfg.moe_latent_size
        width = lat or d
        n_exp = cfg.moe_router_topk if active else cfg.num_moe_experts
        total = d + cfg.num_moe_experts * d  # pre-norm, router (the expert-bias buffer is not a parameter)
        total += 2 * d * lat if lat else 0
        total += n_exp * 2 * width * cfg.moe_ffn_hidden_size
        total += 2 * d * (cfg.moe_shared_expert_intermediate_size or 0)
        return total
    raise ValueError(f"unknown layer symbol {sym!r}")


def param_counts(cfg: ModelConfig) -> "OrderedDict[str, int]":
    """Total and active (per token) parameters, with each embedding convention spelled out.

    `active_*`: parameters a token's forward touches (all but the non-selected routed experts).
    Conventions: `_with_embeddings` counts the input embedding and the output head; `_with_head` counts the
    head but not the input-embedding lookup (a lookup is no matmul); `_without_embeddings` counts neither.
    MTP is reported on its own and not in the main totals (how the published numbers are given)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    emb = V * d
    layers = sum(_layer_params(cfg, s) for s in cfg.hybrid_override_pattern)
    layers_active = sum(_layer_params(cfg, s, active=True) for s in cfg.hybrid_override_pattern)
    out = OrderedDict()
    for kind_sym, kind in KINDS.items():
        out[f"layers_{kind}"] = sum(_layer_params(cfg, s) for s in cfg.hybrid_override_pattern if s == kind_sym)
    out["embedding"] = emb
    out["output_head"] = emb
    out["final_norm"] = d
    out["total"] = layers + 2 * emb + d
    mtp = mtp_active = 0
    if cfg.mtp_num_layers:
        block = 3 * d + 2 * d * d  # enorm, hnorm, final_layernorm + eh_proj (2d -> d)
        mtp = block + sum(_layer_params(cfg, s) for s in cfg.mtp_hybrid_override_pattern)
        mtp_active = block + sum(_layer_params(cfg, s, active=True) for s in cfg.mtp_hybrid_override_pattern)
    out["mtp_block"] = mtp
    out["total_with_mtp"] = out["total"] + mtp
    out["active_with_embeddings"] = layers_active + 2 * emb + d
    out["active_with_head"] = layers_active + emb + d
    out["active_without_embeddings"] = layers_active + d
    out["mtp_block_active"] = mtp_active
    return out


def _linear(i: int, o: int) -> int:
    return 2 * i * o


def _layer_flops(cfg: ModelConfig, sym: str, seq_len: int, causal: bool) -> tuple[dict, dict]:
    """(counted FLOPs by component, elementwise FLOPs not counted) per token for one layer."""
    d = cfg.hidden_size
    if sym == "M":
        di, g, n, h, p = cfg.mamba_d_inner, cfg.mamba_num_groups, cfg.mamba_state_dim, cfg.mamba_num_heads, cfg.mamba_head_dim
        scan = ssd_matmul_flops(seq_len, h, p, g, n, cfg.mamba_chunk_size) / seq_len
        return ({"mamba_proj": _linear(d, 2 * di + 2 * g * n + h) + _linear(di, d), "mamba_ssd": scan},
                {"mamba_conv": 2 * cfg.mamba_conv_kernel * (di + 2 * g * n)})
    if sym == "*":
        q, kv = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
        keys = (seq_len + 1) / 2 if causal else seq_len
        return {"attention_proj": _linear(d, q + 2 * kv) + _linear(q, d), "attention_core": 4 * q * keys}, {}
    if sym == "-":
        return {"mlp": 2 * _linear(d, cfg.ffn_hidden_size)}, {}
    if sym == "E":
        lat = cfg.moe_latent_size
        f = {"moe_router": _linear(d, cfg.num_moe_experts),
             "moe_routed_experts": cfg.moe_router_topk * 2 * _linear(lat or d, cfg.moe_ffn_hidden_size)}
        if lat:
            f["moe_latent_proj"] = 2 * _linear(d, lat)
        if cfg.moe_shared_expert_intermediate_size:
            f["moe_shared_expert"] = 2 * _linear(d, cfg.moe_shared_expert_intermediate_size)
        return f, {}
    raise ValueError(f"unknown layer symbol {sym!r}")


def forward_flops(cfg: ModelConfig, seq_len: int, causal: bool = True, include_mtp: bool = True) -> "OrderedDict[str, float]":
    """Forward FLOPs per token by component (see the module docstring), with `total` and `training_total`."""
    acc: "OrderedDict[str, float]" = OrderedDict()
    skipped: "OrderedDict[str, float]" = OrderedDict()

    def add(parts: dict, into: dict, prefix: str = "") -> None:
        for k, v in parts.items():
            into[prefix + k] = into.get(prefix + k, 0) + v

    for s in cfg.hybrid_override_pattern:
        f, e = _layer_flops(cfg, s, seq_len, causal)
        add(f, acc)
        add(e, skipped)
    acc["logits"] = _linear(cfg.hidden_size, cfg.vocab_size)
    if include_mtp and cfg.mtp_num_layers:
        for _ in range(cfg.mtp_num_layers):
            acc["mtp_eh_proj"] = acc.get("mtp_eh_proj", 0) + _linear(2 * cfg.hidden_size, cfg.hidden_size)
            for s in cfg.mtp_hybrid_override_pattern:
                f, e = _layer_flops(cfg, s, seq_len, causal)
                add(f, acc, "mtp_")
                add(e, skipped, "mtp_")
            acc["mtp_logits"] = acc.get("mtp_logits", 0) + _linear(cfg.hidden_size, cfg.vocab_size)
    total = sum(acc.values())
    acc["total"] = total
    acc["training_total"] = 3 * total
    acc["elementwise_not_counted"] = sum(skipped.values())
    return acc


_FACTORIES = {getattr(torch, n) for n in (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "randperm", "linspace",
    "eye", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "empty_strided")}


class _MetaFactories(TorchFunctionMode):
    """Every tensor factory (also the ones Megatron-Core calls with an explicit CPU/CUDA device) builds on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES:
            kwargs["device"] = "meta"
        elif func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return args[0] if not (len(args) > 1 and isinstance(args[1], torch.dtype)) else func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    from .build import preload

    preload()  # import Megatron-Core outside the meta context (see preload)
    with _MetaFactories(), torch.device("meta"):
        yield


def meta_model(cfg: ModelConfig, **build_kwargs) -> torch.nn.Module:
    """The real model (Megatron-Core modules), parameters on the meta device: costs no memory."""
    from .build import build_model, transformer_config

    tc = transformer_config(cfg, perform_initialization=False, use_cpu_initialization=False)
    with meta_device():
        return build_model(cfg, config=tc, **build_kwargs)


def meta_param_count(cfg: ModelConfig) -> "OrderedDict[str, int]":
    """Parameters of the built model, split as `param_counts` reports them (MTP block on its own)."""
    model = meta_model(cfg)
    out: "OrderedDict[str, int]" = OrderedDict(total=0, mtp_block=0)
    for name, p in model.named_parameters():
        out["mtp_block" if name.startswith("mtp.") else "total"] += p.numel()
    return out


def format_table(cfg: ModelConfig, seq_len: int, name: Optional[str] = None) -> str:
    pc = param_counts(cfg)
    fl = forward_flops(cfg, seq_len)
    lines = [f"model {name or ''}  pattern {cfg.hybrid_override_pattern} ({cfg.num_layers} layers)"
             + (f" + MTP {cfg.mtp_hybrid_override_pattern} x{cfg.mtp_num_layers}" if cfg.mtp_num_layers else ""), "",
             f"{'parameters':52s}{'count':>16s}"]
    notes = {
        "total": "total, main model (embedding + head + layers), no MTP",
        "mtp_block": "MTP block (shared over depths), reported on its own",
        "total_with_mtp": "total including the MTP block",
        "active_with_embeddings": "active per token, counting input embedding and head",
        "active_with_head": "active per token, head but not the input-embedding lookup",
        "active_without_embeddings": "active per token, neither embedding matrix",
        "mtp_block_active": "active per token in the MTP block (per depth)",
    }
    for k, v in pc.items():
        lines.append(f"{notes.get(k, k):52s}{v:>16,d}  ({v / 1e9:.2f}B)")
    lines += ["", f"{'forward FLOPs per token (seq ' + str(seq_len) + ', causal attention)':52s}{'GFLOP':>16s}"]
    for k, v in fl.items():
        lines.append(f"{k:52s}{v / 1e9:>16.4f}")
    lines.append("(training_total = 3 x forward; elementwise ops (Mamba conv, norms, gates, softmax) not in totals)")
    return "\n".join(lines)
