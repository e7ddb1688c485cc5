"""Apply the precision policy to a built model: route each linear's GEMMs through the emulated recipe. In the
adaptation layer because it replaces Megatron-Core linears' private `_forward_impl` (tensor_parallel/layers.py).

This is the "emulation elsewhere" row of DESIGN.md's backend table: on CPUs and pre-Blackwell GPUs, every
Megatron-Core linear whose policy format is NVFP4, MXFP8 or BF16 computes through
``kernels.lowp_linear.LowPrecisionLinearFn``. The patch is per instance and touches no parameter or buffer, so
state dicts, checkpoints and HF export see the same names and shapes. On Blackwell with Transformer Engine the
real recipe runs instead (TE layers under ``fp8_autocast(NVFP4BlockScaling(**te_recipe_kwargs(...)))``); TE
layers are therefore refused here rather than silently left in high precision.

What is patched:
  * ``ColumnParallelLinear`` / ``RowParallelLinear`` and subclasses (QKV, out, MLP, experts, shared experts,
    Mamba in/out_proj, MTP eh_proj, output head): their ``_forward_impl`` (Megatron's
    ``linear_with_grad_accumulation_and_async_allreduce`` slot), keeping sequence-parallel all-gather /
    reduce-scatter and the TP dgrad all-reduce through Megatron-Core's autograd-aware mappings;
  * ``DuplicatedLinear`` (LatentMoE projections without TE): its ``forward``.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from kernels.lowp_linear import LowPrecisionOptions, lowp_linear
from kernels.telemetry import QuantTelemetry

from ..precision import Format, PrecisionConfig, linear_format

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_PATCHED = "_lowp_format"


def lowp_options(cfg: PrecisionConfig) -> LowPrecisionOptions:
    return LowPrecisionOptions(rht=not cfg.disable_rht, stochastic_rounding=not cfg.disable_stochastic_rounding,
                               two_d_weights=not cfg.disable_2d_quantization, rht_seed=cfg.rht_seed)


class _CallSeeds:
    """Fresh, reproducible SR seeds: (base seed, module index, training step, call within the step) -> 63-bit seed.

    Keyed on the step rather than on a running count, so a resumed run draws exactly the stream the uninterrupted
    one would (the loop calls `set_sr_step` before each step); nothing has to travel in the checkpoint."""

    def __init__(self, base: int, index: int):
        self.base, self.index, self.step, self.calls = int(base), int(index), 0, 0

    def at_step(self, step: int) -> None:
        self.step, self.calls = int(step), 0

    def next(self) -> int:
        self.calls += 1
        return (self.base * 1_000_003 + self.index * 7_919 + self.step * 15_485_863 + self.calls * 104_729) \
            % (2**63 - 1)


_SEEDS = "_lowp_sr_seeds"


def set_sr_step(model, step: int) -> None:
    """Position every emulated linear's stochastic-rounding stream at training step `step` (1-based, run-global)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            seeds = getattr(module, _SEEDS, None)
            if seeds is not None:
                seeds.at_step(step)


def _global_layer_index(model: torch.nn.Module, name: str) -> Optional[int]:
    m = _LAYER.match(name)
    if m is None:
        return None
    layer = model.get_submodule(f"decoder.layers.{m.group(1)}")
    number = getattr(layer, "layer_number", None)  # global, 1-based (MambaStack passes the PP offset)
    return int(number) - 1 if number is not None else int(m.group(1))


def _make_forward_impl(name: str, fmt: Format, opts: LowPrecisionOptions, seeds: _CallSeeds,
                       telemetry: Optional[QuantTelemetry]):
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    def _forward_impl(input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                      **_unused):
        if gradient_accumulation_fusion:
            raise ValueError(f"{name}: gradient_accumulation_fusion needs the APEX CUDA extension and writes "
                             "main_grad directly; turn it off with emulated low precision")
        if grad_output_buffer is not None:
            raise ValueError(f"{name}: deferred embedding wgrad (defer_embedding_wgrad_compute) is not supported "
                             "with emulated low precision")
        if sequence_parallel:
            total = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            total = copy_to_tensor_model_parallel_region(input, group=tp_group)
        else:
            total = input
        probe = telemetry.probe(name) if telemetry is not None else None
        return lowp_linear(total, weight, bias, fmt=fmt, opts=opts, seed=seeds.next(), probe=probe)

    return _forward_impl


def _make_duplicated_forward(module, name, fmt, opts, seeds, telemetry):
    def forward(x):
        probe = telemetry.probe(name) if telemetry is not None else None
        return lowp_linear(x, module.weight, None, fmt=fmt, opts=opts, seed=seeds.next(), probe=probe), None

    return forward


def apply_precision(model: torch.nn.Module, cfg: PrecisionConfig, *, num_layers: int, seed: int = 0,
                    telemetry: Optional[QuantTelemetry] = None, emulate_bf16: bool = True) -> dict[str, Format]:
    """Patch every linear of ``model`` to its policy format; returns {module name: format} for all linears.

    ``emulate_bf16``: BF16 linears round their operands to BF16 (fp32 accumulation) like a BF16 GEMM; turn it off
    when the model already runs in BF16. FP32 linears (and routers, embeddings) are left as they are.
    Calling it again re-applies the policy (earlier patches are removed first).
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from ..layers import DuplicatedLinear

    remove_precision(model)
    opts = lowp_options(cfg)
    formats: dict[str, Format] = {}
    for index, (name, module) in enumerate(model.named_modules()):
        is_mp = isinstance(module, (ColumnParallelLinear, RowParallelLinear))
        is_dup = isinstance(module, DuplicatedLinear)
        if not (is_mp or is_dup):
            if type(module).__module__.startswith("transformer_engine") or "extensions.transformer_engine" in \
                    type(module).__module__:
                if hasattr(module, "weight") and cfg.recipe in ("nvfp4", "mxfp8"):
                    raise ValueError(f"{name} is a Transformer Engine layer ({type(module).__name__}); emulated "
                                     "low precision needs the local backend — on Blackwell use TE's recipe instead")
            continue
        leaf = name.rsplit(".", 1)[-1]
        role = "output_layer" if name == "output_layer" else leaf
        fmt = linear_format(cfg, num_layers=num_layers, layer_index=_global_layer_index(model, name), role=role,
                            name=name, is_mtp=name.startswith("mtp."))
        formats[name] = fmt
        setattr(module, _PATCHED, fmt)
        if fmt == "fp8":
            raise ValueError(f"{name}: precision format fp8 (Hopper per-tensor/blockwise FP8) runs through Transformer "
                             "Engine only (backend=te); the emulation reproduces mxfp8 and nvfp4")
        if fmt == "fp32" or (fmt == "bf16" and not emulate_bf16):
            continue
        seeds = _CallSeeds(seed, index)
        setattr(module, _SEEDS, seeds)
        if is_mp:
            module._forward_impl = _make_forward_impl(name, fmt, opts, seeds, telemetry)
        else:
            module.forward = _make_duplicated_forward(module, name, fmt, opts, seeds, telemetry)
    return formats


def remove_precision(model: torch.nn.Module) -> None:
    """Undo ``apply_precision`` (instance attributes only; the classes are never touched)."""
    for module in model.modules():
        if hasattr(module, _PATCHED):
            delattr(module, _PATCHED)
            if hasattr(module, _SEEDS):
                delattr(module, _SEEDS)
            for attr in ("_forward_impl", "forward"):
                if attr in module.__dict__:
                    del module.__dict__[attr]


def module_format(module: torch.nn.Module) -> Optional[Format]:
    """The format ``apply_precision`` gave this module (None if it was not a policy-managed linear)."""
    return getattr(module, _PATCHED, None)
