"""Mamba-2 mixers for the CPU and local-GPU backends: Megatron-Core's MambaMixer (same parameters, init, TP/CP
sharding, checkpoint layout) with its private compute methods (`_ssm_training`, `_ssm_prefill`, ssm/mamba_mixer.py
0.19.2 :727/:783) overridden, hence here in the adaptation layer: a rename upstream breaks in this file.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixer

from kernels.conv1d import causal_conv1d
from kernels.ssd import ssd_scan

from .stand_ins import mamba_mixer_without_mamba_ssm


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
