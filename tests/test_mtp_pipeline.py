"""Hybrid MTP under pipeline parallelism: where the block and its embedding copy live, and that the copy starts equal
to the first stage's embedding. The training-equality proof (loss, reduced gradients, parameters after 3 steps equal
to one process) is in tests/test_parallel_matrix.py (rows pp2, pp2-vpp2, tp2-ep2-pp2); it loads its initial weights
from a checkpoint, so the construction-time sync checked here is not covered there."""
from __future__ import annotations

import pytest

from tests.distributed import run_on_ranks


def _chunks(pp: int, vpp):
    """On one rank: build every chunk of the MTP test preset without loading anything and describe it."""
    from model.presets import get_preset
    from tests.pipeline_chunks import rank_chunks

    cfg = get_preset("tiny", hybrid_override_pattern="M*-EM*-E", num_layers=8)
    with rank_chunks(cfg, pp, vpp) as chunks:
        from megatron.core import parallel_state as ps

        out = []
        for v, m in enumerate(chunks):
            emb = m.embedding.word_embeddings.weight if hasattr(m, "embedding") else None
            sd = m.sharded_state_dict()
            emb_entry = sd.get("embedding.word_embeddings.weight")
            out.append(dict(
                rank=ps.get_pipeline_model_parallel_rank(), vp=v, mtp=hasattr(m, "mtp"),
                nparams=sum(p.numel() for p in m.parameters()),
                # numpy, not a tensor: torch shares tensors between processes through fds that die with the rank.
                embedding=None if emb is None else emb.detach().numpy().copy(),
                shared=bool(getattr(emb, "shared", False)),
                emb_key=None if emb_entry is None else (emb_entry.key, emb_entry.replica_id[0]),
                mtp_keys=sorted({v.key for v in sd.values() if getattr(v, "key", "").startswith("mtp.")})))
        return out


@pytest.fixture(scope="module")
def built_chunks():
    """The chunks of pp=2 (vpp None or 2) on 2 ranks, built once per module for the tests below."""
    made: dict = {}

    def get(vpp):
        if vpp not in made:
            made[vpp] = [c for rank in run_on_ranks(_chunks, 2, 2, vpp, timeout=300) for c in rank]
        return made[vpp]
    return get


@pytest.mark.multiproc
@pytest.mark.parametrize("vpp", [None, 2], ids=["pp2", "pp2-vpp2"])
def test_mtp_on_last_chunk_with_an_embedding_copy_equal_to_the_first_stage(built_chunks, vpp):
    chunks = built_chunks(vpp)
    last_vp = (vpp or 1) - 1
    (first,) = [c for c in chunks if c["rank"] == 0 and c["vp"] == 0]
    (last,) = [c for c in chunks if c["rank"] == 1 and c["vp"] == last_vp]
    # MTP only on the last stage's last virtual chunk (Megatron-Core's mtp_on_this_rank); embeddings only there
    # and on the first chunk.
    assert [c["mtp"] for c in chunks].count(True) == 1 and last["mtp"]
    assert [c["embedding"] is not None for c in chunks].count(True) == 2
    # The copy was zeroed and all-reduced with the first stage's at construction: equal, and non-trivial.
    assert (first["embedding"] == last["embedding"]).all() and abs(first["embedding"]).sum() > 0
    assert last["shared"] and not first["shared"]
    # One checkpoint key: the copy is replica 1 of the first stage's tensor.
    assert first["emb_key"] == ("embedding.word_embeddings.weight", 0)
    assert last["emb_key"] == ("embedding.word_embeddings.weight", 1)
    # The MTP block's layers are numbered on their own (0, 1), not from the last stage's decoder offset.
    layer_ids = {k.split(".")[5] for k in last["mtp_keys"] if k.startswith("mtp.layers.0.mtp_model_layer.layers.")}
    assert layer_ids == {"0", "1"}, last["mtp_keys"]


def test_mtp_chunk_must_be_the_output_chunk():
    """MTP's losses need the output layer: building the MTP chunk without post_process is refused by name."""
    import torch

    from model.build import build_model, init_single_process, transformer_config
    from model.presets import get_preset

    init_single_process(seed=1234)
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="MTP runs on the last pipeline stage's last virtual chunk"):
        build_model(cfg, post_process=False)
    with pytest.raises(ValueError, match="mtp_num_layers"):
        build_model(cfg, config=transformer_config(get_preset("tiny", mtp_num_layers=0),
                                                   params_dtype=torch.float32))


@pytest.mark.multiproc
def test_memory_model_counts_each_stages_parameters_including_the_embedding_copy(built_chunks):
    """parallel/memory.py's per-stage parameter count (what the planner sizes weights, grads and optimizer state
    from) equals the built pp=2 model's, the last stage's MTP embedding copy included."""
    from model.presets import get_preset
    from parallel.layout import ParallelLayout
    from parallel.memory import rank_params

    cfg = get_preset("tiny", hybrid_override_pattern="M*-EM*-E", num_layers=8)
    built = {c["rank"]: c["nparams"] for c in built_chunks(None)}
    for stage in (0, 1):
        rp = rank_params(cfg, ParallelLayout(pp=2), stage)
        assert rp.dense + rp.expert == built[stage], (stage, rp, built)
