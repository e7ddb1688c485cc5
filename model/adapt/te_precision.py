"""The Nemotron 3 low-precision recipe through Transformer Engine, one recipe context per module.

Why per module and not Megatron-Core's config path: 0.19.2's `fp4_utils.get_fp4_recipe` (fp4_utils.py:219-244)
builds `NVFP4BlockScaling(fp8_dpa=...)` with TE's defaults only (RHT / stochastic rounding / 2-D weights switchable
solely through `NVTE_NVFP4_DISABLE_*` variables read when TE is imported), and `get_fp4_context`
(fp4_utils.py:247-291) chooses FP4 or BF16 per *layer*; fp4 and fp8 exclude each other in TransformerConfig. Super's
recipe needs BF16 attention / latent / MTP projections inside NVFP4 layers and an MXFP8 Mamba out_proj, so every TE
linear's forward runs inside its own `fp8_autocast` with the recipe its policy format asks for
(`model.precision.linear_format`, the same function the emulation uses). Nested TE autocasts replace the outer
recipe for their scope (TE's FP8GlobalStateManager keeps a stack of autocast states).

Transformer Engine APIs called (TE 2.8-2.10 source):
- `transformer_engine.pytorch.fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None)`
  (transformer_engine/pytorch/fp8.py; TE >= 2.8 keeps it as the alias of `quantization.autocast(enabled,
  calibrating, recipe, amax_reduction_group)`, pytorch/quantization.py ~789-852). Keyword arguments only: the
  first positional parameter is `enabled` (the audit's note on the old docstring).
- `transformer_engine.common.recipe.NVFP4BlockScaling(disable_rht, disable_stochastic_rounding,
  disable_2d_quantization)` (common/recipe/__init__.py ~387-481): defaults are the Nemotron 3 recipe (RHT on the
  wgrad inputs, stochastic rounding on gradients, 16x16 weight tiles).
- `MXFP8BlockScaling()` and, on Hopper, `Float8BlockScaling()` (common/recipe/__init__.py).
- `torch.cuda.get_device_capability()`: MXFP8 and NVFP4 GEMMs need compute capability >= 10.0.

Written against those sources; it runs only with Transformer Engine on a GPU (the `gpu` tests). What can be
checked without a GPU, the per-module plan (`te_plan`), is printed by `foldtron precision-plan` and tested.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from ..precision import (
    LOW_PRECISION,
    Format,
    PrecisionConfig,
    linear_format,
    linear_precisions,
    te_recipe_kwargs,
)

#: TE recipe class per Foldtron format (None: no autocast, the module computes in BF16/FP32).
TE_RECIPE = {"nvfp4": "NVFP4BlockScaling", "mxfp8": "MXFP8BlockScaling", "fp8": "Float8BlockScaling",
             "bf16": None, "fp32": None}
NEEDS_BLACKWELL = ("nvfp4", "mxfp8")


class ModuleRecipe(NamedTuple):
    name: str
    fmt: Format
    te_recipe: Optional[str]
    te_kwargs: dict


def te_plan(model_cfg, cfg: PrecisionConfig) -> list[ModuleRecipe]:
    """Every linear of the model with its format and the TE recipe (class, kwargs) the te backend runs it under."""
    out = []
    for lp in linear_precisions(model_cfg, cfg):
        recipe = TE_RECIPE[lp.fmt]
        kwargs = te_recipe_kwargs(cfg, lp.fmt) if lp.fmt in ("nvfp4", "mxfp8") else {}
        out.append(ModuleRecipe(lp.name, lp.fmt, recipe, kwargs))
    return out


def check_device_supports(cfg: PrecisionConfig, formats: set[str], capability: Optional[tuple[int, int]] = None) -> None:
    """A clear error for TE NVFP4/MXFP8 on compute capability < 10 (Hopper: use fp8, or the emulation)."""
    need = sorted(set(formats) & set(NEEDS_BLACKWELL))
    if not need:
        return
    if capability is None:
        if not torch.cuda.is_available():
            raise ValueError(f"Transformer Engine {', '.join(need)} needs a GPU; this machine has none (the cpu "
                             "backend runs the bit-exact emulation instead)")
        capability = torch.cuda.get_device_capability()
    if capability[0] < 10:
        raise ValueError(f"Transformer Engine {', '.join(need)} GEMMs need compute capability >= 10.0 (Blackwell); "
                         f"this GPU is {capability[0]}.{capability[1]}. On Hopper use precision.recipe=fp8 "
                         "(mamba_out_proj=fp8), or backend=local for the emulated recipe")


def _recipe(cfg: PrecisionConfig, fmt: Format) -> Any:
    from transformer_engine.common import recipe as te_recipe

    name = TE_RECIPE[fmt]
    kwargs = te_recipe_kwargs(cfg, fmt) if fmt in ("nvfp4", "mxfp8") else {}
    return getattr(te_recipe, name)(**kwargs)


_LINEAR_ROLES = ("linear_qkv", "linear_proj", "in_proj", "out_proj", "linear_fc1", "linear_fc2", "fc1_latent_proj",
                 "fc2_latent_proj", "eh_proj")


def _is_te_linear(name: str, module: torch.nn.Module) -> bool:
    """A TE linear of the model (Megatron's TE wrappers live in megatron.core.extensions.transformer_engine)."""
    return "transformer_engine" in type(module).__module__ and name.rsplit(".", 1)[-1] in _LINEAR_ROLES


def apply_te_precision(model: torch.nn.Module, cfg: PrecisionConfig, *, num_layers: int,
                       amax_group=None) -> dict[str, Format]:
    """Wrap each TE linear's forward in the TE autocast of its policy format; returns {module name: format}."""
    import transformer_engine.pytorch as te

    formats: dict[str, Format] = {}
    wrapped = []
    for name, module in model.named_modules():
        if not _is_te_linear(name, module):
            continue
        leaf = name.rsplit(".", 1)[-1]
        role = "output_layer" if name == "output_layer" else leaf
        layer = None
        if name.startswith("decoder.layers."):
            layer_module = model.get_submodule(".".join(name.split(".")[:3]))
            layer = int(getattr(layer_module, "layer_number", int(name.split(".")[2]) + 1)) - 1
        fmt = linear_format(cfg, num_layers=num_layers, layer_index=layer, role=role, name=name,
                            is_mtp=name.startswith("mtp."))
        formats[name] = fmt
        wrapped.append((module, fmt))
    check_device_supports(cfg, set(formats.values()))
    for module, fmt in wrapped:
        recipe = _recipe(cfg, fmt) if fmt in LOW_PRECISION else None
        orig = module.forward

        def forward(*args, __orig=orig, __recipe=recipe, **kwargs):
            with te.fp8_autocast(enabled=__recipe is not None, fp8_recipe=__recipe, fp8_group=amax_group):
                return __orig(*args, **kwargs)

        module.forward = forward
    return formats
