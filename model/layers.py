"""CPU stand-ins for exactly the Megatron-Core pieces that need CUDA-only packages, with upstream's names/shapes.

Megatron-Core 0.19 needs Transformer Engine for fused norm+linear layers and the LatentMoE projections, and
mamba-ssm (Triton) for the Mamba-2 mixer. Each class here subclasses or mirrors the upstream module so the
state_dict is the same on both backends (a checkpoint moves between them):

| upstream (GPU)                                  | here (CPU)                       | parameters |
|-------------------------------------------------|----------------------------------|------------|
| TELayerNormColumnParallelLinear (RMSNorm)       | LayerNormColumnParallelLinear    | weight, layer_norm_weight |
| MambaMixer + mamba-ssm kernels + RMSNormGated   | CPUMambaMixer (kernels/ssd, conv1d) | in_proj.*, conv1d.*, A_log, D, dt_bias, norm.weight, out_proj.* |
| TELinear(parallel_mode="duplicated") in MoELayer | LatentMoELayer's DuplicatedLinear | fc1_latent_proj.weight, fc2_latent_proj.weight |

Everything else (attention, MLP, MoE router/dispatcher/experts, MambaLayer/MambaStack) is Megatron-Core's own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.moe.moe_layer import MoELayer

from kernels.conv1d import causal_conv1d
from kernels.ssd import ssd_scan

from .adapt.stand_ins import latent_moe_without_te, mamba_mixer_without_mamba_ssm


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


class GatedRMSNorm(torch.nn.Module):
    """mamba-ssm's RMSNormGated (norm_before_gate=False): y = rmsnorm_groupwise(x * silu(z)) * weight, with the
    RMS taken over groups of d_inner / ngroups channels (not the whole width: a known pitfall), in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = False, device=None, dtype=None):
        super().__init__()
        if norm_before_gate:
            raise ValueError("Nemotron's Mamba-2 mixer gates before the norm (norm_before_gate=False)")
        self.eps = eps
        self.group_size = group_size or hidden_size
        if hidden_size % self.group_size:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of group_size {self.group_size}")
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """As Megatron's ExtendedRMSNorm (ssm/mamba_mixer.py:88): weight sharded along axis 0 over TP."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        if z is not None:
            h = h * F.silu(z.float())
        shape = h.shape
        h = h.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.view(shape) * self.weight.float()).to(dtype)


class CPUMambaMixer(MambaMixer):
    """Megatron-Core's MambaMixer (same parameters, init, TP sharding, checkpoint layout) computing the SSM with
    the torch kernels in kernels/ instead of mamba-ssm's Triton ones. Same numerics as upstream's training path
    `mamba_split_conv1d_scan_combined`: silu after the conv, dt = softplus(dt + dt_bias) with no clamp
    (upstream's default dt_limit is (0, inf)), D skip per head, gate then grouped RMSNorm."""

    def __init__(self, *args, **kwargs):
        with mamba_mixer_without_mamba_ssm(GatedRMSNorm):
            super().__init__(*args, **kwargs)

    def _torch_ssm(self, zxBCdt: torch.Tensor) -> torch.Tensor:
        cp = self.cp
        l, b, _ = zxBCdt.shape
        h, p, g, n = cp.nheads_local_tpcp, self.headdim, cp.ngroups_local_tpcp, self.d_state
        d_inner = cp.d_inner_local_tpcp
        z, xBC, dt = torch.split(zxBCdt.transpose(0, 1), [d_inner, d_inner + 2 * g * n, h], dim=-1)
        weight = cp.get_conv1d_weight()
        xBC = causal_conv1d(xBC.transpose(1, 2), weight, cp.get_conv1d_bias(), activation="silu").transpose(1, 2)
        x, B, C = torch.split(xBC, [d_inner, g * n, g * n], dim=-1)
        dt = F.softplus(dt.float() + cp.get_dt_bias().float())
        A = -torch.exp(cp.get_A_log().float())
        D = cp.get_D()
        if self.D_has_hdim:
            D = D.view(h, p)
        y = self._scan(x.reshape(b, l, h, p), dt, A, B.reshape(b, l, g, n), C.reshape(b, l, g, n), D)
        y = y.reshape(b, l, d_inner).transpose(0, 1)
        y = cp.post_conv_ssm(y)
        z = cp.post_conv_ssm(z.transpose(0, 1))
        if self.rmsnorm:
            return self.norm(y, z)
        return y * F.silu(z)

    def _scan(self, x, dt, A, B, C, D) -> torch.Tensor:
        """The SSD scan over softplus'd dt: x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n] -> y [b,l,h,p]."""
        return ssd_scan(x, dt, A, B, C, self.chunk_size, D=D)

    def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences (THD) are not supported by the CPU Mamba-2 path")
        return self._torch_ssm(zxBCdt)

    def _ssm_prefill(self, zxBCdt: torch.Tensor, conv_state=None, ssm_state=None, **kwargs) -> torch.Tensor:
        if conv_state is not None or ssm_state is not None or kwargs.get("seq_idx") is not None:
            raise NotImplementedError("cached inference is not supported by the CPU Mamba-2 path")
        return self._torch_ssm(zxBCdt)


class LocalMambaMixer(CPUMambaMixer):
    """The `local` GPU backend's mixer: mamba-ssm's Triton kernels without Transformer Engine.

    With causal-conv1d installed this is upstream's MambaMixer training path unchanged
    (`mamba_split_conv1d_scan_combined`, ssm/mamba_mixer.py:727). Without it that fused kernel calls
    `causal_conv1d_fwd_function`, which is None ("NoneType is not callable"), so the convolution runs in torch
    (kernels/conv1d.py, FP32 accumulation) and the scan in mamba-ssm's `mamba_chunk_scan_combined`
    (mamba_ssm/ops/triton/ssd_combined.py, signature of mamba-ssm 2.2.x/2.3.x: x, dt, A, B, C, chunk_size, D=...).
    Written against those sources; it runs only on a CUDA machine with mamba-ssm (tests marked `gpu`)."""

    def __init__(self, *args, **kwargs):
        MambaMixer.__init__(self, *args, **kwargs)

    def _scan(self, x, dt, A, B, C, D) -> torch.Tensor:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined(x, dt.to(x.dtype), A, B, C, self.chunk_size, D=D)

    def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        import importlib.util

        if importlib.util.find_spec("causal_conv1d") is not None:
            return MambaMixer._ssm_training(self, zxBCdt, packed_seq_params)
        return super()._ssm_training(zxBCdt, packed_seq_params)


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
