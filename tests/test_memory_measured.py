"""The memory model's `local` profile against real CPU forward/backward passes of the test presets: parameters
per rank exactly, activations (tensors saved for backward, each storage counted once) within 10%, on one rank
and on TP2+SP / EP2 gloo ranks."""
from __future__ import annotations

import pytest
import torch

from parallel.layout import ParallelLayout
from parallel.memory import MemoryOptions, rank_params, stage_activation_bytes


def measure_saved_bytes(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> tuple[int, int]:
    """(bytes of distinct storages saved for backward by one forward, parameters on this rank). Parameters and
    their views are excluded: they are weights, not activations."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, pos, None, labels=ids)
    loss.float().mean().backward()
    return sum(seen.values()), sum(p.numel() for p in model.parameters())


def _measure_rank(preset: str, tp: int, ep: int, seq: int, mbs: int) -> dict:
    from megatron.core import parallel_state

    from model.build import build_model, init_single_process, transformer_config
    from model.presets import get_preset

    cfg = get_preset(preset)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    sp = tp > 1
    if world == 1:
        init_single_process(seed=7)
    elif not parallel_state.model_parallel_is_initialized():
        from model.build import _mcore

        _mcore()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                                 expert_tensor_parallel_size=1)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(7)
    tc = transformer_config(cfg, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                            expert_tensor_parallel_size=1, sequence_parallel=sp)
    model = build_model(cfg, config=tc)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (mbs, seq), generator=g)
    pos = torch.arange(seq).expand(mbs, seq)
    saved, nparams = measure_saved_bytes(model, ids, pos)
    return {"saved": saved, "params": nparams}


def _predict(preset: str, tp: int, ep: int, seq: int, mbs: int) -> tuple[float, int]:
    from model.presets import get_preset

    cfg = get_preset(preset)
    layout = ParallelLayout(tp=tp, ep=ep, sequence_parallel=tp > 1)
    opts = MemoryOptions(seq_length=seq, micro_batch_size=mbs, global_batch_size=mbs, profile="local",
                         activation_bytes=4.0)
    rp = rank_params(cfg, layout)
    return stage_activation_bytes(cfg, layout, opts, 0), rp.dense + rp.expert


@pytest.mark.parametrize("preset,seq,mbs", [("tiny", 64, 2), ("tiny", 128, 1), ("tiny-nolatent", 96, 2)])
def test_one_rank_activations_and_params_match_measurement(preset, seq, mbs):
    got = _measure_rank(preset, 1, 1, seq, mbs)
    act, params = _predict(preset, 1, 1, seq, mbs)
    assert params == got["params"]
    assert abs(act - got["saved"]) / got["saved"] < 0.10, (act, got["saved"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_tp2_and_ep2_ranks_match_measurement(tp, ep):
    from tests.distributed import run_on_ranks

    results = run_on_ranks(_measure_rank, 2, "tiny", tp, ep, 64, 2)
    act, params = _predict("tiny", tp, ep, 64, 2)
    for r in results:
        assert r["params"] == params
        assert abs(act - r["saved"]) / r["saved"] < 0.10, (tp, ep, act, r["saved"])
