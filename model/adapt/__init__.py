"""The Megatron-Core adaptation layer: every patch of Megatron-Core, and every reach into its private names, is here.

One entry point, `apply(backend)`, installs the patches this process needs, each keyed on what it depends on:
the installed megatron-core version, the backend (`te` / `local` / `cpu`, model/backend.py) and which optional
packages import. `PATCHES` lists them all with the upstream line each works around; `applied()` says which are
active. A patch that a future Megatron-Core makes unnecessary shows up at once: each one has a removal test
(tests/test_adapt.py) that runs a scenario with `FOLDTRON_ADAPT_SKIP=<name>` and expects it to fail.

Contexts that are not process-wide (optimizer-state shims around save/load, the CPU tensor-type names around the
optimizer, layer-construction stand-ins) live in this package too and honour the same skip switch.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..backend import resolve_backend
from . import private  # noqa: F401  (model.adapt.private is part of the entry point)


@dataclass(frozen=True)
class Env:
    """What the patches are keyed on."""

    mcore: tuple[int, int, int]
    backend: str
    te: bool
    mamba_ssm: bool
    triton: bool


@dataclass(frozen=True)
class Patch:
    name: str
    works_around: str                  # upstream file:line (megatron-core 0.19.2) and what goes wrong without it
    needed: Callable[[Env], bool]      # the key: version / backend / packages
    install: Optional[Callable[[], None]] = None   # None: a context used at its call site (see `enabled`)


def _version(text: str) -> tuple[int, int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def mcore_version() -> tuple[int, int, int]:
    from importlib.metadata import version

    return _version(version("megatron-core"))


SUPPORTED = ((0, 19, 0), (0, 20, 0))  # [low, high): the range these patches were written and tested against


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def active_backend() -> Optional[str]:
    """The backend this process's patches were installed for (None before `apply`)."""
    return _ACTIVE[0] if _ACTIVE else None


def environment(backend: Optional[str] = None) -> Env:
    info = resolve_backend(backend or active_backend())
    return Env(mcore=mcore_version(), backend=info.name, te=info.name == "te", mamba_ssm=info.mamba_kernels == "mamba-ssm",
               triton=_has("triton"))


def _cpu(e: Env) -> bool:
    return e.backend == "cpu"


def _install(module: str, func: str) -> Callable[[], None]:
    def run() -> None:
        mod = importlib.import_module(f"{__name__}.{module}")
        getattr(mod, func)()
    return run


PATCHES: tuple[Patch, ...] = (
    Patch("cpu.torch_cuda", "~250 sites call torch.cuda.current_device()/Stream/Event/manual_seed (e.g. "
          "tensor_parallel/random.py model_parallel_cuda_manual_seed); without CUDA they raise",
          _cpu, _install("cpu", "_patch_torch_cuda")),
    Patch("cpu.rng_tracker", "tensor_parallel/random.py _get_cuda_rng_state/_set_cuda_rng_state read "
          "torch.cuda.default_generators; the RNG tracker's fork fails on CPU", _cpu, _install("cpu", "_patch_rng_tracker")),
    Patch("cpu.cuda_literals", "literal device='cuda' tensors in pipeline_parallel/schedules.py, transformer/utils.py "
          "causal mask, optimizer/clip_grads.py, distributed/param_and_grad_buffer.py, moe_utils.py",
          _cpu, _install("cpu", "_patch_cuda_literals")),
    Patch("cpu.moe_split_sizes", "moe_utils.py:1184 maybe_move_tensor_to_cpu converts only CUDA tensors: the "
          "all-to-all split sizes stay tensors and gloo all_to_all_single raises TypeError (EP > 1)",
          _cpu, _install("cpu", "_patch_moe_split_sizes")),
    Patch("cpu.uneven_collectives", "tensor_parallel/mappings.py _gather_along_first_dim/_reduce_scatter_along_first_dim "
          "use list collectives with uneven sizes, which gloo refuses (TP x EP with sequence parallelism)",
          _cpu, _install("cpu", "_patch_uneven_collectives")),
    Patch("cpu.batched_p2p_tags", "pipeline_parallel/p2p_communication.py _batched_p2p_ops posts every direction with "
          "tag 0; gloo matches pp=2 same-peer messages crosswise under the interleaved schedule (silently wrong)",
          _cpu, _install("cpu", "_patch_batched_p2p")),
    Patch("cpu.triton_free_imports", "ssm/mamba_mixer.py imports inference/.../triton/tensor_ops.py, which imports "
          "triton at module level (dynamic-batching inference only)",
          lambda e: not e.triton, _install("cpu", "_patch_triton_free_imports")),
    Patch("cpu.tensor_type_names", "optimizer/distrib_optimizer.py and optimizer.py classify parameters by "
          "param.type() == 'torch.cuda.FloatTensor' and raise for CPU tensors (a context around the optimizer)", _cpu),
    Patch("local.cp_attention", "transformer/dot_product_attention.py asserts context_parallel_size == 1: CP "
          "attention exists only in TE; exact all-gather-KV attention for the local/CPU backends",
          lambda e: not e.te, _install("context_parallel", "install")),
    Patch("mtp.cp_global_token_counts", "transformer/multi_token_prediction.py:760 process_mtp_loss normalises each "
          "depth by CP-local token counts: under CP the MTP gradient depends on the layout (~0.6% at cp2)",
          lambda e: True, _install("mtp_loss", "install")),
    Patch("moe.expert_params_always_expert_parallel", "tensor_parallel/layers.py:961 (and TE's "
          "_set_expert_parameter_attributes, extensions/transformer_engine.py:91) mark experts allreduce=False only "
          "when ep > 1 or etp != tp: the optimizer chain (checkpoint keys chained_0/1) then depends on the layout",
          lambda e: True, _install("moe", "install_expert_marking")),
    Patch("stand_in.mamba_mixer_without_mamba_ssm", "ssm/mamba_mixer.py:202 refuses to build without mamba-ssm and takes "
          "its gated norm from it (ExtendedRMSNorm over a MagicMock): the torch-scan mixer builds with Foldtron's norm",
          lambda e: not e.mamba_ssm),
    Patch("stand_in.latent_moe_without_te", "transformer/moe/moe_layer.py:266 asserts TE for the LatentMoE projections "
          "(TELinear parallel_mode='duplicated'): built as an equivalent torch linear with the same names",
          lambda e: not e.te),
    Patch("optimizer.empty_expert_optimizer_step", "optimizer/distrib_optimizer.py state_dict asserts one 'step' per "
          "optimizer; a pipeline rank without expert parameters has none (pp2-vpp2 of 'M*-EM*-E')", lambda e: True),
    Patch("optimizer.unpadded_param_index_maps", "optimizer/distrib_optimizer.py fully-reshardable save slices the "
          "unpadded gathered state with padded param_index_map offsets: a second bucket shifts every later "
          "parameter's state onto its neighbour (MTP embedding copy under pp)", lambda e: True),
    Patch("optimizer.torch_adam_step", "optimizer/distrib_optimizer.py fully_reshardable load copies every state "
          "key from the checkpoint, which skips 'step': KeyError('step') with torch Adam (no apex/TE)",
          lambda e: not e.te),
)
_BY_NAME = {p.name: p for p in PATCHES}
_APPLIED: dict[str, Patch] = {}
_ACTIVE: list[str] = []  # the backend the first apply() chose; later calls without one reuse it


def skipped() -> set[str]:
    """Patches switched off with FOLDTRON_ADAPT_SKIP=name[,name...] (for the removal tests)."""
    names = {n.strip() for n in os.environ.get("FOLDTRON_ADAPT_SKIP", "").split(",") if n.strip()}
    unknown = names - set(_BY_NAME)
    if unknown:
        raise ValueError(f"FOLDTRON_ADAPT_SKIP names unknown patches {sorted(unknown)}; known: {sorted(_BY_NAME)}")
    return names


def enabled(name: str, backend: Optional[str] = None) -> bool:
    """Whether the patch or context `name` applies in this process (keyed, and not skipped)."""
    return name not in skipped() and _BY_NAME[name].needed(environment(backend))


def check_version() -> None:
    v = mcore_version()
    if not SUPPORTED[0] <= v < SUPPORTED[1]:
        raise RuntimeError(f"megatron-core {'.'.join(map(str, v))} is installed; Foldtron's adaptation layer is written "
                           f"and tested for {'.'.join(map(str, SUPPORTED[0]))} <= version < "
                           f"{'.'.join(map(str, SUPPORTED[1]))} (pip install 'megatron-core>=0.19.2,<0.20')")


def apply(backend: Optional[str] = None) -> list[str]:
    """Install every process-wide patch this environment needs (idempotent); returns the active names."""
    check_version()
    env = environment(backend)
    skip = skipped()
    if _ACTIVE and env.backend != _ACTIVE[0]:
        raise RuntimeError(f"this process runs the {_ACTIVE[0]!r} backend (its patches are installed); backend "
                           f"{env.backend!r} needs a new process")
    if not _ACTIVE:
        _ACTIVE.append(env.backend)
    from . import warnings as _w

    _w.install()
    for p in PATCHES:
        if p.install is None or p.name in _APPLIED or p.name in skip or not p.needed(env):
            continue
        p.install()
        _APPLIED[p.name] = p
    return applied()


def applied() -> list[str]:
    return list(_APPLIED)


def cpu_type_names():
    """Context: CPU tensors answer CUDA type names to Megatron's optimizers (cpu backend only)."""
    from contextlib import nullcontext

    from . import cpu

    return cpu.cpu_type_names() if enabled("cpu.tensor_type_names") else nullcontext()


def on_cpu() -> bool:
    """Whether the cpu backend's patches are active in this process."""
    return "cpu.torch_cuda" in _APPLIED


def current_device() -> torch.device:
    """The device the active backend's tensors live on (before `apply`: the backend `auto` would pick)."""
    if on_cpu() or resolve_backend(active_backend()).device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
