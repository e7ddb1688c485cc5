"""CPU backend patches: Megatron-Core assumes CUDA in ~250 places (`torch.cuda.current_device()`, literal
`device="cuda"`, `.cuda()`, streams, CUDA RNG), and gloo refuses some collectives NCCL accepts. Process-level
patches, applied only for the `cpu` backend (model/adapt/__init__.py keys them), so GPU runs see upstream code
unchanged. Line numbers are megatron-core 0.19.2's.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types
from typing import Any

import torch
import torch.distributed as dist

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_like", "zeros_like", "ones_like", "full_like",
)


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spelling to the CPU; leave everything else alone."""
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorch(types.ModuleType):
    """A stand-in for the `torch` global of a Megatron-Core module: tensor factories asked for a CUDA device
    get the CPU instead; every other attribute is torch's own."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args: Any, __f=attr, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return __f(*args, **kwargs)
            return factory
        return attr


class _NoStream:
    """Stands in for torch.cuda.Stream / Event on CPU: everything runs in order on one stream anyway."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *a: Any, **k: Any) -> None: ...
    def wait_event(self, *a: Any, **k: Any) -> None: ...
    def record_event(self, *a: Any, **k: Any) -> "_NoStream": return _NoStream()
    def record(self, *a: Any, **k: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool: return True
    def wait(self, *a: Any, **k: Any) -> None: ...
    def elapsed_time(self, other: Any) -> float: return 0.0
    def __eq__(self, other: object) -> bool: return isinstance(other, _NoStream)
    def __hash__(self) -> int: return 0


_NO_STREAM = _NoStream()


def _patch_torch_cuda() -> None:
    """Items 1-2 of the reference: CUDA device queries, RNG and streams answered by the CPU."""
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # used as `device=` in ~250 places (e.g. tensor_parallel/mappings.py:91)
    # RNG: route to the CPU default generator. torch.cuda.manual_seed -> torch.manual_seed would recurse,
    # because torch.manual_seed calls torch.cuda.manual_seed_all; use the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # Streams and events (transformer/moe/token_dispatcher.py:866-890 uses a side stream for D2H copies).
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NoStream
    cuda.Event = _NoStream
    cuda.current_stream = lambda device=None: _NO_STREAM
    cuda.default_stream = lambda device=None: _NO_STREAM
    cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *a, **k: self  # `.cuda()` on CPU tensors: identity
    torch.Tensor.record_stream = lambda self, stream: None


def _patch_rng_tracker() -> None:
    """tensor_parallel/random.py:104 `_get_cuda_rng_state` and :135 `_set_cuda_rng_state` (0.19.2) read
    torch.cuda.default_generators, and the setter defers its work through torch's `_lazy_call`, which never runs
    without CUDA (forks silently stop restoring the stream); the CPU generator takes their place. The tracker's `fork` (random.py:251)
    then warns on every use that the CPU state changed, which is exactly what forking does here: silence it."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def _patch_moe_split_sizes() -> None:
    """moe_utils.py:1184 only moves CUDA tensors, so on CPU the all-to-all split sizes stay tensors and gloo's
    all_to_all_single raises TypeError: convert them as the GPU path would (token_dispatcher.py:927, which imports
    the name, is patched too)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_collectives() -> None:
    """tensor_parallel/mappings.py:150 gathers uneven chunks with a list all_gather and :193 reduce-scatters
    uneven chunks with a list reduce_scatter; NCCL accepts both, gloo refuses ("invalid tensor size") or lacks
    reduce_scatter. Same results through padding (gather) and all-reduce + slice (reduce-scatter)."""
    from megatron.core.tensor_parallel import mappings

    orig_gather = mappings._gather_along_first_dim
    orig_rs = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group is None or group.size() == 1:
            return orig_gather(input_, group, output_split_sizes, use_global_buffer)
        biggest = max(output_split_sizes)
        padded = input_.new_zeros((biggest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(chunks, padded.contiguous(), group=group)
        return torch.cat([c[:n] for c, n in zip(chunks, output_split_sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group is None or group.size() == 1:
            return orig_rs(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start:start + input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def _patch_batched_p2p() -> None:
    """pipeline_parallel/p2p_communication.py:16 `_batched_p2p_ops` (used when `batch_p2p_comm`, the default) posts
    [send_prev, recv_prev, send_next, recv_next] all with tag 0. With pp=2 the previous and the next stage are the
    same peer, and the interleaved schedule sends a gradient back and an activation forward to it in one batch;
    gloo matches same-peer, same-tag messages in posting order, so the peer's recv_prev (activation) got the
    gradient and its recv_next the activation: same shapes, no error, wrong training (measured: loss 3e-5, step-1
    grads 6e-2..1.3 relative off the 1-process run). Tag each direction (activations forward, gradients backward)
    so every receive matches the send meant for it; other backends keep upstream's function."""
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    orig = p2p._batched_p2p_ops
    forward_tag, backward_tag = 1, 2  # activations flow send_next -> recv_prev, gradients send_prev -> recv_next

    def _batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group,
                         prev_pipeline_rank, next_pipeline_rank):
        if dist.get_backend(group) != "gloo":
            return orig(tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
                        tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next, group=group,
                        prev_pipeline_rank=prev_pipeline_rank, next_pipeline_rank=next_pipeline_rank)
        ops = [dist.P2POp(op, t, peer, group, tag) for op, t, peer, tag in (
            (dist.isend, tensor_send_prev, prev_pipeline_rank, backward_tag),
            (dist.irecv, tensor_recv_prev, prev_pipeline_rank, forward_tag),
            (dist.isend, tensor_send_next, next_pipeline_rank, forward_tag),
            (dist.irecv, tensor_recv_next, next_pipeline_rank, backward_tag)) if t is not None]
        return dist.batch_isend_irecv(ops) if ops else []

    p2p._batched_p2p_ops = _batched_p2p_ops


def _cpu_torch_for(module: types.ModuleType) -> None:
    if module.__name__.startswith("megatron.core") and getattr(module, "torch", None) is torch:
        module.torch = _CPU_TORCH


class _MegatronImportHook:
    """Gives every megatron.core module imported after `apply()` the same `torch` view as those before."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not name.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                orig_exec = spec.loader.exec_module

                def exec_module(module: types.ModuleType, __orig=orig_exec) -> None:
                    __orig(module)
                    _cpu_torch_for(module)

                spec.loader.exec_module = exec_module
                return spec
            if spec is not None:
                return spec
        return None


def _patch_cuda_literals() -> None:
    """About 20 Megatron-Core modules create tensors with a literal `device="cuda"` (pipeline_parallel/
    schedules.py:596/983/2138, transformer/utils.py:35 causal mask, optimizer/clip_grads.py, moe_utils.py,
    param_and_grad_buffer.py, ...). Their `torch` global becomes a view of torch whose tensor factories map
    CUDA to CPU, for modules already imported and (through an import hook) those imported later;
    `Tensor.to("cuda")` maps to the CPU likewise."""
    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType):
            _cpu_torch_for(module)
    sys.meta_path.insert(0, _MegatronImportHook())
    orig_to = torch.Tensor.to

    def to(self, *args: Any, **kwargs: Any) -> Any:
        if args and not isinstance(args[0], torch.dtype) and not torch.is_tensor(args[0]):
            args = (_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return orig_to(self, *args, **kwargs)

    torch.Tensor.to = to


def _patch_triton_free_imports() -> None:
    """ssm/mamba_mixer.py:22 imports `inference/contexts/attention_context/triton/tensor_ops.py`, which does
    `import triton` at module level (ModuleNotFoundError on a CPU-only torch), although its three functions are
    only used by dynamic-batching inference (mamba_mixer.py:451 `_dynamic_inference`). Without triton, that
    module is registered with the same three names raising a clear error, so MambaMixer (subclassed by the CPU
    Mamba path in model/layers.py) imports. (Added by the model engineer, issue 4.)"""
    try:
        import triton  # noqa: F401
        return
    except ImportError:
        pass
    name = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    if name in sys.modules:
        return
    mod = types.ModuleType(name)

    def _needs_triton(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("dynamic-batching Mamba inference needs triton (GPU); not available on CPU")

    mod.tensor_get_slice_after = mod.tensor_merge = mod.tensor_masked_update = _needs_triton
    sys.modules[name] = mod


_CPU_TORCH = _CpuTorch()

_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def cpu_type_names():
    """Megatron-Core's optimizers classify parameters by `param.type()` strings only CUDA tensors have
    (optimizer/clip_grads.py:167 asserts 'torch.cuda.FloatTensor'; distrib_optimizer.py:361,420,582 and
    optimizer.py:671,690 raise "Wrapped parameters must be one of torch.cuda.FloatTensor ..."). While active and
    for the cpu backend, a CPU tensor's zero-argument `.type()` answers the CUDA name of its dtype. A context, not part of
    `apply()`: wrap optimizer construction and `step()` only, so nothing else in the process sees the change."""
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return orig(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = orig
