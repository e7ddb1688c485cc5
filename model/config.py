"""The hybrid model's config: one typed record that maps onto Megatron-Core's TransformerConfig + Mamba fields.

Field names follow Megatron-Core (and Megatron-LM's arguments) wherever one exists, so a user who knows
`--num-moe-experts` or `--moe-latent-size` finds the same knob here.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, model_validator

from .fielddocs import documented

#: The layer alphabet of Nemotron-H / Nemotron 3 (Megatron-Core `Symbols` in `ssm/mamba_hybrid_layer_allocation.py`).
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


class StrictModel(BaseModel):
    """Base for every config section: unknown keys and wrong types are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def check_pattern(pattern: str, field: str, num_layers: Optional[int] = None) -> str:
    """Validate a layer-pattern string; the message names the offending character and position."""
    if not pattern:
        raise ValueError(f"{field} is empty; use the symbols {sorted(LAYER_SYMBOLS)} ({LAYER_SYMBOLS})")
    for i, ch in enumerate(pattern):
        if ch not in LAYER_SYMBOLS:
            raise ValueError(
                f"{field} has {ch!r} at position {i}; allowed symbols are "
                + ", ".join(f"{k!r} ({v})" for k, v in LAYER_SYMBOLS.items())
            )
    if num_layers is not None and len(pattern) != num_layers:
        raise ValueError(f"{field} has {len(pattern)} layers but num_layers is {num_layers}")
    return pattern


@documented
class ModelConfig(StrictModel):
    """Architecture of a hybrid Mamba-2 / attention / MoE decoder (Nemotron-H, Nemotron 3)."""

    hybrid_override_pattern: str = "M*-E"  # one symbol per layer: M=Mamba-2, *=attention, E=MoE, -=dense MLP
    num_layers: int = 4  # decoder layers; must equal len(hybrid_override_pattern)
    hidden_size: int = 64  # model width (Nano 2688, Super 4096)
    vocab_size: int = 512  # tokenizer vocabulary (Nemotron 3: 131072)
    # Attention (GQA, no positional encoding in Nemotron-H/3).
    num_attention_heads: int = 4  # query heads per attention layer
    num_query_groups: int = 2  # KV heads (GQA groups)
    kv_channels: int = 16  # head dim
    # Dense MLP ('-') width; squared ReLU, no gate.
    ffn_hidden_size: int = 128
    # Mamba-2.
    mamba_num_heads: int = 4  # SSM heads
    mamba_head_dim: int = 16  # channels per SSM head
    mamba_state_dim: int = 16  # SSM state size N (Nemotron 3: 128)
    mamba_num_groups: int = 2  # B/C groups (Nemotron 3: 8)
    mamba_conv_kernel: int = 4  # causal depthwise conv width
    mamba_chunk_size: int = 8  # SSD scan chunk length (GPU kernels: 128 or 256)
    # MoE ('E' layers).
    num_moe_experts: int = 4  # routed experts per MoE layer
    moe_router_topk: int = 2  # experts per token
    moe_ffn_hidden_size: int = 64  # width of each routed expert
    moe_shared_expert_intermediate_size: Optional[int] = 64  # None: no shared expert
    moe_latent_size: Optional[int] = None  # LatentMoE: dispatch in this dimension (Super: 1024)
    moe_router_topk_scaling_factor: float = 2.5  # top-k weights normalized then scaled (Nano 2.5, Super 5.0)
    moe_router_bias_update_rate: float = 1e-3  # aux-loss-free expert-bias update rate
    moe_aux_loss_coeff: float = 1e-4  # sequence-level aux loss
    # Multi-token prediction: one shared block with its own pattern, applied mtp_num_layers times.
    mtp_num_layers: int = 0  # MTP depths D (0: no MTP; Super: 2)
    mtp_hybrid_override_pattern: Optional[str] = None  # the shared block's layer pattern (Super: "*E")
    mtp_loss_scaling_factor: float = 0.3  # weight of the mean MTP loss in the training loss
    # Numerics / init.
    layernorm_epsilon: float = 1e-5  # RMSNorm epsilon
    init_method_std: float = 0.02  # std of the normal weight init
    max_position_embeddings: int = 4096  # informational: Nemotron-H uses no positional encoding

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        check_pattern(self.hybrid_override_pattern, "model.hybrid_override_pattern", self.num_layers)
        if self.mtp_num_layers < 0:
            raise ValueError("model.mtp_num_layers must be >= 0")
        if self.mtp_num_layers > 0:
            if not self.mtp_hybrid_override_pattern:
                raise ValueError("model.mtp_num_layers > 0 needs model.mtp_hybrid_override_pattern (Super: '*E')")
            check_pattern(self.mtp_hybrid_override_pattern, "model.mtp_hybrid_override_pattern")
        for name in ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "vocab_size",
                     "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.mamba_num_heads % self.mamba_num_groups:
            raise ValueError(
                f"model.mamba_num_heads ({self.mamba_num_heads}) must be a multiple of "
                f"model.mamba_num_groups ({self.mamba_num_groups})"
            )
        if "E" in self.all_symbols:
            if self.num_moe_experts <= 0:
                raise ValueError("the pattern has MoE ('E') layers but model.num_moe_experts is 0")
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                raise ValueError(
                    f"model.moe_router_topk ({self.moe_router_topk}) must be in 1..num_moe_experts "
                    f"({self.num_moe_experts})"
                )
        return self

    @property
    def all_symbols(self) -> str:
        return self.hybrid_override_pattern + (self.mtp_hybrid_override_pattern or "" if self.mtp_num_layers else "")

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim
