"""Training FLOPs per token of the hybrid model, counted per layer kind from its config (Megatron-LM's formulas
for hybrid models: GEMMs 2*m*n*k, causal attention halved, Mamba-2 scan 7*d_inner*state, MoE top-k experts and
the shared expert, latent projections, MTP depths, output layer); training = 3x forward (1 fwd + 2 bwd)."""
from __future__ import annotations

from model.config import ModelConfig


def _layer(c: ModelConfig, kind: str, seq: int) -> float:
    h = c.hidden_size
    if kind == "*":
        q, kv = c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
        return 2 * h * (q + 2 * kv) + 2 * seq * q + 2 * q * h  # qkv, causal QK^T+PV, out proj
    if kind == "M":
        inner = c.mamba_num_heads * c.mamba_head_dim
        in_proj = 2 * inner + 2 * c.mamba_num_groups * c.mamba_state_dim + c.mamba_num_heads
        return 2 * h * in_proj + 7 * inner * c.mamba_state_dim + 2 * inner * h
    if kind == "-":
        return 2 * 2 * h * c.ffn_hidden_size
    if kind == "E":
        d = c.moe_latent_size or h
        f = 2 * h * c.num_moe_experts + c.moe_router_topk * 2 * 2 * d * c.moe_ffn_hidden_size
        if c.moe_latent_size:
            f += 2 * 2 * h * c.moe_latent_size
        if c.moe_shared_expert_intermediate_size:
            f += 2 * 2 * h * c.moe_shared_expert_intermediate_size
        return f
    raise ValueError(f"unknown layer symbol {kind!r}")


def forward_flops_per_token(c: ModelConfig, seq: int) -> float:
    f = sum(_layer(c, k, seq) for k in c.hybrid_override_pattern)
    logits = 2 * c.hidden_size * c.vocab_size
    f += logits
    if c.mtp_num_layers:
        per_depth = 2 * 2 * c.hidden_size * c.hidden_size + logits  # eh_proj (2h -> h) and the shared head
        per_depth += sum(_layer(c, k, seq) for k in c.mtp_hybrid_override_pattern or "")
        f += c.mtp_num_layers * per_depth
    return float(f)


def train_flops_per_token(c: ModelConfig, seq: int) -> float:
    return 3.0 * forward_flops_per_token(c, seq)
