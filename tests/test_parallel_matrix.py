"""The parallelism matrix: every layout of the hybrid test model (all layer kinds, LatentMoE, MTP) trains exactly
like one process.

How: a 1-process reference saves its initial weights as a Megatron-Core distributed checkpoint; each layout loads
them (dist_checkpointing reshards TP/EP/PP/fused-Mamba layouts for us), runs 3 optimizer steps through the
production step (`pretrain.train.train_step`, the function `foldtron train` runs, with its DDP wrapping, optimizer,
forward step and CP batch split), and saves its reduced gradients of step 1 and its parameters after step 3 as
distributed checkpoints. Loading those back unsharded and comparing tensor by tensor with the reference checks
every rank's shard at once. Loss per step and gradients: within 1e-5 relative (fp32), parameters likewise.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.distributed import run_on_ranks

SEQ, MBS, GBS, STEPS = 32, 1, 4, 3
RTOL = 1e-5
# Adam's eps for the comparison. With the production 1e-8, g/(sqrt(v)+eps) is ~sign(g): an element whose exact
# gradient is ~0 (a cancellation, e.g. embedding rows) carries only fp32 summation-order noise, which differs by
# layout and which Adam turns into a full-size step of random sign. Measured with 1e-8: loss and step-1 grads equal
# within 1e-5, parameters after 3 steps 1e-5..8e-4 apart in such tensors. With 1e-4 every element whose gradient is
# real (|g| >> 1e-4 here: grad norm ~2 over ~1e5 elements) is still normalised by sqrt(v), and noise-level ones
# move ~1e-6 of a step, so the parameter check tests the parallel plumbing (DDP buckets, distributed-optimizer
# shards, clipping over model-parallel groups) rather than the sign of rounding noise.
ADAM_EPS = 1e-4
# "tiny" with 8 layers (M * - E twice) so the pattern splits over pp=2 and pp*vpp=4; MTP block "*E", LatentMoE.
TINY8 = dict(hybrid_override_pattern="M*-EM*-E", num_layers=8)


def _model_cfg(over: dict):
    from model.presets import get_preset

    return get_preset("tiny", **{**TINY8, **over})


def _batches(dp: int, dp_rank: int, step: int):
    """This rank's micro-batches of the step's global batch (its DP slice of samples, whole sequences: the
    production forward step cuts this CP rank's chunks itself)."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, 512, (GBS, SEQ + 1), generator=g)
    per = GBS // dp
    mine = data[dp_rank * per:(dp_rank + 1) * per]
    out = []
    for j in range(per // MBS):
        mb = mine[j * MBS:(j + 1) * MBS]
        out.append({"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous(),
                    "loss_mask": torch.ones(MBS, SEQ), "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)})
    return out


def _chunk_key(chunks, i: int, k: str) -> str:
    """Virtual-pipeline chunks share local names (each has decoder.layers.0, ...; the checkpoint key inside the
    ShardedTensor is the global one): with several chunks, prefix the dict key with the chunk so none overwrites
    another."""
    return f"chunk{i}/{k}" if len(chunks) > 1 else k


def _sharded_sd(chunks):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sd = {}
    for i, c in enumerate(chunks):
        part = c.sharded_state_dict()
        for k, v in part.items():
            # Parameters and buffers (factories: the Mamba in_proj/conv1d split into z, x, B, C, dt), not the
            # _extra_state objects.
            if isinstance(v, (ShardedTensor, ShardedTensorFactory)):
                sd[_chunk_key(chunks, i, k)] = v
    return sd


def _gather_distopt_grads(ddp_chunks):
    """With the distributed optimizer each DP rank holds only its reduced shard of each grad bucket; all-gather
    the shards so every parameter's main_grad is the full reduced gradient again (for the comparison only)."""
    import torch
    import torch.distributed as dist

    for ddp in ddp_chunks:
        for bg in list(ddp.bucket_groups) + list(ddp.expert_parallel_bucket_groups):
            group = bg.intra_distributed_optimizer_instance_group
            n, r = group.size(), group.rank()
            for bucket in bg.buckets:
                shard = bucket.grad_data[r * (bucket.grad_data.numel() // n):(r + 1) * (bucket.grad_data.numel() // n)]
                dist.all_gather_into_tensor(bucket.grad_data, shard.clone(), group=group)
    _ = torch


def _save_params_as(chunks, ddp_chunks, path: str, grads: bool):
    """Save the model's parameters (or, with grads=True, its main_grads in their place) as a dist checkpoint."""
    import torch
    from megatron.core import dist_checkpointing

    params = [p for c in chunks for p in c.parameters()]
    backup = [p.detach().clone() for p in params]
    if grads:
        for p in params:
            g = getattr(p, "main_grad", None)
            p.data.copy_(g.view_as(p) if g is not None else torch.zeros_like(p))
    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_sd(chunks), path)
    if grads:
        for p, b in zip(params, backup):
            p.data.copy_(b)


def _train_rank(layout_kw: dict, model_over: dict, workdir: str, tag: str, save_init: bool = False):
    """One rank of a training run; returns the per-step losses (on last-stage ranks, else None)."""
    import torch

    from model.build import build_model, transformer_config
    from parallel import groups
    from parallel.layout import ParallelLayout

    layout = ParallelLayout(**layout_kw)
    cfg = _model_cfg(model_over)
    groups.setup(layout, seed=1234, model_cfg=cfg, seq_length=SEQ, micro_batch_size=MBS, global_batch_size=GBS)
    try:
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps

        from pretrain.config import TrainConfig
        from pretrain.optimizer import build_optimizer, install_grad_sync, wrap_ddp
        from pretrain.train import train_step

        tc = transformer_config(
            cfg, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
            sequence_parallel=layout.sequence_parallel, calculate_per_token_loss=True,
            params_dtype=torch.float32, pipeline_dtype=torch.float32)
        vpp = layout.vpp or 1
        chunks = []
        for v in range(vpp):
            vp = v if layout.vpp else None
            chunks.append(build_model(
                cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp, config=tc))
        init_dir = str(Path(workdir) / "init")
        if save_init:
            Path(init_dir).mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save(_sharded_sd(chunks), init_dir)
        else:
            loaded = dist_checkpointing.load(_sharded_sd(chunks), init_dir)
            for i, c in enumerate(chunks):
                sd = c.state_dict()
                for k in sd:
                    if _chunk_key(chunks, i, k) in loaded:
                        sd[k] = loaded[_chunk_key(chunks, i, k)]
                missing = [k for k in _sharded_sd([c]) if _chunk_key(chunks, i, k) not in loaded]
                assert not missing, f"not in the reference checkpoint: {missing[:5]}"
                c.load_state_dict(sd, strict=True)
        ddp = wrap_ddp(chunks, layout, bf16=False)
        install_grad_sync(ddp)
        opt = build_optimizer(ddp, TrainConfig(lr=1e-2, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                                               adam_eps=ADAM_EPS, clip_grad=1.0), layout, bf16=False)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

        def save_grads():
            if layout.use_distributed_optimizer:
                _gather_distopt_grads(ddp)
            _save_params_as(chunks, ddp, str(Path(workdir) / f"{tag}-grads"), grads=True)

        losses = []
        for step in range(STEPS):
            mbs = _batches(dp, dp_rank, step)
            its = [iter(mbs) for _ in range(vpp)] if layout.vpp else iter(mbs)
            res = train_step(ddp, opt, its, num_micro=len(mbs), seq_length=SEQ, micro_batch_size=MBS,
                             before_update=save_grads if step == 0 else None)
            assert res["updated"] and not res["nonfinite_ranks"], res
            losses.append(res["loss"])
        _save_params_as(chunks, ddp, str(Path(workdir) / f"{tag}-params"), grads=False)
        return losses if ps.is_pipeline_last_stage(ignore_virtual=True) else None
    finally:
        groups.teardown()


def _load_and_compare(workdir: str, model_over: dict, names: list[str]):
    """Load (ref grads, layout grads, ref params, layout params) unsharded in 1 process and compare them."""
    import torch

    from model.build import build_model, transformer_config
    from parallel import groups
    from parallel.layout import ParallelLayout

    cfg = _model_cfg(model_over)
    groups.setup(ParallelLayout())
    try:
        from megatron.core import dist_checkpointing

        tc = transformer_config(cfg, calculate_per_token_loss=True, params_dtype=torch.float32)
        model = build_model(cfg, config=tc)
        # dist_checkpointing.load fills the model's own parameter tensors in place (only factory-merged tensors,
        # like the Mamba in_proj, are new): clone each result, or all four dicts alias the last one loaded.
        loaded = {n: {k: v.detach().clone() for k, v in
                      dist_checkpointing.load(_sharded_sd([model]), str(Path(workdir) / n)).items()} for n in names}
        a, b, c, d = names
        if not loaded[a] or set(loaded[a]) != set(loaded[b]):
            return {"keys": [f"key sets differ: {sorted(set(loaded[a]) ^ set(loaded[b]))[:5]}"]}
        # The comparison can fail: every parameter's gradient differs from its updated value. Buffers (the MoE
        # router's expert_bias) are saved as they are in both, and their +-rate updates can sum back to the same
        # value after 3 steps, so they are left out of this check (not out of the comparisons above).
        buffers = {n for n, _ in model.named_buffers()}
        params = [k for k in loaded[a] if k not in buffers]
        same = [k for k in params if _rel(loaded[a][k], loaded[c][k]) <= RTOL]
        return {"grads": _compare(loaded, a, b), "params": _compare(loaded, c, d),
                "sanity": not same, "n": len(params)}
    finally:
        groups.teardown()


def _rel(a, b) -> float:
    import torch

    return float(torch.linalg.vector_norm((a - b).double()) / max(float(torch.linalg.vector_norm(b.double())), 1e-12))


def _compare(loaded: dict, ref: str, other: str) -> list[str]:
    bad = []
    for k, v in loaded[ref].items():
        r = _rel(loaded[other][k], v)
        if not r <= RTOL:
            bad.append(f"{k}: rel diff {r:.2e}")
    return bad


# Layouts of the "Done when" matrix: (id, layout, ranks, model overrides). Every row trains the model with MTP; under
# pp > 1 the MTP block runs on the last stage's last virtual chunk with a copy of the embedding kept equal to the
# first stage's (model/build.py).

MATRIX = [
    pytest.param("cp2", dict(cp=2), 2, {}, id="cp2"),
    pytest.param("ep2", dict(ep=2), 2, {}, id="ep2"),
    pytest.param("dp2-distopt", dict(use_distributed_optimizer=True), 2, {}, id="dp2-distopt"),
    pytest.param("tp2", dict(tp=2, sequence_parallel=True), 2, {}, id="tp2"),
    pytest.param("tp2sp-ep2-etp1", dict(tp=2, sequence_parallel=True, ep=2, etp=1), 2, {}, id="tp2sp-ep2-etp1"),
    pytest.param("tp2-cp2", dict(tp=2, cp=2, sequence_parallel=True), 4, {}, id="tp2-cp2", marks=pytest.mark.slow),
    pytest.param("pp2", dict(pp=2), 2, {}, id="pp2"),
    pytest.param("pp2-vpp2", dict(pp=2, vpp=2), 2, {}, id="pp2-vpp2"),
]
SLOW = [
    pytest.param("tp2-ep2-pp2", dict(tp=2, ep=2, pp=2, sequence_parallel=True), 8, {}, id="tp2-ep2-pp2"),
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One 1-process reference per model variant, made on first use."""
    made: dict = {}

    def get(over: dict):
        key = tuple(sorted(over.items()))
        if key not in made:
            work = tmp_path_factory.mktemp("matrix")
            (losses,) = run_on_ranks(_train_rank, 1, dict(use_distributed_optimizer=False), over, str(work), "ref",
                                     save_init=True, timeout=600)
            made[key] = (work, losses)
        return made[key]
    return get


def _check(references, name, layout_kw, ranks, over):
    work, ref_losses = references(over)
    res = run_on_ranks(_train_rank, ranks, layout_kw, over, str(work), name, timeout=600)
    losses = next(r for r in res if r is not None)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= RTOL * abs(b), f"loss {losses} vs 1-process {ref_losses}"
    (res,) = run_on_ranks(_load_and_compare, 1, str(work), over, ["ref-grads", f"{name}-grads", "ref-params",
                                                                  f"{name}-params"], timeout=600)
    assert "keys" not in res, res["keys"]
    assert not res["grads"], "gradients differ from the 1-process run:\n" + "\n".join(res["grads"])
    assert not res["params"], "parameters after 3 steps differ from the 1-process run:\n" + "\n".join(res["params"])
    assert res["sanity"] and res["n"] > 20


@pytest.mark.multiproc
@pytest.mark.parametrize("name,layout_kw,ranks,over", MATRIX)
def test_layout_equals_one_process(references, name, layout_kw, ranks, over):
    _check(references, name, layout_kw, ranks, over)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name,layout_kw,ranks,over", SLOW)
def test_8_ranks_equal_one_process(references, name, layout_kw, ranks, over):
    _check(references, name, layout_kw, ranks, over)
