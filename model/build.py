"""Build the hybrid model from Megatron-Core: `build_model(cfg)` is the one entry point the trainer, the
parallelism layer and the HF export call.

The model is Megatron-Core's HybridModel (models/hybrid/: embedding, HybridStack over a `|`-segmented
`hybrid_layer_pattern`, the shared-weight MTP block for `/` segments, output layer, `compute_language_model_loss`)
built from the specs of model/specs.py. Foldtron adds nothing to the module tree; every patch it needs on
Megatron-Core lives in model/adapt/.
Process groups come from `megatron.core.parallel_state` (initialised by the caller; `init_single_process()` does
it for one CPU process).

MoE bookkeeping the training loop must know about (Megatron-Core 0.19's real mechanisms):
- Sequence aux loss (`moe_router_load_balancing_type="seq_aux_loss"`, coeff `moe_aux_loss_coeff`): the router
  attaches it to the activations with `MoEAuxLossAutoScaler`, so it is in the gradient without appearing in the
  returned loss. Its scale follows the main loss: call `MoEAuxLossAutoScaler.set_loss_scale(scale)` (and
  `MTPLossAutoScaler.set_loss_scale`) when the loss is scaled/averaged over micro-batches, as Megatron's
  schedules do. Values for logging: `megatron.core.transformer.moe.moe_utils.track_moe_metrics` reads
  `get_moe_layer_wise_logging_tracker()`; MTP losses: `MTPLossLoggingHelper.track_mtp_metrics`.
- Expert bias (aux-loss-free balancing, `moe_router_enable_expert_bias`): each router counts tokens per
  expert in `local_tokens_per_expert` during forward; once per optimizer step `finalize_model_grads`
  (megatron/core/distributed/finalize_model_grads.py:476) all-reduces the counts over TPxCPxDP, moves each
  bias by rate * sign(mean - count) and zeroes the counts. A loop that does not call `finalize_model_grads`
  calls `update_expert_bias(model_chunks)` below once per step instead.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .config import ModelConfig
from .pattern import parse_pattern, pipeline_chunks


def _mcore(backend: Optional[str] = None):
    """Apply the Megatron-Core adaptation layer for this backend before any Megatron-Core module is built."""
    from . import adapt

    adapt.apply(backend)


def _te_backend() -> bool:
    from . import adapt

    return adapt.active_backend() == "te"


def _on_cpu() -> bool:
    from . import adapt

    return adapt.current_device().type == "cpu"


def transformer_config(cfg: ModelConfig, **parallel_kwargs: Any):
    """Megatron-Core TransformerConfig for `cfg`; `parallel_kwargs` are TransformerConfig/ModelParallelConfig
    fields (tensor_model_parallel_size, expert_model_parallel_size, sequence_parallel, bf16, params_dtype, ...)."""
    _mcore()
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    has_moe = "E" in cfg.all_symbols
    kw: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        # Nemotron-H / 3: pre-RMSNorm, no biases, no dropout, squared ReLU without a gate, untied head.
        normalization="RMSNorm",
        layernorm_epsilon=cfg.layernorm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=False,
        activation_func=squared_relu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        # Mamba-2.
        mamba_state_dim=cfg.mamba_state_dim,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_num_heads=cfg.mamba_num_heads,
        # The CPU path keeps activations like the fused GPU kernel; on GPU this picks mamba-ssm's fused path.
        use_mamba_mem_eff_path=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # Megatron-Core creates parameters on the CPU only for the cpu backend; on GPUs on the current device.
        use_cpu_initialization=_on_cpu(),
    )
    if has_moe:
        kw.update(
            num_moe_experts=cfg.num_moe_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
            moe_latent_size=cfg.moe_latent_size,
            # Sigmoid scores + expert bias for selection; selected scores normalised to sum 1, then scaled.
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=cfg.moe_router_bias_update_rate,
            moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
            moe_router_pre_softmax=False,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="seq_aux_loss",
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            # TEGroupedMLP on the te backend; the local spec builds SequentialMLP, so say so (audit: "config says
            # grouped GEMM while the local spec builds SequentialMLP").
            moe_grouped_gemm=_te_backend(),
            moe_shared_expert_overlap=False,
        )
    if cfg.mtp_num_layers:
        # One shared-weight block applied at every depth (Nemotron 3 Super's `*E`): mtp_use_repeated_layer.
        kw.update(mtp_num_layers=cfg.mtp_num_layers, mtp_loss_scaling_factor=cfg.mtp_loss_scaling_factor,
                  mtp_use_repeated_layer=True)
    kw.update(parallel_kwargs)
    return TransformerConfig(**kw)


def init_single_process(seed: int = 1234, **parallel_sizes: int) -> None:
    """One-process gloo world + Megatron-Core parallel state (tests, benchmarks, model-info on CPU)."""
    _mcore()
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        # An in-memory store: no TCP port, and nothing written to os.environ. Exporting MASTER_PORT here once leaked
        # this process's listening port into every child it later spawned (torchrun-style ranks, sbatch jobs), whose
        # own stores then failed with EADDRINUSE.
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(**parallel_sizes)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def preload() -> None:
    """Import the Megatron-Core modules the model is built from, outside any meta-device context.

    Megatron-Core's MTPLossAutoScaler holds a class-level `torch.tensor(1.0)` created at import time
    (transformer/multi_token_prediction.py, `MTPLossAutoScaler.main_loss_backward_scale`); a first import under
    `torch.device("meta")` would leave it on meta for the rest of the process and every later MTP backward fails."""
    _mcore()
    import megatron.core.models.hybrid.hybrid_model  # noqa: F401
    import megatron.core.transformer.multi_token_prediction  # noqa: F401


def layer_pattern(cfg: ModelConfig, tc) -> str:
    """The unified `hybrid_layer_pattern` for Megatron-Core's HybridModel: Foldtron's placement of the layers over
    pipeline ranks and virtual stages (model.pattern.pipeline_chunks, the placement Megatron gives TransformerLayers,
    so checkpoints keep their layer numbers) written as `|` segments, then one `/<mtp pattern>` per MTP depth."""
    from megatron.core import parallel_state

    from .specs import hybrid_layer_pattern

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    chunks = pipeline_chunks(cfg.hybrid_override_pattern, pp, tc.virtual_pipeline_model_parallel_size,
                             tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage)
    return hybrid_layer_pattern(cfg.hybrid_override_pattern, [c.pattern for c in chunks] if pp > 1 else None,
                                cfg.mtp_hybrid_override_pattern, cfg.mtp_num_layers)


def build_model(cfg: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None, precision: Any = None, backend: Optional[str] = None,
                config=None) -> torch.nn.Module:
    """The hybrid model for this pipeline stage: Megatron-Core's `HybridModel` built from model/specs.py.

    forward(input_ids [b,s], position_ids [b,s], attention_mask (None: causal), labels=None, loss_mask=None, ...)
    returns the per-token loss [b, s] when labels are given (main-model loss; MTP losses ride in the gradient
    through MTPLossAutoScaler), logits [b, s, vocab/tp] otherwise. Parallel state must be initialised
    (parallel_state.initialize_model_parallel; `init_single_process()` for one CPU process).
    `config`: a TransformerConfig to use instead of `transformer_config(cfg)` (for parallel settings).
    MTP (cfg.mtp_num_layers > 0) is one shared-weight block (`mtp_use_repeated_layer`) that HybridModel builds on
    the chunk Megatron-Core places it on, the last pipeline stage's last virtual chunk (the one with
    post_process=True); under pp > 1 that chunk also holds an embedding copy, kept equal to the first stage's by
    Megatron's embedding group.
    `precision`: a model.precision.PrecisionConfig; only high-precision recipes (fp32/bf16) are built here,
    low-precision GEMMs are a layer on top (model.adapt.lowp.apply_precision; pretrain/train.py does both).
    `backend`: `auto` | `te` | `local` | `cpu` (model.backend).
    """
    _mcore(backend)
    import copy

    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    from .backend import resolve_backend
    from .specs import hybrid_stack_spec

    if precision is not None and getattr(precision, "recipe", "bf16") not in ("bf16", "fp32"):
        raise ValueError(f"precision recipe {precision.recipe!r} is applied by the precision layer, not build_model; "
                         "build with a bf16/fp32 policy and wrap it with model.adapt.lowp.apply_precision")
    from . import adapt

    be = resolve_backend(backend or adapt.active_backend()).name
    tc = config if config is not None else transformer_config(cfg)
    parse_pattern(cfg.hybrid_override_pattern, cfg.num_layers)
    if cfg.mtp_num_layers:
        parse_pattern(cfg.mtp_hybrid_override_pattern, field="mtp_hybrid_override_pattern")
    vpp = tc.virtual_pipeline_model_parallel_size
    if (vpp is not None) != (vp_stage is not None):
        raise ValueError(f"vp_stage={vp_stage} with virtual_pipeline_model_parallel_size={vpp}: under interleaved "
                         "pipelining build one model chunk per virtual stage (vp_stage 0..vpp-1), otherwise none")
    if vp_stage is not None and not 0 <= vp_stage < vpp:
        raise ValueError(f"vp_stage={vp_stage} is outside 0..{vpp - 1} (virtual_pipeline_model_parallel_size={vpp})")
    if tc.pipeline_model_parallel_layout is not None:
        raise ValueError("pipeline_model_parallel_layout is not supported for the hybrid model; place layers with "
                         "pp / vpp / num_layers_in_{first,last}_pipeline_stage")
    _check_mtp_placement(cfg, tc, post_process, vp_stage)
    pattern = layer_pattern(cfg, tc)
    if "|" in pattern:
        # The uneven first/last stage sizes are written into the `|` segments; HybridModel refuses both at once
        # (hybrid_layer_allocation.py:377).
        tc = copy.copy(tc)
        tc.num_layers_in_first_pipeline_stage = None
        tc.num_layers_in_last_pipeline_stage = None
    return HybridModel(
        config=tc,
        hybrid_stack_spec=hybrid_stack_spec(be, cfg.num_moe_experts, cfg.mamba_chunk_size, cfg.mamba_conv_kernel),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        hybrid_layer_pattern=pattern,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        vp_stage=vp_stage,
    )


def _check_mtp_placement(cfg: ModelConfig, tc, post_process: bool, vp_stage: Optional[int]) -> None:
    """MTP runs where Megatron-Core places it (`mtp_on_this_rank`: the last virtual chunk of the last pipeline
    stage), which must be the chunk built with the output layer (the MTP losses use it)."""
    # Megatron-Core's embedding sync and MTP loss scaling read the TransformerConfig's mtp_num_layers.
    if (tc.mtp_num_layers or 0) != cfg.mtp_num_layers:
        raise ValueError(f"the TransformerConfig has mtp_num_layers={tc.mtp_num_layers} but the model config "
                         f"{cfg.mtp_num_layers}: build the config with transformer_config(cfg, ...)")
    if not cfg.mtp_num_layers:
        return
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank

    here = mtp_on_this_rank(layout=None, mtp_num_layers=tc.mtp_num_layers, ignore_virtual=False, vp_stage=vp_stage)
    if here != post_process:
        raise ValueError(f"post_process={post_process} but Megatron-Core places MTP {'' if here else 'not '}on this "
                         f"chunk (vp_stage={vp_stage}): MTP runs on the last pipeline stage's last virtual chunk, "
                         "which must be built with post_process=True (and no other chunk)")


def update_expert_bias(model_chunks: Sequence[torch.nn.Module], config=None) -> None:
    """Aux-loss-free expert-bias step for loops that do not call Megatron's `finalize_model_grads` (which does
    exactly this): all-reduce token counts over TPxCPxDP, bias += rate * sign(mean - count), zero the counts."""
    from .adapt.private import update_router_expert_bias

    chunks = list(model_chunks)
    cfg = config if config is not None else chunks[0].config
    if not cfg.moe_router_enable_expert_bias:
        return
    update_router_expert_bias(chunks, cfg)
    for chunk in chunks:
        for module in chunk.modules():
            if getattr(module, "local_tokens_per_expert", None) is not None:
                module.local_tokens_per_expert.zero_()
