"""Published Nemotron presets and small test presets (facts: shared/reference/nemotron3.md).

A preset is a dict of ModelConfig fields, so a YAML `model:` section can name one and override any field.
"""
from __future__ import annotations

from typing import Any

from .config import ModelConfig

_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
_SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME")
_H8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"

_SHARED_3 = dict(  # what Nano and Super share
    vocab_size=131072, num_attention_heads=32, num_query_groups=2, kv_channels=128,
    mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=8, mamba_conv_kernel=4, mamba_chunk_size=128,
    moe_router_bias_update_rate=1e-3, moe_aux_loss_coeff=1e-4, layernorm_epsilon=1e-5,
)

PRESETS: dict[str, dict[str, Any]] = {
    "nano-30b-a3b": dict(
        _SHARED_3, hybrid_override_pattern=_NANO_PATTERN, num_layers=52, hidden_size=2688,
        mamba_num_heads=64, ffn_hidden_size=1856, num_moe_experts=128, moe_router_topk=6,
        moe_ffn_hidden_size=1856, moe_shared_expert_intermediate_size=3712, moe_latent_size=None,
        moe_router_topk_scaling_factor=2.5, init_method_std=0.0173, max_position_embeddings=262144,
    ),
    "super-120b-a12b": dict(
        _SHARED_3, hybrid_override_pattern=_SUPER_PATTERN, num_layers=88, hidden_size=4096,
        mamba_num_heads=128, ffn_hidden_size=2688, num_moe_experts=512, moe_router_topk=22,
        moe_ffn_hidden_size=2688, moe_shared_expert_intermediate_size=5376, moe_latent_size=1024,
        moe_router_topk_scaling_factor=5.0, mtp_num_layers=2, mtp_hybrid_override_pattern="*E",
        mtp_loss_scaling_factor=0.3, init_method_std=0.014, max_position_embeddings=262144,
    ),
    "nemotron-h-8b": dict(
        vocab_size=131072, hybrid_override_pattern=_H8B_PATTERN, num_layers=52, hidden_size=4096,
        num_attention_heads=32, num_query_groups=8, kv_channels=128, ffn_hidden_size=21504,
        mamba_num_heads=128, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=8,
        mamba_conv_kernel=4, mamba_chunk_size=128, num_moe_experts=0, moe_router_topk=1,
        moe_shared_expert_intermediate_size=None, init_method_std=0.02, max_position_embeddings=8192,
    ),
    # Every layer kind (M, *, -, E with latent projection) and a 2-deep MTP block: CPU tests, quickstart.
    "tiny": dict(
        hybrid_override_pattern="M*-EM*E", num_layers=7, hidden_size=64, vocab_size=512,
        num_attention_heads=4, num_query_groups=2, kv_channels=16, ffn_hidden_size=128,
        mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2,
        mamba_conv_kernel=4, mamba_chunk_size=8, num_moe_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64, moe_latent_size=32,
        moe_router_topk_scaling_factor=2.5, mtp_num_layers=2, mtp_hybrid_override_pattern="*E",
        init_method_std=0.02,
    ),
    # The same without the latent projection (Nano-style MoE) and without MTP.
    "tiny-nolatent": dict(
        hybrid_override_pattern="M*-EME", num_layers=6, hidden_size=64, vocab_size=512,
        num_attention_heads=4, num_query_groups=2, kv_channels=16, ffn_hidden_size=128,
        mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2,
        mamba_conv_kernel=4, mamba_chunk_size=8, num_moe_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64, moe_latent_size=None,
        moe_router_topk_scaling_factor=2.5, init_method_std=0.02,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_fields(name: str) -> dict[str, Any]:
    """The raw field dict of a preset; unknown name → error listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
    return dict(PRESETS[name])


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    fields = preset_fields(name)
    fields.update(overrides)
    return ModelConfig(**fields)
