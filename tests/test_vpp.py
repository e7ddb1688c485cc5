"""Interleaved (virtual) pipeline stages of the hybrid stack: each model chunk holds exactly the layers Megatron-Core
places there, with global layer numbers, so Mamba layers (numbered by our stack) and attention/MLP/MoE layers
(numbered by TransformerLayer itself) agree and checkpoints line up with the 1-process model."""
import pytest

from model.pattern import pipeline_chunks
from tests.distributed import run_on_ranks

PATTERN = "M*-EM*-E"  # every layer kind twice; 8 layers -> pp2 x vpp2 = 4 chunks of 2


def test_chunks_follow_megatron_placement():
    """pipeline_chunks against Megatron-Core's own get_transformer_layer_offset / get_num_layers_to_build, even and
    uneven (first/last stage sizes), and they tile the pattern once each in interleaved order."""
    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from model.build import transformer_config
    from model.presets import get_preset

    cases = [("M*-EM*-E", 2, 2, None, None), ("M*-EM*-EM*-E", 3, 2, None, None), ("M*-E" * 4, 2, 4, None, None),
             ("M*-EM*-EM*-EM*", 3, 2, 2, 4), ("M*-E" * 4, 3, 2, None, 4), ("M*-EM*-EM*-EM*", 2, 2, 6, None),
             ("M*-EM*-E", 2, None, 2, None)]
    for pattern, pp, vpp, first, last in cases:
        chunks = pipeline_chunks(pattern, pp, vpp, first, last)
        assert "".join(c.pattern for c in chunks) == pattern
        assert [c.offset for c in chunks] == sorted(c.offset for c in chunks)
        assert [(c.vp_stage, c.pp_rank) for c in chunks] == [(v, r) for v in range(vpp or 1) for r in range(pp)]
        tc = transformer_config(get_preset("tiny", hybrid_override_pattern=pattern, num_layers=len(pattern),
                                           mtp_num_layers=0),
                                pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                                pipeline_dtype=torch.float32)
        for c in chunks:
            vp = c.vp_stage if vpp else None
            assert get_transformer_layer_offset(tc, vp, c.pp_rank) == c.offset, (pattern, pp, vpp, first, last, c)
            assert get_num_layers_to_build(tc, vp, c.pp_rank) == len(c.pattern), (pattern, pp, vpp, first, last, c)
    assert [c.pattern for c in pipeline_chunks(PATTERN, 2, 2)] == ["M*", "-E", "M*", "-E"]
    assert [(c.pp_rank, c.offset) for c in pipeline_chunks(PATTERN, 2, 2)] == [(0, 0), (1, 2), (0, 4), (1, 6)]


@pytest.mark.parametrize("args,words", [
    ((PATTERN, 2, 3), ["stage 0 holds 4 layers", "vpp=3"]),
    ((PATTERN, 1, 2), ["pp=1", "vpp=2"]),
    (("M*-E" * 4, 2, 2, 3, None), ["num_layers_in_first_pipeline_stage", "multiple of 2"]),
    (("M*-EM*-EM*-EM*-", 3, 2, 2, 5), ["num_layers_in_last_pipeline_stage", "multiple of 2"]),
    (("M*-EM*-EM*-EM*", 2, 2, 6, 8), ["pp=2", "set only num_layers_in_first_pipeline_stage"]),
])
def test_bad_interleaved_splits_named(args, words):
    with pytest.raises(ValueError) as e:
        pipeline_chunks(*args)
    assert all(w in str(e.value) for w in words), str(e.value)


def _chunk_layers(pp: int, vpp: int):
    """On one rank: build every virtual chunk and report its layers as (global layer number, symbol), plus the
    sharded_state_dict layer keys, which Megatron derives from layer_number - 1."""
    from model.presets import get_preset
    from tests.pipeline_chunks import rank_chunks

    cfg = get_preset("tiny", hybrid_override_pattern=PATTERN, num_layers=len(PATTERN), mtp_num_layers=0)
    with rank_chunks(cfg, pp, vpp) as chunks:
        from megatron.core import parallel_state as ps
        from megatron.core.ssm.mamba_layer import MambaLayer
        from megatron.core.ssm.mlp_layer import MLPLayer
        from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

        out = []
        for v, m in enumerate(chunks):
            layers = []
            for layer in m.decoder.layers:
                kind = ("M" if isinstance(layer, MambaLayer) else "E" if isinstance(layer, MoETransformerLayer) else
                        "-" if isinstance(layer, MLPLayer) else "*" if isinstance(layer, TransformerLayer) else "?")
                layers.append((layer.layer_number, kind))
            # The checkpoint keys (ShardedTensor.key), not the dict keys, which stay chunk-local.
            keys = sorted({int(v.key.split(".")[2]) for v in m.sharded_state_dict().values()
                           if getattr(v, "key", "").startswith("decoder.layers.")})
            out.append(dict(rank=ps.get_pipeline_model_parallel_rank(), vp=v, layers=layers, keys=keys,
                            vp_stage=m.vp_stage, embedding=hasattr(m, "embedding"),
                            output=hasattr(m, "output_layer"), final_norm=hasattr(m.decoder, "final_norm")))
        return out


@pytest.mark.multiproc
def test_pp2_vpp2_chunks_hold_the_pattern_once_in_interleaved_order():
    chunks = [c for rank in run_on_ranks(_chunk_layers, 2, 2, 2, timeout=300) for c in rank]
    # Megatron's interleaved order: virtual stage 0 over ranks 0, 1, then virtual stage 1 over ranks 0, 1.
    chunks.sort(key=lambda c: (c["vp"], c["rank"]))
    assert [(c["vp"], c["rank"]) for c in chunks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    flat = [layer for c in chunks for layer in c["layers"]]
    assert flat == [(i + 1, s) for i, s in enumerate(PATTERN)], flat
    for c in chunks:
        assert c["keys"] == [n - 1 for n, _ in c["layers"]], c
        assert c["vp_stage"] == c["vp"]
    assert [c["embedding"] for c in chunks] == [True, False, False, False]
    assert [c["output"] for c in chunks] == [False, False, False, True]
    assert [c["final_norm"] for c in chunks] == [False, False, False, True]


def _exchange_both_ways(_):
    """pp=2: each rank sends an activation to its next stage and a gradient to its previous one, the same peer,
    in one batch, through Megatron-Core's own batched p2p function."""
    import torch
    import torch.distributed as dist

    from model import adapt

    adapt.apply("cpu")
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    act, grad = torch.full((4,), 10.0 + rank), torch.full((4,), 20.0 + rank)
    recv_prev, recv_next = torch.zeros(4), torch.zeros(4)
    for req in p2p._batched_p2p_ops(tensor_send_prev=grad, tensor_recv_prev=recv_prev, tensor_send_next=act,
                                    tensor_recv_next=recv_next, group=dist.group.WORLD, prev_pipeline_rank=peer,
                                    next_pipeline_rank=peer):
        req.wait()
    return float(recv_prev[0]), float(recv_next[0])


@pytest.mark.multiproc
def test_batched_p2p_pairs_activations_and_gradients_on_gloo():
    """Without the adaptation layer's tagging (cpu.batched_p2p_tags), gloo delivered the gradient into recv_prev and the activation into
    recv_next (posting order), and pp2-vpp2 trained on swapped tensors."""
    got = run_on_ranks(_exchange_both_ways, 2, None, timeout=120)
    assert got == [(11.0, 21.0), (10.0, 20.0)]
