"""MTP loss normalisation under context parallelism.

Megatron-Core 0.19.2's `process_mtp_loss` (transformer/multi_token_prediction.py:760), with
`calculate_per_token_loss`, rescales each depth's loss by `original_num_tokens / num_tokens`, both counted on this
rank only (`loss_mask.sum()` and `roll_tensor`'s local sum, :137-235). Under CP a sequence's tail (the tokens rolled
out at each depth) lives on one CP rank (the one holding the last chunk), so the ranks get different ratios
(16/15 and 16/16 for 32 tokens over cp=2) where one process has one (32/31): the MTP gradient depends on the layout
(measured on the matrix's cp2 row: every gradient ~0.6% off the 1-process run). With CP > 1 the same computation
runs here with both counts summed over the CP group; with CP == 1 upstream's function runs unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core import parallel_state
    from megatron.core.models.hybrid import hybrid_model
    from megatron.core.transformer import multi_token_prediction as mtp

    upstream = mtp.process_mtp_loss

    def process_mtp_loss(hidden_states, labels, loss_mask, output_layer, output_weight, runtime_gather_output,
                         is_training, compute_language_model_loss, config, cp_group=None, tp_group=None,
                         packed_seq_params=None, scale_logits_fn=None, input_ids=None):
        if (cp_group is None or cp_group.size() == 1 or not config.calculate_per_token_loss or labels is None
                or packed_seq_params is not None or config.mtp_detach_heads):
            return upstream(hidden_states, labels, loss_mask, output_layer, output_weight, runtime_gather_output,
                            is_training, compute_language_model_loss, config, cp_group, tp_group, packed_seq_params,
                            scale_logits_fn, input_ids)
        chunks = torch.chunk(hidden_states, 1 + config.mtp_num_layers, dim=0)
        hidden_states = chunks[0]
        mtp_labels = labels.clone()
        mask = torch.ones_like(mtp_labels) if loss_mask is None else loss_mask
        total = mask.sum().float()
        dist.all_reduce(total, group=cp_group)  # the CP-global token count
        scale = config.mtp_loss_scaling_factor / config.mtp_num_layers
        for depth in range(config.mtp_num_layers):
            logits, _ = output_layer(chunks[depth + 1], weight=output_weight, runtime_gather_output=runtime_gather_output)
            if scale_logits_fn is not None:
                logits = scale_logits_fn(logits)
            mtp_labels, _ = mtp.roll_tensor(mtp_labels, shifts=-1, dims=-1, cp_group=cp_group)
            mask, local = mtp.roll_tensor(mask, shifts=-1, dims=-1, cp_group=cp_group)
            kept = local.detach().float().clone()
            dist.all_reduce(kept, group=cp_group)
            loss = mask * compute_language_model_loss(mtp_labels, logits)
            if is_training:
                correct, count = mtp._compute_mtp_acceptance_counts(logits, mtp_labels, mask, output_layer,
                                                                     runtime_gather_output, tp_group)
                mtp.MTPLossLoggingHelper.save_metrics_to_tracker(
                    torch.sum(loss) * (local > 0).to(loss.dtype) / local.clamp(min=1), correct, count, depth,
                    config.mtp_num_layers, avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            hidden_states = mtp.MTPLossAutoScaler.apply(hidden_states, scale * loss * (total / kept.clamp(min=1)))
        return hidden_states

    hybrid_model.process_mtp_loss = process_mtp_loss
    _INSTALLED = True
