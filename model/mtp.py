"""Hybrid multi-token prediction (Nemotron 3 Super): one shared-weight block with its own layer pattern.

Megatron-Core 0.16.1 has MTP only for GPTModel, where each depth owns one TransformerLayer. Nemotron 3's block
is a small hybrid stack (Super: `*E`) whose weights are shared by all D depths. We reuse Megatron-Core's
MultiTokenPredictionLayer for everything around the inner layers (rolling the input ids, `enorm`/`hnorm` on the
embedding and the hidden state, the `eh_proj` concat projection, `final_layernorm`) and replace its single
`transformer_layer` with `mtp_model_layer`, a HybridStack over the MTP pattern. Parameter names:

    mtp.layers.0.{enorm,hnorm,eh_proj,final_layernorm}.*   mtp.layers.0.mtp_model_layer.layers.{i}.*

(the Megatron-Bridge names the HF export maps from). Depth k (1..D) applies the block to the previous depth's
output and the embedding of the tokens k ahead, and its logits predict token t+k+1; the loss is added the way
GPTModel does it (MTPLossAutoScaler, scale mtp_loss_scaling_factor / D).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import make_viewless_tensor


class _StackMicrobatch:
    """What Megatron-Core's pipeline schedule sees as an MTP layer's `transformer_layer`.

    `set_current_microbatch` (pipeline_parallel/schedules.py) writes `layer.transformer_layer.current_microbatch`
    on every `model.mtp.layers[*]`, as it writes `current_microbatch` on every decoder layer (TE CUDA-graph
    replay and FP8 keyed per micro-batch read it there). Our block has a stack of layers in that slot, so the
    value goes to the stack and to each of its layers, exactly where the decoder's layers keep theirs."""

    def __init__(self, stack: torch.nn.Module):
        self.stack = stack

    @property
    def current_microbatch(self):
        return getattr(self.stack, "current_microbatch", None)

    @current_microbatch.setter
    def current_microbatch(self, value) -> None:
        self.stack.current_microbatch = value
        for layer in self.stack.layers:
            layer.current_microbatch = value


class HybridMTPLayer(MultiTokenPredictionLayer):
    """One MTP block (shared across depths). Subclasses Megatron-Core's layer to reuse its embedding/concat/
    post-norm steps; only the constructor (a hybrid stack instead of one TransformerLayer) and the inner call
    differ."""

    def __init__(self, config, *, stack_spec: ModuleSpec, norm, linear, mtp_pattern: str, pg_collection,
                 moe_layer_number: int):
        MegatronModule.__init__(self, config=config)
        self.sequence_parallel = config.sequence_parallel
        self.layer_number = 1
        self.vp_stage = None
        self.cp_group = pg_collection.cp
        self.enorm = build_module(norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.hnorm = build_module(norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.eh_proj = build_module(linear, config.hidden_size * 2, config.hidden_size, config=config,
                                    init_method=config.init_method, gather_output=False, bias=False,
                                    skip_bias_add=False, is_expert=False, tp_group=pg_collection.tp)
        # The inner stack is sized by its own pattern (MambaStack checks num_layers == len(pattern)), and it is
        # whole on its stage: its TransformerLayers must not add the decoder's pipeline offset
        # (get_transformer_layer_offset reads these config fields), or under pp > 1 the block's layers would be
        # numbered from the last stage's first decoder layer and its checkpoint keys would depend on the layout.
        inner_config = copy.copy(config)
        inner_config.num_layers = len(mtp_pattern)
        inner_config.pipeline_model_parallel_size = 1
        inner_config.virtual_pipeline_model_parallel_size = None
        inner_config.num_layers_in_first_pipeline_stage = None
        inner_config.num_layers_in_last_pipeline_stage = None
        self.mtp_model_layer = build_module(stack_spec, inner_config, pre_process=True, post_process=False,
                                            hybrid_override_pattern=mtp_pattern, dtype=config.params_dtype,
                                            pg_collection=pg_collection)
        for layer in self.mtp_model_layer.layers:
            if hasattr(getattr(layer, "mlp", None), "router"):
                # MoE aux-loss logging slot: after the main layers (the tracker has num_layers + mtp_num_layers).
                layer.mlp.set_layer_number(moe_layer_number)
        self.final_layernorm = build_module(norm, config=config, hidden_size=config.hidden_size,
                                            eps=config.layernorm_epsilon)
        self.offload_context = nullcontext()

    @property
    def transformer_layer(self) -> _StackMicrobatch:
        """Upstream's single-layer slot, for the callers that reach into it (the pipeline schedules). A view,
        not a registered module: parameter names stay `mtp_model_layer.*`."""
        return _StackMicrobatch(self.mtp_model_layer)

    def forward(self, input_ids, position_ids, hidden_states, attention_mask, embedding=None,
                packed_seq_params=None, **_unused):
        input_ids, position_ids, decoder_input, hidden_states = self._get_embeddings(
            input_ids=input_ids, position_ids=position_ids, embedding=embedding, hidden_states=hidden_states,
            packed_seq_params=packed_seq_params)
        hidden_states = self._concat_embeddings(hidden_states, decoder_input)
        hidden_states = self.mtp_model_layer(hidden_states=hidden_states, attention_mask=attention_mask,
                                             packed_seq_params=packed_seq_params)
        hidden_states = self._postprocess(hidden_states)
        return hidden_states, input_ids, position_ids


class HybridMTPBlock(MegatronModule):
    """D depths through one shared HybridMTPLayer; returns the per-depth hidden states concatenated along the
    sequence dimension after the main one ([(1+D)*s, b, h]), exactly like MultiTokenPredictionBlock."""

    def __init__(self, config, *, depths: int, layer: HybridMTPLayer):
        super().__init__(config=config)
        if depths < 1:
            raise ValueError(f"MTP needs at least one depth, got {depths}")
        self.depths = depths
        self.layers = torch.nn.ModuleList([layer])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Delegate to the shared layer's own sharded_state_dict. MegatronModule's default treats the `layers`
        ModuleList as plain tensors (no sharded_state_dict on ModuleList): TP shards were saved as replicated
        full tensors (TP rank 0's only) and every EP rank's local experts under the same key (experts of
        EP rank > 0 lost). Found by the HF export tests (tests/test_export_hf.py, TP2/EP2 layouts)."""
        sd = {}
        for i, layer in enumerate(self.layers):
            sd.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
        return sd

    def forward(self, input_ids, position_ids, hidden_states, attention_mask, embedding,
                packed_seq_params: Optional[object] = None) -> torch.Tensor:
        outs = [hidden_states]
        for _ in range(self.depths):
            hidden_states, input_ids, position_ids = self.layers[0](
                input_ids=input_ids, position_ids=position_ids, hidden_states=hidden_states,
                attention_mask=attention_mask, embedding=embedding, packed_seq_params=packed_seq_params)
            outs.append(hidden_states)
        return make_viewless_tensor(torch.cat(outs, dim=0), requires_grad=True, keep_graph=True)
