"""Checkpoint merging (issue 18 item 2) on real Megatron-Core dist_checkpointing files: the merge is the exact
element-wise mean (fp32) of its inputs for model floats and optimizer fp32 masters, tensor by tensor, and the
newest input's bytes for everything else (moments, ints, RNG, common state); the output has the input's
`.metadata` layout (also for a 2-rank sharded save merged on 2 ranks, identical to the 1-process merge); bad K,
too-small windows, mismatched inputs, corrupt inputs and forbidden outputs are errors naming the checkpoint,
tensor or option; merge_problems names stage and field. The training-loop test (slow) trains with a merge
schedule, resumes from the merge, merges by CLI and exports + verifies the merge with transformers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain import merge as mg
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
W = "module.decoder.layers.0.mlp.linear_fc1.weight"
D = "module.decoder.layers.0.mixer.D"  # bf16 here: rounded once from the fp32 mean
MASTER = f"chained_0.optimizer.state.param.{W}"
MOMENT = f"chained_0.optimizer.state.exp_avg.{W}"
COUNT = "module.decoder.layers.0.mlp.router.local_tokens"  # int64: not averaged
EMB = "module.embedding.word_embeddings.weight"  # row-sharded over the ranks in the 2-rank test


@pytest.fixture(scope="module")
def gloo():
    from model.build import init_single_process

    init_single_process()


def _tensors(seed: int, rank: int = 0, world: int = 1) -> dict:
    g = torch.Generator(device=CPU).manual_seed(seed)
    t = {W: torch.randn(64, 32, generator=g, device=CPU), D: torch.randn(16, generator=g, device=CPU).bfloat16(),
         MASTER: torch.randn(64, 32, generator=g, device=CPU), MOMENT: torch.rand(64, 32, generator=g, device=CPU),
         COUNT: torch.randint(0, 1000, (8,), generator=g, device=CPU),
         EMB: torch.randn(32, 16, generator=g, device=CPU)}
    t[EMB] = t[EMB].chunk(world)[rank].clone()
    return t


def _sharded(t: dict, rng: object, common: dict, rank: int = 0, world: int = 1) -> dict:
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    sd = {k: ShardedTensor.from_rank_offsets(k, v, replica_id=rank) for k, v in t.items() if k != EMB}
    sd[EMB] = ShardedTensor.from_rank_offsets(EMB, t[EMB], (0, rank, world), replica_id=0)
    sd["rng"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    sd["common"] = common
    return sd


def _save(sdir: Path, iteration: int, seed: int, tokens: int, *, stage: str = "main", layout: dict | None = None,
          tensors: dict | None = None) -> ckpt.CheckpointInfo:
    """One checkpoint as checkpoint.save writes it (tmp, dist_checkpointing.save, checksums, foldtron.json, rename,
    pointer), on every rank of the running group."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    rank, world = dist.get_rank(), dist.get_world_size()
    tmp, final = sdir / f"{ckpt.iter_name(iteration)}.tmp", sdir / ckpt.iter_name(iteration)
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    t = tensors if tensors is not None else _tensors(seed, rank, world)
    dist_checkpointing.save(_sharded(t, {"seed": seed, "rank": rank}, {"iteration": iteration, "seed": seed},
                                     rank, world), str(tmp))
    dist.barrier()
    files = ckpt.file_checksums(tmp)
    if rank == 0:
        (tmp / ckpt.META).write_text(json.dumps({
            "stage": stage, "iteration": iteration, "world_size": world, "layout": layout or {"tp": 1},
            "consumed_tokens": tokens, "files": files}))
        os.replace(tmp, final)
        (sdir / "latest").write_text(final.name + "\n")
    dist.barrier()
    return ckpt._info(final, stage)


def _load(path: Path, world: int = 1) -> dict:
    """Through Megatron-Core's loader, in this one process (it reshards the 2-rank save's embedding)."""
    from megatron.core import dist_checkpointing

    empty = {k: torch.zeros_like(v) for k, v in _tensors(0).items()}
    sd = _sharded(empty, None, {})
    sd["rng"] = [dist_checkpointing.ShardedObject("rng_state", None, (world,), (r,), replica_id=0) for r in range(world)]
    del sd["common"]
    out = dist_checkpointing.load(sd, str(path))
    return out


def _mean(ts: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 element-wise mean (float64 arithmetic, one rounding), computed here independently of merge.py."""
    return torch.stack([t.double() for t in ts]).mean(0).float()


def _check_merge(out: Path, inputs: list[Path], world: int = 1) -> None:
    got, ins = _load(out, world), [_load(p, world) for p in inputs]
    for key in (W, MASTER, EMB):
        want = _mean([i[key] for i in ins])
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want), key
        assert not torch.equal(got[key], ins[-1][key]), key  # the test would see a merge that copies the newest
    assert got[D].dtype == torch.bfloat16 and torch.equal(got[D], _mean([i[D].float() for i in ins]).bfloat16())
    for key in (MOMENT, COUNT):
        assert torch.equal(got[key], ins[-1][key]), key
    assert [r["seed"] for r in got["rng"]] == [ins[-1]["rng"][0]["seed"]] * world
    assert got["common"] == ins[-1]["common"]
    # The same layout: every tensor's metadata (dtype, global shape, chunks) and the item-to-file assignment.
    a, b = mg._read_metadata(out), mg._read_metadata(inputs[-1])
    assert a.state_dict_metadata == b.state_dict_metadata
    assert {k: v.relative_path for k, v in a.storage_data.items()} == {k: v.relative_path for k, v in b.storage_data.items()}


def test_merge_is_the_exact_mean_and_the_newest_elsewhere(gloo, tmp_path):
    sdir = tmp_path / "run" / "main"
    infos = [_save(sdir, it, seed=it, tokens=100 * it) for it in (2, 4, 6)]
    sel = mg.select(tmp_path / "run", "main", last=3)
    assert [i.iteration for i in sel] == [2, 4, 6]
    out = mg.default_output(tmp_path / "run", "main", 6)
    rep = mg.merge(sel, out)
    assert out == tmp_path / "run" / "merged" / "main" / "iter_0000006"
    assert rep["averaged_tensors"] == 4 and rep["inputs"][0]["iteration"] == 2
    _check_merge(out, [i.path for i in infos])
    meta = ckpt.read_meta(out)
    assert meta["iteration"] == 6 and meta["consumed_tokens"] == 600 and meta["stage"] == "main"
    assert [(i["iteration"], i["consumed_tokens"]) for i in meta["merge"]["inputs"]] == [(2, 200), (4, 400), (6, 600)]
    ckpt.verify_files(out, meta)  # the manifest the loader checks
    found = ckpt.latest(tmp_path / "run" / "merged", "main")  # checkpoint.load=<run>/merged finds it
    assert found is not None and found.path == out
    assert ckpt.latest(tmp_path / "run", "main").path == infos[-1].path  # the stage's own pointer is untouched
    # A window: (600 - 250, 600] holds iterations 4 and 6; a second merge to the same output replaces the first.
    sel = mg.select(tmp_path / "run", "main", window_tokens=250)
    assert [i.iteration for i in sel] == [4, 6]
    mg.merge(sel, out)
    _check_merge(out, [i.path for i in infos[1:]])
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob("*.replaced"))


def test_selection_errors_name_the_option_and_the_checkpoints(gloo, tmp_path):
    sdir = tmp_path / "run" / "main"
    for it in (2, 4):
        _save(sdir, it, seed=it, tokens=100 * it)
    with pytest.raises(mg.MergeError, match=r"--last 1: a merge averages at least 2"):
        mg.select(tmp_path / "run", "main", last=1)
    with pytest.raises(mg.MergeError, match=r"--last 3: stage directory .*main keeps only 2 .*iter_0000002 \(200 tokens\)"):
        mg.select(tmp_path / "run", "main", last=3)
    with pytest.raises(mg.MergeError, match=r"--window-tokens 150: the window \(250, 400\] .* holds only 1 checkpoint"):
        mg.select(tmp_path / "run", "main", window_tokens=150)
    with pytest.raises(mg.MergeError, match="exactly one of --last K and --window-tokens"):
        mg.select(tmp_path / "run", "main", last=2, window_tokens=100)
    with pytest.raises(mg.MergeError, match=r"stage directory .*phase9 does not exist \(stages in .*: main\)"):
        mg.select(tmp_path / "run", "phase9", last=2)
    with pytest.raises(mg.MergeError, match="no complete checkpoint at iteration 3"):
        mg.select(tmp_path / "run", "main", last=2, until=3)


def test_mismatched_inputs_are_named(gloo, tmp_path):
    a = _save(tmp_path / "r" / "main", 2, seed=1, tokens=200)
    t = _tensors(2)
    t[W] = torch.randn(64, 31, device=CPU)
    b = _save(tmp_path / "r" / "main", 4, seed=2, tokens=400, tensors=t)
    with pytest.raises(mg.MergeError, match=rf"tensor {W} differs between checkpoint .*iter_0000002 \(torch.float32 "
                                            r"\(64, 32\).*iter_0000004 \(torch.float32 \(64, 31\)"):
        mg.merge([a, b], tmp_path / "out")
    t = _tensors(3)
    del t[COUNT]
    c = _save(tmp_path / "r2" / "main", 4, seed=3, tokens=400, tensors=t)
    with pytest.raises(mg.MergeError, match=rf"tensor {COUNT} is in checkpoint .*iter_0000002 but not in .*r2/main/iter_0000004"):
        mg.merge([a, c], tmp_path / "out")
    d = _save(tmp_path / "r3" / "main", 4, seed=4, tokens=400, layout={"tp": 2})
    with pytest.raises(mg.MergeError, match=r"checkpoint .*iter_0000002 has another layout than .*r3/main/iter_0000004"):
        mg.merge([a, d], tmp_path / "out")
    e = _save(tmp_path / "r4" / "phase2", 4, seed=5, tokens=400, stage="phase2")
    with pytest.raises(mg.MergeError, match="has another stage than"):
        mg.merge([a, e], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_corrupt_input_and_forbidden_outputs(gloo, tmp_path):
    run = tmp_path / "run"
    a, b = (_save(run / "main", it, seed=it, tokens=100 * it) for it in (2, 4))
    with pytest.raises(mg.MergeError, match=r"output .*main/iter_0000009 is inside the stage directory"):
        mg.merge([a, b], run / "main" / "iter_0000009")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(mg.MergeError, match=r"output .*mine exists and is not a previous merge output"):
        mg.merge([a, b], other)
    assert (other / "notes.txt").read_text() == "keep me"
    # a stage directory of another run (its `latest` names a checkpoint that is not a merge)
    foreign = _save(tmp_path / "run2" / "main", 2, seed=9, tokens=1)
    with pytest.raises(mg.MergeError, match="that is a stage directory"):
        mg.merge([a, b], foreign.path.parent / "iter_0000004")
    f = sorted(b.path.glob("*.distcp"))[0]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    out = mg.default_output(run, "main", 4)
    with pytest.raises(ckpt.CheckpointError, match=rf"{f.name} does not match its sha256"):
        mg.merge([a, b], out)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def _two_rank_saves_and_merge(root: str) -> dict:
    import torch.distributed as dist

    from model.build import init_single_process

    init_single_process()  # this rank's parallel state (tp=pp=1: the shards here are dist_checkpointing's own)
    run = Path(root) / "run"
    infos = [_save(run / "main", it, seed=10 + it, tokens=50 * it, layout={"dp": 2}) for it in (1, 2, 3)]
    rep = mg.merge(infos, Path(root) / "merged2")  # both ranks merge (each its share of the files)
    dist.barrier()
    return rep


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_rank_layout_merged_on_two_ranks_equals_one_process_merge(gloo, tmp_path):
    (rep, _) = run_on_ranks(_two_rank_saves_and_merge, 2, str(tmp_path))
    assert rep["ranks"] == 2
    inputs = [tmp_path / "run" / "main" / ckpt.iter_name(i) for i in (1, 2, 3)]
    assert len(list(inputs[0].glob("*.distcp"))) == 2 and len(mg._read_metadata(inputs[0]).state_dict_metadata[EMB].chunks) == 2
    _check_merge(tmp_path / "merged2", inputs, world=2)
    one = tmp_path / "merged1"
    mg.merge([ckpt._info(p, "main") for p in inputs], one)  # the same merge in this one process
    for f in sorted((tmp_path / "merged2").glob("*.distcp")):
        assert f.read_bytes() == (one / f.name).read_bytes(), f.name


def _cfg(*over):
    from pretrain.config import load_config

    return load_config(None, ["model.preset=tiny", "data.mock=true", "train.seq_length=32", "train.global_batch_size=8",
                              "train.micro_batch_size=1", "checkpoint.save=/tmp/x", "checkpoint.save_interval=2",
                              "checkpoint.keep_last=3", *over])


def test_merge_problems_name_stage_and_field():
    # 8 x 32 tokens per iteration, a save every 2: 512 tokens between saves
    ok = _cfg("checkpoint.merge.every_tokens=1K", "checkpoint.merge.window_tokens=1536")
    assert mg.merge_problems(ok) == []
    assert mg.merge_problems(_cfg()) == []  # no schedule, nothing to check
    (p,) = mg.merge_problems(_cfg("checkpoint.merge.every_tokens=1K", "checkpoint.merge.window_tokens=2K"))
    assert p.startswith("stage main: checkpoint.merge.window_tokens=2000") and "spans 4 saves" in p and "keep_last=3" in p
    (p,) = mg.merge_problems(_cfg("checkpoint.merge.every_tokens=1K", "checkpoint.merge.window_tokens=500"))
    assert "stage main: checkpoint.merge.window_tokens=500 holds only one save" in p
    (p,) = mg.merge_problems(_cfg("checkpoint.merge.every_tokens=1K", "checkpoint.merge.last=4"))
    assert p == "stage main: checkpoint.merge.last=4 but checkpoint.keep_last=3 keeps only 3"
    (p,) = mg.merge_problems(_cfg("checkpoint.merge.every_tokens=1K", "checkpoint.merge.last=2",
                                  "checkpoint.merge.stages=[stable]"))
    assert p == "checkpoint.merge.stages: stage 'stable' does not exist (stages: main)"
    (p,) = mg.merge_problems(_cfg("checkpoint.merge.every_tokens=100", "checkpoint.merge.last=2"))
    assert "every_tokens=100 is below the 512 tokens between saves" in p
    staged = _cfg("checkpoint.merge.every_tokens=1K", "checkpoint.merge.last=2",
                  "stages=[{name: merged, train_iters: 4}]")
    assert any("stage 'merged': this name is reserved" in p for p in mg.merge_problems(staged))
    nosave = _cfg("checkpoint.save=null", "checkpoint.merge.every_tokens=1K", "checkpoint.merge.last=2")
    assert mg.merge_problems(nosave)[0].startswith("checkpoint.merge.every_tokens: merges need checkpoint.save")


def test_merge_config_is_checked():
    from pretrain.config import ConfigError

    assert _cfg("checkpoint.merge.every_tokens=500B", "checkpoint.merge.last=2").checkpoint.merge.every_tokens == 500 * 10**9
    with pytest.raises(ConfigError, match="set exactly one of window_tokens and last"):
        _cfg("checkpoint.merge.every_tokens=1K")
    with pytest.raises(ConfigError, match=r"checkpoint.merge.window_tokens: .*K/M/B/T suffix"):
        _cfg("checkpoint.merge.every_tokens=1K", "checkpoint.merge.window_tokens=lots")


# ----------------------------------------------------------------------------------------------------------
# End to end: a training run with a merge schedule, resume from the merge, CLI merge, export + verify

BASE = ["model.preset=tiny", "data.mock=true", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.train_iters=6", "train.lr_warmup_iters=1", "precision.recipe=fp32",
        "logging.peak_tflops_per_device=1.0", "checkpoint.save_interval=2", "checkpoint.keep_last=3"]


def _foldtron(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def _full_tensors(path: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype, device=CPU) for k, v in meta.items() if hasattr(v, "size")}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


@pytest.mark.multiproc
@pytest.mark.slow
def test_scheduled_merge_resumes_and_exports(tmp_path):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    run = tmp_path / "run"
    # 256 tokens per iteration, saves at 512 / 1024 / 1536: the save at 1024 crosses every_tokens and merges the
    # window (0, 1024]: iterations 2 and 4.
    rc, out, err = _foldtron("train", "--nproc", "2", *BASE, f"checkpoint.save={run}", "checkpoint.merge.every_tokens=1K",
                             "checkpoint.merge.window_tokens=1024", "checkpoint.merge.stages=[main]",
                             "--summary", str(tmp_path / "a.json"))
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "merged 2 checkpoints (iter_0000002, iter_0000004)" in out
    sched = run / "merged" / "main" / "iter_0000004"
    assert [i["iteration"] for i in ckpt.read_meta(sched)["merge"]["inputs"]] == [2, 4]
    assert not (run / "merged" / "main" / "iter_0000006").exists()  # 1536 // 1000 == 1024 // 1000: not due again
    ins = [_full_tensors(run / "main" / ckpt.iter_name(i)) for i in (2, 4)]
    got = _full_tensors(sched)
    n_mean = 0
    for key, t in got.items():
        if mg.kind(key, t.dtype) == "mean":
            assert torch.equal(t, _mean([i[key] for i in ins])), key
            n_mean += 1
        else:
            assert torch.equal(t, ins[-1][key]), key
    assert n_mean > 100 and any(".optimizer.state.param." in k for k in got)

    # Train on from the merge: iteration 5 and 6 from the merged weights.
    rc, out, err = _foldtron("train", "--nproc", "2", *BASE, f"checkpoint.save={tmp_path / 'b'}",
                             f"checkpoint.load={run / 'merged'}", "--summary", str(tmp_path / "b.json"))
    assert rc == 0, out[-3000:] + err[-3000:]
    st = json.loads((tmp_path / "b.json").read_text())["stages"][0]
    assert st["resumed_from"] == 4 and st["iterations"] == [5, 6] and all(math.isfinite(x) for x in st["losses"])
    a = json.loads((tmp_path / "a.json").read_text())["stages"][0]
    assert st["losses"] != a["losses"][4:]  # other weights than the un-merged iteration 4

    # By hand: the last 3, then export and verify the merge like any checkpoint.
    rc, out, err = _foldtron("merge-checkpoints", "--run", str(run), "--stage", "main", "--last", "3")
    assert rc == 0, out + err
    merged = run / "merged" / "main" / "iter_0000006"
    assert json.loads(out)["output"] == str(merged)
    ins = [_full_tensors(run / "main" / ckpt.iter_name(i)) for i in (2, 4, 6)]
    got = _full_tensors(merged)
    for key in (k for k, t in got.items() if mg.kind(k, t.dtype) == "mean"):
        assert torch.equal(got[key], _mean([i[key] for i in ins])), key
    rc, out, err = _foldtron("export-hf", "--checkpoint", str(merged), "--output", str(tmp_path / "hf"),
                             "--dtype", "fp32")
    assert rc == 0, out[-2000:] + err[-2000:]
    rc, out, err = _foldtron("verify-hf", str(tmp_path / "hf"), "--checkpoint", str(merged))
    assert rc == 0, out[-2000:] + err[-2000:]
    rc, out, err = _foldtron("merge-checkpoints", "--run", str(run), "--stage", "main", "--window-tokens", "0.3K")
    assert rc == 2 and "holds only 1 checkpoint" in err and "Traceback" not in err
