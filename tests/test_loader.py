"""BlendedLoader: exact resume (several k, with workers), DP resize 4->2 and 2->4 gives the identical global
stream, every planned window served once and only once per phase, blend within one sample per batch."""
from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.curriculum import load_curriculum
from data_pipeline.loader import BlendedLoader, SourceStream
from data_pipeline.manifest import ShardError
from tests.pipeline_data import build

CURRICULUM = {
    "name": "test",
    "phases": [
        {"name": "p1", "tokens": 24 * 8 * 64, "seq_length": 64, "global_batch_size": 8,
         "blend": {"code": 0.5, "email": 0.3, "json": 0.2}},
        {"name": "p2", "tokens": 10 * 8 * 128, "seq_length": 128, "global_batch_size": 8,
         "blend": {"code": 1, "email": 2, "json": 5}},
        {"name": "long", "tokens": 6 * 4 * (512 + 32), "seq_length": [512, 32], "global_batch_size": 4,
         "blend": {"phase:p2": 0.8, "code": 0.2}},
    ],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build(tmp_path_factory.mktemp("loader"))


def make(data, phase="p1", **kw):
    kw.setdefault("micro_batch_size", 1)
    return BlendedLoader(data["shards"], CURRICULUM, phase, **kw)


def global_stream(data, dp, phase="p1", state=None, batches=None, **kw):
    """Rows of each global batch in slot order (rank-major), by running the dp ranks' loaders side by side."""
    loaders = [make(data, phase, dp_rank=r, dp_size=dp, **kw) for r in range(dp)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in loaders]
    out = []
    n = batches if batches is not None else loaders[0].num_batches - loaders[0].batches_done
    for _ in range(n):
        rows = []
        for ld, it in zip(loaders, its):
            for _ in range(ld.micro_batches_per_batch):
                rows.append(next(it)["tokens"])
        out.append(torch.cat(rows))
    return out, loaders[0].state_dict()


def test_resume_after_k_steps_is_identical(data):
    full, _ = global_stream(data, 1)
    for k in (0, 1, 7, 23):
        head, state = global_stream(data, 1, batches=k)
        tail, _ = global_stream(data, 1, state=state)
        assert len(head) + len(tail) == len(full)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, full)), f"resume after {k} differs"


@pytest.mark.multiproc
def test_resume_with_workers_is_identical(data):
    ref = [mb["tokens"] for mb in make(data, micro_batch_size=2, dp_rank=1, dp_size=2)]
    for k in (3, 10):
        ld = make(data, micro_batch_size=2, dp_rank=1, dp_size=2, num_workers=2)
        it = iter(ld)
        head = [next(it)["tokens"] for _ in range(k * ld.micro_batches_per_batch)]
        state = ld.state_dict()
        del it
        ld2 = make(data, micro_batch_size=2, dp_rank=1, dp_size=2, num_workers=3)
        ld2.load_state_dict(state)
        got = head + [mb["tokens"] for mb in ld2]
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref)), f"k={k}"


@pytest.mark.parametrize("before,after", [(4, 2), (2, 4)])
def test_dp_resize_keeps_the_global_stream(data, before, after):
    full, _ = global_stream(data, 1)
    head, state = global_stream(data, before, batches=9)
    tail, _ = global_stream(data, after, state=state)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))
    assert len(head) + len(tail) == len(full)


def test_mid_batch_state_needs_the_same_dp_size(data):
    ld = make(data, micro_batch_size=1, dp_rank=0, dp_size=2)
    it = iter(ld)
    first = [next(it)["tokens"] for _ in range(5)]  # 4 micro-batches per batch: one into batch 1
    state = ld.state_dict()
    assert state["batches"] == 1 and state["micro_batch"] == 1
    same = make(data, micro_batch_size=1, dp_rank=0, dp_size=2)
    same.load_state_dict(state)
    ref = [mb["tokens"] for mb in make(data, micro_batch_size=1, dp_rank=0, dp_size=2)]
    got = first + [mb["tokens"] for mb in same]
    assert all(torch.equal(a, b) for a, b in zip(got, ref)) and len(got) == len(ref)
    with pytest.raises(ValueError, match="middle of a global batch"):
        make(data, micro_batch_size=1, dp_rank=0, dp_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="phase"):
        make(data, "p2").load_state_dict(state)


@pytest.mark.parametrize("phase", ["p1", "p2", "long"])
def test_every_planned_window_once_and_blend_within_one(data, phase):
    cur = load_curriculum(CURRICULUM)
    dp = 2
    loaders = [make(data, phase, dp_rank=r, dp_size=dp, reset_position_ids=True) for r in range(dp)]
    plan = loaders[0].plan
    sources = list(plan.sources)
    served: Counter = Counter()
    per_batch: dict[int, Counter] = {}
    hashes = {}
    for r, ld in enumerate(loaders):
        for mb in ld:
            per_batch[ld.batch_index] = Counter(ld.source_counts)
            for row in range(mb["tokens"].shape[0]):
                key = (int(mb["source_ids"][row]), int(mb["sample_ids"][row]))
                served[key] += 1
                window = torch.cat([mb["tokens"][row], mb["labels"][row, -1:]]).numpy()
                hashes[key] = hashlib.sha256(window.astype(np.int64).tobytes()).hexdigest()
                # segments: position ids restart where segment ids change; cu_seqlens agree with them
                seg, pos = mb["segment_ids"][row], mb["position_ids"][row]
                starts = torch.nonzero(torch.diff(seg)).flatten() + 1
                assert torch.all(pos[starts] == 0) and pos[0] == 0
    # once and only once: exactly the planned windows 0..samples-1 of each source
    planned = {(i, k) for i, s in enumerate(sources) for k in range(plan.sources[s].samples)}
    assert set(served) == planned and all(v == 1 for v in served.values())
    # contents: window k of a source is its stream at offset phase_start + tokens before it
    streams = {i: SourceStream(Path(data["shards"]) / s, data["manifests"][s], 1234) for i, s in enumerate(sources)}
    seqs = plan.seq_lengths
    offs = {i: plan.sources[s].offset for i, s in enumerate(sources)}
    sched_counts = {i: 0 for i in range(len(sources))}
    for b in range(plan.batches):
        seq = seqs[b % len(seqs)]
        counts = per_batch[b]
        for i, s in enumerate(sources):
            for _ in range(counts.get(s, 0)):
                k = sched_counts[i]
                toks, _ = streams[i].read(offs[i], seq + 1)
                assert hashlib.sha256(toks.astype(np.int64).tobytes()).hexdigest() == hashes[(i, k)]
                offs[i] += seq
                sched_counts[i] += 1
        # blend within one sample of weight x global batch size
        g = plan.global_batch_size
        for s in sources:
            quota = float(cur.weights(phase)[s]) * g
            assert abs(counts.get(s, 0) - quota) < 1.0 + 1e-9, (b, s, counts, quota)
        assert sum(counts.values()) == g


def test_stream_is_each_document_once_per_epoch(data):
    """One epoch of a source's stream holds every document of its shards exactly once (read with webdataset)."""
    import webdataset as wds

    source = "json"
    man = data["manifests"][source]
    stream = SourceStream(Path(data["shards"]) / source, man, seed=7)
    toks, starts = stream.read(0, man.tokens)
    docs = [toks[a:b].tobytes() for a, b in zip(starts, starts[1:] + [len(toks)])]
    urls = [str(Path(data["shards"]) / source / e.path) for e in man.shards]
    ref = [s["tokens.u16"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert Counter(docs) == Counter(ref) and len(docs) == man.documents
    nxt, _ = stream.read(man.tokens, 10)  # epoch 1 starts over in another order
    assert nxt.size == 10


def test_bad_shards_are_named(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    man = data["manifests"]["email"]
    first = int(SourceStream(shards / "email", man, 1234)._epoch(0)[0][0])  # the shard the stream reads first
    victim = shards / "email" / man.shards[first].path
    raw = bytearray(victim.read_bytes())
    raw[2000] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(raw))

    def drain(**kw):
        return sum(1 for _ in BlendedLoader(shards, CURRICULUM, "p1", micro_batch_size=1, **kw))

    with pytest.raises(ShardError, match=f"{victim.name}.*sha256"):
        drain()
    skip = BlendedLoader(shards, CURRICULUM, "p1", micro_batch_size=1, on_bad_shard="skip")
    assert len(skip.skipped_shards) == 1 and victim.name in skip.skipped_shards[0]
    assert sum(1 for _ in skip) == skip.num_batches * 8
    victim.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    with pytest.raises(ShardError, match=f"{victim.name}.*truncated"):
        drain(verify="size")


def test_stage_batch_differs_per_phase_only_checked_for_served_phase(tmp_path):
    """A long-context stage with its own batch size must not be checked against another phase's batch."""
    import pytest

    from data_pipeline.curriculum import CurriculumError, load_curriculum, plan

    cur = load_curriculum({"name": "t", "phases": [
        {"name": "a", "tokens": 4096, "seq_length": 64, "global_batch_size": 8, "blend": {"x": 1}},
        {"name": "b", "tokens": 4096, "seq_length": 256, "global_batch_size": 4, "blend": {"x": 1}}]})
    plans = plan(cur, None, 4)
    assert [p.global_batch_size for p in plans] == [8, 4]
    from data_pipeline.loader import BlendedLoader

    with pytest.raises((CurriculumError, Exception), match="global_batch_size 8 != 4"):
        BlendedLoader(tmp_path, cur, phase="a", global_batch_size=4)
