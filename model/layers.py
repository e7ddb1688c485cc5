"""CPU stand-ins for exactly the Megatron-Core pieces that need CUDA-only packages, with upstream's names/shapes.

Megatron-Core 0.19 needs Transformer Engine for fused norm+linear layers and the LatentMoE projections, and
mamba-ssm (Triton) for the Mamba-2 mixer. Each class here subclasses or mirrors the upstream module so the
state_dict is the same on both backends (a checkpoint moves between them):

| upstream (GPU)                                  | here (CPU)                       | parameters |
|-------------------------------------------------|----------------------------------|------------|
| TELayerNormColumnParallelLinear (RMSNorm)       | LayerNormColumnParallelLinear    | weight, layer_norm_weight |
| MambaMixer + mamba-ssm kernels + RMSNormGated   | adapt.mamba_mixer.CPUMambaMixer  | in_proj.*, conv1d.*, A_log, D, dt_bias, norm.weight, out_proj.* |
| TELinear(parallel_mode="duplicated") in MoELayer | LatentMoELayer's DuplicatedLinear | fc1_latent_proj.weight, fc2_latent_proj.weight |

Everything else (attention, MLP, MoE router/dispatcher/experts, MambaLayer/MambaStack) is Megatron-Core's own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.moe.moe_layer import MoELayer

from .adapt.stand_ins import latent_moe_without_te


def param_device(config) -> torch.device:
    """Where Megatron-Core puts this config's parameters (tensor_parallel/layers.py: the CPU under
    `use_cpu_initialization`, else the current CUDA device): Foldtron's own parameters go to the same place."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm followed by a ColumnParallelLinear, holding the norm weight as `layer_norm_weight` like TE's
    fused module, so the pre-norm of every `*`, `-` and `M` layer has one name on both backends."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        if config.normalization != "RMSNorm":
            raise ValueError(f"LayerNormColumnParallelLinear implements RMSNorm only, config asks {config.normalization!r}")
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype,
                                                          device=param_device(config)))
        # Under sequence parallelism every TP rank sees different tokens: the grad must be all-reduced over TP.
        self.layer_norm_weight.sequence_parallel = bool(config.sequence_parallel)
        self.eps = config.layernorm_epsilon

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output=None):
        x = F.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)


class DuplicatedLinear(torch.nn.Module):
    """TELinear(parallel_mode="duplicated") in plain torch: a full, TP-replicated weight [out, in] and the
    (output, bias) return convention of Megatron linears."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False, **_ignored):
        super().__init__()
        if bias:
            raise ValueError("biases are not supported on the latent projections (the Nemotron models have none)")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype,
                                                 device=param_device(config)))
        if config.perform_initialization:
            init_method(self.weight)
        # Replicated over TP; with sequence parallelism each TP rank sees other tokens, so grads are all-reduced.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None


class LatentMoELayer(MoELayer):
    """Megatron-Core's MoELayer; on a machine without TE its LatentMoE projections are DuplicatedLinear."""

    def __init__(self, config, *args, **kwargs):
        if config.moe_latent_size:
            with latent_moe_without_te(DuplicatedLinear):
                super().__init__(config, *args, **kwargs)
        else:
            super().__init__(config, *args, **kwargs)


class TorchNorm(torch.nn.Module):
    """RMSNorm/LayerNorm in plain torch that, unlike megatron's WrappedTorchNorm (transformer/torch_norm.py:32),
    allows sequence parallelism: it marks its parameters `sequence_parallel` so finalize_model_grads all-reduces
    their gradients over TP, as TE's and apex's norms do. Parameter names: `weight` (and `bias` for LayerNorm)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str | None = None) -> None:
        super().__init__()
        kind = normalization or config.normalization
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"TorchNorm supports RMSNorm and LayerNorm, not {kind!r}")
        self.kind, self.eps = kind, eps
        dev = param_device(config)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=dev))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=dev))
                     if kind == "LayerNorm" else None)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "RMSNorm":
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
