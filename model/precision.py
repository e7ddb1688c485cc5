"""Precision policy: which number format each linear of the model computes in.

The defaults follow the NVFP4 recipe of Nemotron 3 (shared/reference/nemotron3.md): NVFP4 linears, with BF16
carve-outs (first/last layers, latent projections, MTP, attention projections, embeddings/head) and the Mamba
output projection in MXFP8. Megatron names are kept where they exist.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Format = Literal["fp32", "bf16", "mxfp8", "nvfp4"]


class PrecisionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Default format of every linear not carved out below. "bf16"/"fp32" disables low precision entirely.
    recipe: Format = "bf16"
    # Megatron: keep the first/last N layers in BF16 when first_last_layers_bf16 is set.
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = Field(0, ge=0)
    num_layers_at_end_in_bf16: int = Field(0, ge=0)
    # Module-kind carve-outs of the published recipe.
    attention_projections: Format = "bf16"  # linear_qkv, linear_proj
    latent_projections: Format = "bf16"  # fc1_latent_proj, fc2_latent_proj
    mamba_out_proj: Format = "mxfp8"  # Super: avoids underflow of the Mamba output projection
    mtp: Format = "bf16"
    # Per-module overrides by glob on the parameter-free module name, e.g. {"decoder.layers.3.mlp.*": "bf16"}.
    overrides: dict[str, Format] = Field(default_factory=dict)
    # NVFP4 recipe switches (Transformer Engine NVFP4BlockScaling names).
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    # Telemetry (flush-to-zero, saturation, relative error per layer and role) every N steps; 0 = off.
    telemetry_interval: int = Field(0, ge=0)
