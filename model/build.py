"""Build the hybrid model from Megatron-Core: `build_model(cfg)` is the one entry point the trainer, the
parallelism layer and the HF export call.

The model is Megatron-Core's MambaModel (embedding, MambaStack with `hybrid_override_pattern`, output layer,
`compute_language_model_loss`) built from the specs of model/specs.py, plus the hybrid MTP block of model/mtp.py.
Process groups come from `megatron.core.parallel_state` (initialised by the caller; `init_single_process()` does
it for one CPU process).

MoE bookkeeping the training loop must know about (Megatron-Core 0.16.1's real mechanisms):
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
from torch import Tensor

from .config import ModelConfig
from .pattern import parse_pattern, pipeline_chunks


def _mcore():
    """Apply the CPU compatibility layer (no-op with CUDA) before any Megatron-Core module is built."""
    from . import mcore_compat

    mcore_compat.apply()


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
        use_cpu_initialization=not torch.cuda.is_available(),
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
            moe_grouped_gemm=torch.cuda.is_available(),
            moe_shared_expert_overlap=False,
        )
    if cfg.mtp_num_layers:
        kw.update(mtp_num_layers=cfg.mtp_num_layers, mtp_loss_scaling_factor=cfg.mtp_loss_scaling_factor)
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


class _ModelClass:
    """Built lazily so importing model.build does not import Megatron-Core.

    Call `get()` before entering a meta-device context: Megatron-Core's MTPLossAutoScaler holds a class-level
    `torch.tensor(1.0)` created at import time, and a first import under `torch.device("meta")` would leave it on
    meta for the rest of the process (every later MTP backward then fails with a device mismatch).
    """

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            cls.cls = _define_hybrid_model()
        return cls.cls


def _define_hybrid_model():
    from megatron.core.models.mamba.mamba_model import MambaModel
    from megatron.core.transformer.multi_token_prediction import (
        MTPLossAutoScaler,
        MTPLossLoggingHelper,
        roll_tensor,
    )

    class HybridModel(MambaModel):
        """MambaModel + the hybrid MTP block. Without MTP (or in inference) it is MambaModel unchanged.
        Under interleaved pipelining the model chunk's vp_stage rides in the stack spec (MambaModel takes none);
        `vp_stage` is set from the stack before LanguageModule's embedding setup and Float16Module read it.

        `mtp_process`: this chunk runs the MTP block (Megatron places it on the last virtual chunk of the last
        pipeline stage, `mtp_on_this_rank`). The block reads the token embedding, so a chunk that runs it without
        being the first stage holds a copy of the embedding, exactly as GPTModel does (gpt_model.py:149): Megatron's
        own machinery then keeps the copy equal to the first stage's, since `mtp_process` is what it keys on —
        LanguageModule.setup_embeddings_and_output_layer zeroes the copy, marks it `shared`/`shared_embedding` and
        all-reduces it over the embedding group (first + last stage); finalize_model_grads'
        `_allreduce_word_embedding_grads` sums the two copies' gradients every step; grad-norm clipping skips the
        `shared` copy; and the checkpoint saves it under the first stage's key as a replica (sharded_state_dict).
        """

        def __init__(self, *args, mtp_process: bool = False, scatter_embedding_sequence_parallel: bool = True,
                     **kwargs):
            # Set before MambaModel.__init__, which calls setup_embeddings_and_output_layer (and LanguageModule's
            # embedding-group logic reads `mtp_process` there).
            self.mtp_process = mtp_process
            self._scatter_embedding_sequence_parallel = scatter_embedding_sequence_parallel
            super().__init__(*args, scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
                             **kwargs)

        def setup_embeddings_and_output_layer(self) -> None:
            self.vp_stage = getattr(self.decoder, "vp_stage", None)
            if self.mtp_process and not self.pre_process:
                from megatron.core.models.common.embeddings.language_model_embedding import (
                    LanguageModelEmbedding,
                )

                # The same module the first stage builds (mamba_model.py:105), so the same key and TP sharding.
                self.embedding = LanguageModelEmbedding(
                    config=self.config, vocab_size=self.vocab_size, max_sequence_length=self.max_sequence_length,
                    position_embedding_type=self.position_embedding_type,
                    scatter_to_sequence_parallel=self._scatter_embedding_sequence_parallel,
                    tp_group=self.pg_collection.tp)
            super().setup_embeddings_and_output_layer()

        def shared_embedding_or_output_weight(self) -> Optional[Tensor]:
            """GPTModel's rule (gpt_model.py:718): on an MTP chunk the weight kept in sync across stages is the
            embedding copy, not the (untied) output layer. LanguageModule's default would hand the last stage's
            output_layer.weight to the embedding-group all-reduce, mixing it into the first stage's embedding."""
            if self.pre_process or self.mtp_process:
                return self.embedding.word_embeddings.weight
            if self.post_process:
                return self.output_layer.weight
            return None

        def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
            """The last stage's embedding copy is saved under the first stage's key as replica 1 (GPTModel's
            `tie_word_embeddings_state_dict`): a checkpoint holds one embedding whatever the pipeline layout."""
            from megatron.core.transformer.multi_token_prediction import tie_word_embeddings_state_dict
            from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

            metadata = ensure_metadata_has_dp_cp_group(metadata)
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            if self.mtp_process and not self.pre_process:
                tie_word_embeddings_state_dict(sd, self.embedding.word_embeddings.weight,
                                               f"{prefix}embedding.word_embeddings.weight", tp_group=self.tp_group,
                                               dp_cp_group=metadata["dp_cp_group"])
            return sd

        def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor],
                    decoder_input: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                    inference_context=None, runtime_gather_output: Optional[bool] = None, *,
                    loss_mask: Optional[Tensor] = None, packed_seq_params=None, **kwargs):
            mtp = self._modules.get("mtp")
            if mtp is None or inference_context is not None or labels is None:
                return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                       labels=labels, inference_context=inference_context,
                                       runtime_gather_output=runtime_gather_output,
                                       packed_seq_params=packed_seq_params, **kwargs)
            if decoder_input is None and self.pre_process:
                decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
            hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                                  packed_seq_params=packed_seq_params)
            depths = mtp.depths
            hidden = mtp(input_ids=input_ids, position_ids=position_ids, hidden_states=hidden,
                              attention_mask=attention_mask, embedding=self.embedding,
                              packed_seq_params=packed_seq_params)
            chunks = torch.chunk(hidden, 1 + depths, dim=0)
            hidden = chunks[0]
            mtp_labels = labels.clone()
            mask = torch.ones_like(mtp_labels) if loss_mask is None else loss_mask
            cp_group = self.pg_collection.cp
            for depth in range(depths):
                mtp_logits, _ = self.output_layer(chunks[depth + 1], runtime_gather_output=runtime_gather_output)
                mtp_labels, _ = roll_tensor(mtp_labels, shifts=-1, dims=-1, cp_group=cp_group,
                                            packed_seq_params=packed_seq_params)
                mask, num_tokens = roll_tensor(mask, shifts=-1, dims=-1, cp_group=cp_group,
                                               packed_seq_params=packed_seq_params)
                mtp_loss = mask * self.compute_language_model_loss(mtp_labels, mtp_logits)
                if self.training:
                    from megatron.core import parallel_state

                    MTPLossLoggingHelper.save_loss_to_tracker(
                        torch.sum(mtp_loss) / num_tokens, depth, depths,
                        avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
                scale = self.config.mtp_loss_scaling_factor / depths
                if self.config.calculate_per_token_loss:
                    hidden = MTPLossAutoScaler.apply(hidden, scale * mtp_loss)
                else:
                    hidden = MTPLossAutoScaler.apply(hidden, scale * mtp_loss / num_tokens)
            logits, _ = self.output_layer(hidden, runtime_gather_output=runtime_gather_output)
            return self.compute_language_model_loss(labels, logits)

    return HybridModel


def build_model(cfg: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None, precision: Any = None, backend: Optional[str] = None,
                config=None) -> torch.nn.Module:
    """The hybrid model for this pipeline stage, as a Megatron-Core module.

    forward(input_ids [b,s], position_ids [b,s], attention_mask (None: causal), labels=None, ...) returns the
    per-token loss [b, s] when labels are given (main-model loss; MTP losses ride in the gradient through
    MTPLossAutoScaler, as in GPTModel), logits [b, s, vocab/tp] otherwise. Parallel state must be initialised
    (parallel_state.initialize_model_parallel; `init_single_process()` for one CPU process).
    `config`: a TransformerConfig to use instead of `transformer_config(cfg)` (for parallel settings).
    MTP (cfg.mtp_num_layers > 0) is built on the chunk Megatron-Core places it on, the last pipeline stage's last
    virtual chunk (the one with post_process=True); under pp > 1 that chunk also holds an embedding copy, kept equal
    to the first stage's by Megatron's embedding group (HybridModel above).
    `precision`: a model.precision.PrecisionConfig; only high-precision recipes (fp32/bf16) are built here,
    low-precision GEMMs are a layer on top (model.lowp.apply_precision; pretrain/train.py does both).
    """
    _mcore()
    from megatron.core import parallel_state

    from .specs import column_linear_spec, hybrid_stack_spec, norm_spec, resolve_backend

    if precision is not None and getattr(precision, "recipe", "bf16") not in ("bf16", "fp32"):
        raise ValueError(f"precision recipe {precision.recipe!r} is applied by the precision layer, not build_model; "
                         "build with a bf16/fp32 policy and wrap it with model.lowp.apply_precision")
    be = resolve_backend(backend)
    tc = config if config is not None else transformer_config(cfg)
    parse_pattern(cfg.hybrid_override_pattern, cfg.num_layers)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = tc.virtual_pipeline_model_parallel_size
    pipeline_chunks(cfg.hybrid_override_pattern, pp, vpp, tc.num_layers_in_first_pipeline_stage,
                    tc.num_layers_in_last_pipeline_stage)
    if (vpp is not None) != (vp_stage is not None):
        raise ValueError(f"vp_stage={vp_stage} with virtual_pipeline_model_parallel_size={vpp}: under interleaved "
                         "pipelining build one model chunk per virtual stage (vp_stage 0..vpp-1), otherwise none")
    if vp_stage is not None and not 0 <= vp_stage < vpp:
        raise ValueError(f"vp_stage={vp_stage} is outside 0..{vpp - 1} (virtual_pipeline_model_parallel_size={vpp})")
    mtp_process = _mtp_process(cfg, tc, post_process, vp_stage)
    model = _ModelClass.get()(
        config=tc,
        mtp_process=mtp_process,
        mamba_stack_spec=hybrid_stack_spec(be, cfg.num_moe_experts, cfg.mamba_chunk_size, cfg.mamba_conv_kernel,
                                           vp_stage=vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        hybrid_override_pattern=cfg.hybrid_override_pattern,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
    )
    model.vp_stage = vp_stage  # also on chunks without embedding/output (the setup hook above does not run there)
    if mtp_process:
        from megatron.core.process_groups_config import ProcessGroupCollection

        from .mtp import HybridMTPBlock, HybridMTPLayer

        parse_pattern(cfg.mtp_hybrid_override_pattern, field="mtp_hybrid_override_pattern")
        mtp_spec = hybrid_stack_spec(be, cfg.num_moe_experts, cfg.mamba_chunk_size, cfg.mamba_conv_kernel,
                                     split_over_pipeline=False, post_layer_norm=False)
        layer = HybridMTPLayer(tc, stack_spec=mtp_spec, norm=norm_spec(be), linear=column_linear_spec(be),
                               mtp_pattern=cfg.mtp_hybrid_override_pattern,
                               pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                               moe_layer_number=cfg.num_layers + 1)
        model.mtp = HybridMTPBlock(tc, depths=cfg.mtp_num_layers, layer=layer)
    return model


def _mtp_process(cfg: ModelConfig, tc, post_process: bool, vp_stage: Optional[int]) -> bool:
    """Whether this chunk runs the MTP block: Megatron-Core's placement (`mtp_on_this_rank`: the last virtual
    chunk of the last pipeline stage), which must be the chunk built with the output layer (the MTP losses use it)."""
    # Megatron-Core's embedding sync and MTP loss scaling read the TransformerConfig's mtp_num_layers.
    if (tc.mtp_num_layers or 0) != cfg.mtp_num_layers:
        raise ValueError(f"the TransformerConfig has mtp_num_layers={tc.mtp_num_layers} but the model config "
                         f"{cfg.mtp_num_layers}: build the config with transformer_config(cfg, ...)")
    if not cfg.mtp_num_layers:
        return False
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank

    here = mtp_on_this_rank(tc, ignore_virtual=False, vp_stage=vp_stage)
    if here != post_process:
        raise ValueError(f"post_process={post_process} but Megatron-Core places MTP {'' if here else 'not '}on this "
                         f"chunk (vp_stage={vp_stage}): MTP runs on the last pipeline stage's last virtual chunk, "
                         "which must be built with post_process=True (and no other chunk)")
    return here


def update_expert_bias(model_chunks: Sequence[torch.nn.Module], config=None) -> None:
    """Aux-loss-free expert-bias step for loops that do not call Megatron's `finalize_model_grads` (which does
    exactly this): all-reduce token counts over TPxCPxDP, bias += rate * sign(mean - count), zero the counts."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    chunks = list(model_chunks)
    cfg = config if config is not None else chunks[0].config
    if not cfg.moe_router_enable_expert_bias:
        return
    _update_router_expert_bias(chunks, cfg)
    for chunk in chunks:
        for module in chunk.modules():
            if getattr(module, "local_tokens_per_expert", None) is not None:
                module.local_tokens_per_expert.zero_()
