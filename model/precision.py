"""Precision policy: which number format each linear of the model computes in.

The defaults follow the NVFP4 recipe of Nemotron 3 (shared/reference/nemotron3.md): NVFP4 linears, with BF16
carve-outs (first/last layers, latent projections, MTP, attention projections, embeddings/head) and the Mamba
output projection in MXFP8. Megatron names are kept where they exist.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .fielddocs import documented

#: fp8: Hopper's per-tensor / blockwise-scaled FP8 (TE Float8CurrentScaling / Float8BlockScaling), TE only;
#: mxfp8 / nvfp4: Blackwell block-scaled formats (TE MXFP8BlockScaling / NVFP4BlockScaling), emulated elsewhere.
Format = Literal["fp32", "bf16", "fp8", "mxfp8", "nvfp4"]


@documented
class PrecisionConfig(BaseModel):
    """Numerics of a stage: the recipe (fp32 / bf16 / mxfp8 / nvfp4, emulated or through Transformer Engine) and
    which modules keep BF16."""

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
    # RHT signs for the emulated recipe: None = TE's fixed wgrad sign vector (bit-compatible), an int = seeded.
    rht_seed: Optional[int] = None
    # Telemetry (flush-to-zero, saturation, relative error per layer and role) every N steps; 0 = off.
    telemetry_interval: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "PrecisionConfig":
        if not self.first_last_layers_bf16 and (self.num_layers_at_start_in_bf16 or self.num_layers_at_end_in_bf16):
            raise ValueError(
                "precision.num_layers_at_start_in_bf16/num_layers_at_end_in_bf16 only act when "
                "precision.first_last_layers_bf16 is true (Megatron semantics); set it, or set the counts to 0"
            )
        for pattern in self.overrides:
            if not pattern:
                raise ValueError("precision.overrides has an empty pattern")
        return self


#: Module roles by the last component of their Megatron-Core name.
ROLES = ("linear_qkv", "linear_proj", "in_proj", "out_proj", "linear_fc1", "linear_fc2", "fc1_latent_proj",
         "fc2_latent_proj", "eh_proj", "output_layer", "embedding", "router")
LOW_PRECISION: tuple[Format, ...] = ("fp8", "mxfp8", "nvfp4")
EMULATED: tuple[Format, ...] = ("mxfp8", "nvfp4")  # kernels/ reproduces these bit-exactly; fp8 runs through TE


def role_of(name: str) -> str:
    """Role of a module from its dotted name: ``decoder.layers.3.mixer.out_proj`` -> ``out_proj``."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "word_embeddings" or leaf == "embedding":
        return "embedding"
    if leaf not in ROLES:
        raise ValueError(f"module {name!r} has no precision role; known roles (last name component): {ROLES}")
    return leaf


def linear_format(cfg: PrecisionConfig, *, num_layers: int, layer_index: Optional[int], role: str,
                  name: str = "", is_mtp: bool = False) -> Format:
    """The number format one linear computes in. Pure: the model, `model-info` and the tests all call this.

    ``layer_index`` is the 0-based global decoder layer (Megatron's ``layer_no`` in ``get_fp4_context``), None for
    modules outside the decoder (head, MTP). Precedence, first match wins:
      1. embeddings stay BF16 and the MoE router FP32 (never quantized; overrides do not apply);
      2. ``overrides``: the last glob that matches ``name``;
      3. a BF16/FP32 ``recipe`` applies to every linear;
      4. the output head is BF16; MTP modules use ``mtp``;
      5. the first/last N decoder layers are BF16 when ``first_last_layers_bf16``;
      6. module kinds: attention QKV/out -> ``attention_projections``, latent projections ->
         ``latent_projections``, the Mamba out_proj -> ``mamba_out_proj``;
      7. everything else -> ``recipe``.
    """
    if role not in ROLES:
        raise ValueError(f"unknown module role {role!r}; known roles: {ROLES}")
    if role == "embedding":
        return "bf16"
    if role == "router":
        return "fp32"
    chosen = None
    for pattern, fmt in cfg.overrides.items():
        if name and fnmatch.fnmatchcase(name, pattern):
            chosen = fmt
    if chosen is not None:
        return chosen
    if cfg.recipe not in LOW_PRECISION:
        return cfg.recipe
    if role == "output_layer":
        return "bf16"
    if is_mtp:
        return cfg.mtp
    if layer_index is not None and cfg.first_last_layers_bf16:
        start, end = cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16
        if start + end > num_layers:
            raise ValueError(f"precision keeps {start} first + {end} last layers in BF16 but the model has "
                             f"only {num_layers} layers")
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"layer_index {layer_index} is outside 0..{num_layers - 1}")
        if layer_index < start or layer_index >= num_layers - end:
            return "bf16"
    if role in ("linear_qkv", "linear_proj"):
        return cfg.attention_projections
    if role in ("fc1_latent_proj", "fc2_latent_proj"):
        return cfg.latent_projections
    if role == "out_proj":
        return cfg.mamba_out_proj
    return cfg.recipe


def super_policy(**overrides: Any) -> PrecisionConfig:
    """Nemotron 3 Super's published NVFP4 policy (tech report table 3; shared/reference/nemotron3.md):
    last 15% of layers (14 of 88) BF16, latent projections, MTP and attention QKV/out BF16, embeddings and head
    BF16, Mamba out_proj MXFP8, NVFP4 elsewhere with RHT, SR on gradients and 2-D weight scaling."""
    fields: dict[str, Any] = dict(recipe="nvfp4", first_last_layers_bf16=True, num_layers_at_start_in_bf16=0,
                                  num_layers_at_end_in_bf16=14, attention_projections="bf16",
                                  latent_projections="bf16", mamba_out_proj="mxfp8", mtp="bf16")
    fields.update(overrides)
    return PrecisionConfig(**fields)


class LinearPrecision(NamedTuple):
    name: str  # Megatron-Core module name, e.g. decoder.layers.3.mixer.in_proj
    role: str
    layer_index: Optional[int]
    fmt: Format


def linear_precisions(model_cfg, cfg: PrecisionConfig) -> list[LinearPrecision]:
    """Every linear of a model config with its format, without building the model (for ``model-info``).

    Names follow the module tree Megatron-Core builds for the hybrid stack (Mamba mixer under ``mixer``, attention
    under ``self_attention``, MLP/MoE under ``mlp``; experts listed once as ``local_experts.*``).
    """
    from .config import ModelConfig  # local: keeps this module importable on its own

    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"linear_precisions needs a ModelConfig, got {type(model_cfg).__name__}")
    n = model_cfg.num_layers

    def block(sym: str) -> list[str]:
        if sym == "M":
            return ["mixer.in_proj", "mixer.out_proj"]
        if sym == "*":
            return ["self_attention.linear_qkv", "self_attention.linear_proj"]
        if sym == "-":
            return ["mlp.linear_fc1", "mlp.linear_fc2"]
        names = ["mlp.router"]
        if model_cfg.moe_latent_size:
            names += ["mlp.fc1_latent_proj", "mlp.fc2_latent_proj"]
        names += ["mlp.experts.local_experts.*.linear_fc1", "mlp.experts.local_experts.*.linear_fc2"]
        if model_cfg.moe_shared_expert_intermediate_size:
            names += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
        return names

    out = [LinearPrecision("embedding.word_embeddings", "embedding", None, "bf16")]
    for i, sym in enumerate(model_cfg.hybrid_override_pattern):
        for leaf in block(sym):
            name = f"decoder.layers.{i}.{leaf}"
            role = role_of(name)
            out.append(LinearPrecision(name, role, i, linear_format(cfg, num_layers=n, layer_index=i, role=role,
                                                                    name=name)))
    if model_cfg.mtp_num_layers:
        name = "mtp.layers.0.eh_proj"  # one block, shared by every MTP depth
        out.append(LinearPrecision(name, "eh_proj", None, linear_format(cfg, num_layers=n, layer_index=None,
                                                                        role="eh_proj", name=name, is_mtp=True)))
        for j, sym in enumerate(model_cfg.mtp_hybrid_override_pattern or ""):
            for leaf in block(sym):
                name = f"mtp.layers.0.mtp_model_layer.layers.{j}.{leaf}"
                role = role_of(name)
                out.append(LinearPrecision(name, role, None, linear_format(cfg, num_layers=n, layer_index=None,
                                                                           role=role, name=name, is_mtp=True)))
    out.append(LinearPrecision("output_layer", "output_layer", None,
                               linear_format(cfg, num_layers=n, layer_index=None, role="output_layer",
                                             name="output_layer")))
    return out


def te_recipe_kwargs(cfg: PrecisionConfig, fmt: Format) -> dict[str, Any]:
    """Keyword arguments of the Transformer Engine recipe for ``fmt`` (``NVFP4BlockScaling`` /
    ``MXFP8BlockScaling``), for the TE + Blackwell path; the emulated path reads the same switches."""
    if fmt == "nvfp4":
        return dict(disable_rht=cfg.disable_rht, disable_stochastic_rounding=cfg.disable_stochastic_rounding,
                    disable_2d_quantization=cfg.disable_2d_quantization)
    if fmt == "mxfp8":
        return {}
    raise ValueError(f"{fmt!r} has no Transformer Engine block-scaling recipe (only nvfp4 and mxfp8 do)")
