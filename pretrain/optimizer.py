"""Model chunks wrapped in Megatron-Core DDP, and Megatron-Core's optimizer over them.

Nemotron 3 recipe: AdamW (beta 0.9/0.95, eps 1e-8, weight decay 0.1), FP32 master weights, FP32 gradient
reduction and FP32 optimizer states; with `layout.use_distributed_optimizer` the states and master weights are
sharded over DP (Megatron's DistributedOptimizer, ZeRO-1). Gradient clipping by global norm is the optimizer's
(`clip_grad`). The grad-sync hooks are put on the model's TransformerConfig, as Megatron-LM's training.py does,
so `get_forward_backward_func` overlaps nothing it should not and finalizes grads (DP reduce, SP norm grads,
per-token scaling, MoE expert-bias update) once per global batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

# Megatron-Core's optimizers check CUDA `param.type()` names; the CPU answer lives with the other CPU patches.
from model.adapt import cpu_type_names
from parallel.layout import ParallelLayout
from pretrain.config import TrainConfig


def wrap_ddp(chunks: Sequence[torch.nn.Module], layout: ParallelLayout, bf16: bool, *,
             overlap_grad_reduce: bool = False, overlap_param_gather: bool = False) -> list:
    """`overlap_*`: PerformanceConfig.resolved() (on for GPU backends; CPU/gloo has nothing to overlap with)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # FP32 gradient accumulation/reduction (Nemotron 3 recipe)
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather and layout.use_distributed_optimizer,
        use_distributed_optimizer=layout.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop checks across ranks and skips instead of raising
        bucket_size=None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_cfg, module=chunk,
                                               disable_bucketing=i > 0))
        wrapped[-1].broadcast_params()  # identical replicas even if a provider seeded ranks differently
    return wrapped


def build_optimizer(model: Sequence, train: TrainConfig, layout: ParallelLayout, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer=train.optimizer, lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=layout.use_distributed_optimizer,
        main_grads_dtype=torch.float32, main_params_dtype=torch.float32,
        exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32,
    )
    with cpu_type_names():
        return get_megatron_optimizer(cfg, list(model))


def optimizer_step(optimizer) -> tuple:
    """(update_successful, grad_norm, num_zeros_in_grad), as Megatron's `optimizer.step()`."""
    with cpu_type_names():
        return optimizer.step()


def install_grad_sync(model: Sequence) -> None:
    """What Megatron-LM's training.py sets on the config before the first step."""
    from megatron.core.distributed import finalize_model_grads

    cfg = model[0].config
    cfg.no_sync_func = model[0].no_sync if len(model) == 1 else [m.no_sync for m in model]
    cfg.grad_sync_func = None
    cfg.param_sync_func = None
    cfg.finalize_model_grads_func = finalize_model_grads


def grads_finite(model: Sequence) -> bool:
    """Local check of every gradient buffer (dense and expert); the caller reduces the answer over ranks."""
    for chunk in model:
        for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            if not bool(torch.isfinite(buf.grad_data).all()):
                return False
    return True


def params_norm(model: Sequence) -> float:
    """L2 norm of all parameters, each counted once across TP/PP/EP/DP (Megatron's `calc_params_l2_norm`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from model.adapt import current_device

    device = current_device()  # the all-reduces below run on the backend's device (NCCL takes no CPU tensors)
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in model:
        for p in chunk.parameters():
            if not (param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)):
                continue
            sq = p.detach().double().pow(2).sum().to(device)
            if getattr(p, "allreduce", True):
                dense += sq
            else:
                expert += sq
    import torch.distributed as dist

    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense + expert).sqrt())
