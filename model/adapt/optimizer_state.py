"""Distributed-optimizer state shims around checkpoint save/load (contexts, not process-wide patches). Each is
keyed in model/adapt/__init__.py and honours FOLDTRON_ADAPT_SKIP; line numbers are megatron-core's
optimizer/distrib_optimizer.py."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from . import enabled


@contextlib.contextmanager
def empty_expert_optimizer_step(optimizer: Any) -> Iterator[None]:
    """A pipeline rank can hold no expert parameter at all (pp2-vpp2 of "M*-EM*-E": rank 0 builds "M*" twice), and
    then its expert optimizer has param groups without params and no per-parameter state. Without apex/TE,
    Megatron's DistributedOptimizer.state_dict reads the step from that state and asserts there is exactly one
    (distrib_optimizer.py:640). Such an optimizer reports the step of its non-empty siblings (0 if none); its
    param groups are the same as on the ranks that do hold expert parameters."""
    if not enabled("optimizer.empty_expert_optimizer_step"):
        yield
        return
    chain = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    inners = [getattr(opt, "optimizer", None) for opt in chain]
    steps = [float(st["step"]) for inner in inners if inner is not None
             for st in inner.state.values() if torch.is_tensor(st.get("step"))]
    step = max(steps, default=0.0)
    patched = []
    for inner in inners:
        if inner is None or len(inner.state) or any(g["params"] for g in inner.param_groups):
            continue
        orig = inner.state_dict

        def state_dict(orig=orig):
            sd = orig()
            return dict(sd, state={0: {"step": torch.tensor(step)}})

        inner.state_dict = state_dict
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner.state_dict  # back to the class method


@contextlib.contextmanager
def unpadded_param_index_maps(optimizer: Any) -> Iterator[None]:
    """Megatron-Core's (0.16.1 and 0.19.2) fully-reshardable distributed-optimizer state is gathered into one tensor per grad
    buffer with the padding between buckets removed (distrib_optimizer.py, get_parameter_state_dp_zero: "gets rid of
    the padding between buckets"), but `sharded_param_state_fully_reshardable` slices it with the buffer's padded
    `param_index_map` offsets. With one bucket per buffer the two agree; a second bucket (DDP gives a shared-embedding
    parameter its own, e.g. the last stage's MTP embedding copy under pp) shifts every later parameter's saved state
    onto its neighbour, silently. For the duration of the call, give each buffer a map in the unpadded coordinates
    the gathered tensor uses; loading reads by parameter order only, so it is unaffected either way."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not enabled("optimizer.unpadded_param_index_maps"):
        yield
        return

    swapped = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for buf in opt.buffers:
            shift, unpadded = {}, 0
            for i, bucket in enumerate(buf.buckets):
                shift[i] = unpadded - bucket.offset
                unpadded += bucket.numel_unpadded
            swapped.append((buf, buf.param_index_map))
            buf.param_index_map = {p: (s + shift[b], e + shift[b], b) for p, (s, e, b) in buf.param_index_map.items()}
    try:
        yield
    finally:
        for buf, original in swapped:
            buf.param_index_map = original


@contextlib.contextmanager
def torch_adam_step() -> Iterator[None]:
    """Without apex/TE, Megatron's DistributedOptimizer runs torch Adam, whose per-parameter state has a 'step'
    that load_state_dict puts there itself (distrib_optimizer.py:817-825); the fully_reshardable loader then
    copies every state key from the checkpoint tensors, which skip 'step' on purpose (:2101), and raises
    KeyError('step') (:940). Keep the step already set for keys the checkpoint does not carry."""
    from megatron.core.optimizer import distrib_optimizer as do

    if getattr(do, "HAVE_APEX_OR_TE", True) or not enabled("optimizer.torch_adam_step"):
        yield
        return
    orig = do.DistributedOptimizer._set_main_param_and_optimizer_states

    def patched(self, model_param, tensors):
        if "step" not in tensors:
            gi, go = self.model_param_group_index_map[model_param]
            st = self.optimizer.state[self.optimizer.param_groups[gi]["params"][go]]
            if "step" in st:
                tensors = dict(tensors, step=st["step"])
        return orig(self, model_param, tensors)

    do.DistributedOptimizer._set_main_param_and_optimizer_states = patched
    try:
        yield
    finally:
        do.DistributedOptimizer._set_main_param_and_optimizer_states = orig


def unshare_adam_steps(optimizer: Any) -> None:
    """The same non-apex path gives every parameter's state one shared 'step' tensor (distrib_optimizer.py:825);
    torch Adam increments each state's step in place, so a shared one advances once per parameter per update
    and the bias correction goes wrong after a resume. Each state gets its own copy."""
    if not enabled("optimizer.torch_adam_step"):
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
