"""ModuleSpecs of the hybrid stack for Megatron-Core's `models/hybrid/` HybridModel, one set for every backend.

`te`: Transformer Engine layers + Megatron-Core's MambaMixer on mamba-ssm (GPU production path).
`local`: Megatron-Core local layers on CUDA, MambaMixer on mamba-ssm's Triton kernels when they import.
`cpu`: Megatron-Core local layers + the CPU stand-ins of model/layers.py (tests, quickstart, laptops).
The layer classes (MambaLayer, TransformerLayer, MLPLayer, MoETransformerLayer, MoELayer, TopKRouter,
SelfAttention, MLP, SharedExpertMLP, MultiTokenPredictionBlock/Layer) are Megatron-Core's on all; only the leaves
differ, and they carry the same parameter names (fused `layer_norm_weight` pre-norms, `pre_mlp_layernorm` for MoE
layers), so a checkpoint moves between backends. Upstream's shipped hybrid specs
(models/hybrid/hybrid_layer_specs.py) are TE-only, hence these.
"""
from __future__ import annotations

import functools
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.models.hybrid.hybrid_block import HybridStack as _UpstreamHybridStack
from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from .adapt.mamba_mixer import CPUMambaMixer
from .backend import Backend
from .layers import LatentMoELayer, LayerNormColumnParallelLinear, TorchNorm


class HybridStack(_UpstreamHybridStack):
    """Megatron-Core's HybridStack with the final norm taken from the spec: upstream builds TENorm unconditionally
    (models/hybrid/hybrid_block.py:232 in 0.19.2), which raises without Transformer Engine. Everything else is
    upstream's (layer selection by `|` segment, per-layer FP8/FP4 contexts, sharded checkpoint keys)."""

    def __init__(self, config, submodules: HybridStackSubmodules, *args, final_norm=None,
                 post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = final_norm(config=self.config, hidden_size=self.config.hidden_size,
                                         eps=self.config.layernorm_epsilon)


def _leaves(backend: Backend) -> dict:
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )
        from megatron.core.ssm.mamba_mixer import MambaMixer

        return dict(ln_linear=TELayerNormColumnParallelLinear, row_linear=TERowParallelLinear,
                    column_linear=TEColumnParallelLinear, core_attention=TEDotProductAttention, norm=TENorm,
                    mixer=MambaMixer, use_te=True)
    mixer = CPUMambaMixer
    if backend == "local":
        from .backend import resolve_backend

        if resolve_backend("local").mamba_kernels == "mamba-ssm":
            from .adapt.mamba_mixer import LocalMambaMixer

            mixer = LocalMambaMixer
    return dict(ln_linear=LayerNormColumnParallelLinear, row_linear=RowParallelLinear,
                column_linear=ColumnParallelLinear, core_attention=DotProductAttention, norm=TorchNorm,
                mixer=mixer, use_te=False)


def hybrid_stack_spec(backend: Backend, num_moe_experts: int, mamba_chunk_size: int,
                      mamba_conv_kernel: int) -> ModuleSpec:
    """The stack spec HybridModel builds its decoder from; its `mtp_block_spec` builds the MTP block, whose inner
    stack (one per pattern after `/`) reuses these layer specs (multi_token_prediction.py:1018)."""
    lv = _leaves(backend)
    moe = get_moe_module_spec(use_te=lv["use_te"], num_experts=max(num_moe_experts, 1),
                              moe_grouped_gemm=lv["use_te"])
    # 0.19 returns functools.partial(MoELayer, submodules=...) (moe_module_specs.py:87): same submodules, our class.
    moe = functools.partial(LatentMoELayer, *moe.args, **moe.keywords)
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            mixer=ModuleSpec(module=lv["mixer"], params=dict(chunk_size=mamba_chunk_size, d_conv=mamba_conv_kernel),
                             submodules=MambaMixerSubmodules(in_proj=lv["ln_linear"], out_proj=lv["row_linear"])),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=lv["ln_linear"], core_attention=lv["core_attention"],
                                                   linear_proj=lv["row_linear"]),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp = functools.partial(MLP.as_mlp_submodule,
                            submodules=MLPSubmodules(linear_fc1=lv["ln_linear"], linear_fc2=lv["row_linear"]))
    mlp_layer = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(mlp=mlp, mlp_bda=get_bias_dropout_add))
    moe_layer = ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(pre_mlp_layernorm=lv["norm"], mlp=moe, mlp_bda=get_bias_dropout_add),
    )
    mtp_block = ModuleSpec(
        module=MultiTokenPredictionBlock,
        submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[ModuleSpec(
            module=MultiTokenPredictionLayer,
            submodules=MultiTokenPredictionLayerSubmodules(enorm=lv["norm"], hnorm=lv["norm"],
                                                           eh_proj=lv["column_linear"], mtp_model_layer=None,
                                                           layer_norm=lv["norm"]),
        )]),
    )
    return ModuleSpec(
        module=HybridStack,
        params=dict(final_norm=lv["norm"]),
        submodules=HybridStackSubmodules(mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer,
                                         moe_layer=moe_layer, mtp_block_spec=mtp_block),
    )


def norm_class(backend: Backend) -> type:
    return _leaves(backend)["norm"]


def hybrid_layer_pattern(main: str, chunks: Optional[list[str]] = None, mtp: Optional[str] = None,
                         mtp_depths: int = 0) -> str:
    """Upstream's unified pattern: pipeline segments joined by `|` (segment v*pp + r is pipeline rank r's virtual
    stage v, hybrid_layer_allocation.py:460), then `/<mtp pattern>` once per MTP depth."""
    body = "|".join(chunks) if chunks and len(chunks) > 1 else main
    return body + "".join(f"/{mtp}" for _ in range(mtp_depths if mtp else 0))
