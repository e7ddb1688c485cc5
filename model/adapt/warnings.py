"""Known-harmless warnings from Megatron-Core and torch, silenced by their exact message so a new one still shows.
`foldtron --verbose` (FOLDTRON_VERBOSE=1) shows them all."""
from __future__ import annotations

import logging
import os
import re
import warnings

# (category, message regex, why it is harmless on Foldtron's paths)
KNOWN: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to .*",
     "CPU / local backends: torch optimizers and multi-tensor fallbacks are the intended path"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", "norms are Foldtron's TorchNorm anyway"),
    (UserWarning, r"Apex is not installed\..*", "apex is optional (NGC containers have it)"),
    (DeprecationWarning, r".*", "third-party deprecations (Megatron-Core, torch, setuptools) are upstream's to fix"),
    (FutureWarning, r".*torch\.(cuda\.amp|distributed\._shard|utils\._pytree).*", "torch API moves inside Megatron-Core"),
    (UserWarning, r"No CUDA runtime is found.*", "CPU machines with the PyPI (CUDA) torch build"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_modules to capture the whole layer\.",
     "TransformerConfig re-validates its own default CUDA-graph scope (transformer_config.py:2415); no CUDA graphs"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|"
     r"_reduce_scatter_base)` is deprecated.*", "collectives Megatron-Core calls; torch keeps them working"),
    (UserWarning, r"MCore's async save is deprecated.*", "Foldtron saves synchronously through dist_checkpointing"),
)
# Log records (Megatron-Core logs through `logging`, some at WARNING on every layer).
KNOWN_LOGS: tuple[str, ...] = (
    r"DEPRECATION: Using hybrid_layer_pattern without pipe",
    r"Rewrapping ModuleSpec with module",
    r"HybridModel: pp_rank=",
    r"No CUDA runtime is found",
    r"MCore's async save is deprecated",
)
_INSTALLED = False


class _KnownLogs(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in KNOWN_LOGS]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def verbose() -> bool:
    return os.environ.get("FOLDTRON_VERBOSE", "") not in ("", "0")


def install() -> None:
    global _INSTALLED
    if _INSTALLED or verbose():
        return
    for category, pattern, _why in KNOWN:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    flt = _KnownLogs()
    # A logger's filters see only records logged on it (not its children's): name the emitting modules.
    for name in ("megatron.core.models.hybrid.hybrid_layer_allocation", "megatron.core.models.hybrid.hybrid_model",
                 "megatron.core.transformer.transformer_layer", "megatron.core.dist_checkpointing.strategies.torch",
                 "torch.utils.cpp_extension"):
        logging.getLogger(name).addFilter(flt)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    _INSTALLED = True
