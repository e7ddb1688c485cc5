"""ModuleSpecs of the hybrid stack, one set for both backends.

`te`: Transformer Engine layers + Megatron-Core's MambaMixer on mamba-ssm (GPU production path).
`local`: Megatron-Core local layers + the CPU stand-ins of model/layers.py (tests, quickstart, laptops).
The layer classes (MambaLayer, TransformerLayer, MLPLayer, MoETransformerLayer, MoELayer, TopKRouter,
SelfAttention, MLP, SharedExpertMLP) are Megatron-Core's on both; only the leaves differ, and they carry the
same parameter names (fused `layer_norm_weight` pre-norms, `pre_mlp_layernorm` for MoE layers).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from .layers import CPUMambaMixer, LatentMoELayer, LayerNormColumnParallelLinear

Backend = Literal["te", "local"]


@functools.lru_cache(maxsize=None)
def available_backend() -> Backend:
    """`te` when CUDA, Transformer Engine and mamba-ssm are all importable, else `local`."""
    if not torch.cuda.is_available():
        return "local"
    try:
        import mamba_ssm  # noqa: F401
        import transformer_engine  # noqa: F401
    except ImportError:
        return "local"
    return "te"


@dataclass
class HybridStackSubmodules(MambaStackSubmodules):
    final_norm: Union[ModuleSpec, type, None] = None


class HybridMLPLayer(MLPLayer):
    """Megatron-Core's MLPLayer, also taking the chunk's `vp_stage` (upstream's signature drops it,
    ssm/mlp_layer.py:16), which TransformerLayer needs to place the layer under interleaved pipelining."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection=None, vp_stage: Optional[int] = None):
        TransformerLayer.__init__(self, config=config, submodules=submodules, layer_number=layer_number,
                                  hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)


class HybridStack(MambaStack):
    """Megatron-Core's MambaStack with the final norm taken from the spec (upstream hard-codes TENorm,
    ssm/mamba_block.py:161), for the MTP block without the pipeline split of the main stack, and with virtual
    pipeline stages (upstream asserts vpp is None, ssm/mamba_block.py:177).

    Under interleaved pipelining one stack is one model chunk, `vp_stage`. Its layers are the chunk's slice of
    the pattern (model.pattern.pipeline_chunks, which follows Megatron's placement); Mamba layers get their global
    layer_number from here, the attention/MLP/MoE TransformerLayers compute it themselves from config + vp_stage
    (transformer_layer.py:280), so the spec hands them the vp_stage too. The two must agree, and are checked to.
    """

    def __init__(self, config, submodules: HybridStackSubmodules, *args, post_layer_norm: bool = True,
                 split_over_pipeline: bool = True, vp_stage: Optional[int] = None, **kwargs):
        self._split_over_pipeline = split_over_pipeline
        self._vp_stage = vp_stage
        if vp_stage is not None:
            if not split_over_pipeline:
                raise ValueError("vp_stage is for the main decoder stack, not an unsplit (MTP) stack")
            submodules = dataclasses.replace(submodules, **{
                name: _with_params(getattr(submodules, name), vp_stage=vp_stage)
                for name in ("attention_layer", "mlp_layer", "moe_layer")})
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.vp_stage = vp_stage
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(submodules.final_norm, config=self.config,
                                           hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)

    def _select_layers_for_pipeline_parallel(self, layer_type_list):
        if not self._split_over_pipeline:
            return 0, layer_type_list
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        from .pattern import pipeline_chunks

        cfg = self.config
        vpp = cfg.virtual_pipeline_model_parallel_size
        if cfg.pipeline_model_parallel_layout is not None:
            raise ValueError("pipeline_model_parallel_layout is not supported by the hybrid stack; place layers with "
                             "pp / vpp / num_layers_in_{first,last}_pipeline_stage")
        if cfg.account_for_embedding_in_pipeline_split or cfg.account_for_loss_in_pipeline_split:
            raise ValueError("account_for_{embedding,loss}_in_pipeline_split are not supported by the hybrid stack")
        if vpp is not None and self._vp_stage is None:
            raise ValueError(f"virtual_pipeline_model_parallel_size={vpp}: build each model chunk with its vp_stage")
        pp_rank, pp_size = self.pp_group.rank(), self.pp_group.size()
        vp = self._vp_stage or 0
        (chunk,) = [c for c in pipeline_chunks("".join(layer_type_list), pp_size, vpp,
                                               cfg.num_layers_in_first_pipeline_stage,
                                               cfg.num_layers_in_last_pipeline_stage)
                    if c.pp_rank == pp_rank and c.vp_stage == vp]
        mcore_offset = get_transformer_layer_offset(cfg, self._vp_stage, pp_rank)
        if mcore_offset != chunk.offset:
            raise RuntimeError(f"hybrid stack chunk (pp rank {pp_rank}, vp stage {vp}) starts at layer {chunk.offset} "
                               f"but Megatron-Core places its TransformerLayers from {mcore_offset}")
        return chunk.offset, list(chunk.pattern)


def _with_params(spec, **params):
    if not isinstance(spec, ModuleSpec):
        spec = ModuleSpec(module=spec)
    return dataclasses.replace(spec, params={**spec.params, **params})


def _leaves(backend: Backend) -> dict:
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )
        from megatron.core.ssm.mamba_mixer import MambaMixer

        return dict(ln_linear=TELayerNormColumnParallelLinear, row_linear=TERowParallelLinear,
                    core_attention=TEDotProductAttention, norm=TENorm, mixer=MambaMixer, use_te=True)
    from .mcore_compat import TorchNorm

    return dict(ln_linear=LayerNormColumnParallelLinear, row_linear=RowParallelLinear,
                core_attention=DotProductAttention, norm=TorchNorm, mixer=CPUMambaMixer, use_te=False)


def hybrid_stack_spec(backend: Backend, num_moe_experts: int, mamba_chunk_size: int, mamba_conv_kernel: int,
                      split_over_pipeline: bool = True, post_layer_norm: bool = True,
                      vp_stage: Optional[int] = None) -> ModuleSpec:
    """The stack spec for one pattern (the main decoder, or the MTP block's inner stack); `vp_stage`: the model
    chunk's virtual pipeline stage under interleaved pipelining."""
    lv = _leaves(backend)
    moe_spec = get_moe_module_spec(use_te=lv["use_te"], num_experts=max(num_moe_experts, 1),
                                   moe_grouped_gemm=lv["use_te"])
    moe_spec.module = LatentMoELayer
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
    mlp_layer = ModuleSpec(
        module=HybridMLPLayer,
        submodules=TransformerLayerSubmodules(
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=lv["ln_linear"], linear_fc2=lv["row_linear"])),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    moe_layer = ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(pre_mlp_layernorm=lv["norm"], mlp=moe_spec, mlp_bda=get_bias_dropout_add),
    )
    return ModuleSpec(
        module=HybridStack,
        params=dict(split_over_pipeline=split_over_pipeline, post_layer_norm=post_layer_norm, vp_stage=vp_stage),
        submodules=HybridStackSubmodules(mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer,
                                         moe_layer=moe_layer, final_norm=lv["norm"]),
    )


def norm_spec(backend: Backend) -> type:
    return _leaves(backend)["norm"]


def column_linear_spec(backend: Backend) -> type:
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        return TEColumnParallelLinear
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    return ColumnParallelLinear


def resolve_backend(backend: Optional[str]) -> Backend:
    if backend is None:
        return available_backend()
    if backend not in ("te", "local"):
        raise ValueError(f"backend must be 'te' or 'local', got {backend!r}")
    if backend == "te" and available_backend() != "te":
        raise ValueError("backend 'te' needs CUDA, transformer-engine and mamba-ssm; use 'local' on this machine")
    return backend
