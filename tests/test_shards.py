"""`foldtron shards`: token arrays equal the tokenizer's, manifests add up, readable by tar and webdataset,
idempotent re-runs, and bad input is an error naming file and line."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from data_pipeline.manifest import load_manifests, sha256_file
from data_pipeline.shards import CuratedInputError, iter_documents, list_curated, write_shards
from data_pipeline.tokenizer import Tokenizer
from tests.pipeline_data import build


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build(tmp_path_factory.mktemp("shards"))


def test_shards_hold_exactly_the_tokenized_documents(data):
    import webdataset as wds

    tok = Tokenizer.from_file(data["tokenizer"])
    manifests = load_manifests(data["shards"])
    assert set(manifests) == {"code", "email", "json"}
    for source, files in list_curated(data["curated"]).items():
        docs = [d for f in files for d in iter_documents(f, source)]
        expect = tok.encode_batch([t for _, t in docs])
        m = manifests[source]
        assert m.documents == len(docs) == sum(s.documents for s in m.shards)
        assert m.tokens == sum(e.size for e in expect) == sum(s.tokens for s in m.shards)
        assert len(m.shards) > 1
        urls = [str(data["shards"] / source / s.path) for s in m.shards]
        got = list(wds.WebDataset(urls, shardshuffle=False))
        assert [s["json"] and json.loads(s["json"])["id"] for s in got] == [i for i, _ in docs]
        for sample, ids in zip(got, expect):
            assert np.array_equal(np.frombuffer(sample["tokens.u16"], dtype="<u2"), ids)
        for s in m.shards:  # plain tar reads them; sha256 and size match the manifest
            path = data["shards"] / source / s.path
            with tarfile.open(path) as t:
                assert len(t.getnames()) == 2 * s.documents
            assert sha256_file(path) == s.sha256 and path.stat().st_size == s.bytes


def test_rerun_is_idempotent_and_notices_changed_input(data, tmp_path):
    import shutil

    cur = tmp_path / "curated"
    shutil.copytree(data["curated"], cur)
    out = tmp_path / "shards"
    first = write_shards(cur, out, data["tokenizer"], shard_bytes=60_000)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    again = write_shards(cur, out, data["tokenizer"], shard_bytes=60_000)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == mtimes
    assert again["code"].model_dump() == first["code"].model_dump()
    with open(cur / "json" / "part0.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "text": "x = 1\n"}) + "\n")
    changed = write_shards(cur, out, data["tokenizer"], shard_bytes=60_000)
    assert changed["json"].documents == first["json"].documents + 1
    assert changed["code"].model_dump() == first["code"].model_dump()
    assert not list(out.rglob(".tmp-*"))


def test_bad_input_is_named(data, tmp_path):
    d = tmp_path / "cur" / "web"
    d.mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(CuratedInputError, match=r"a\.jsonl:2: not JSON"):
        write_shards(tmp_path / "cur", tmp_path / "out", data["tokenizer"])
    (d / "a.jsonl").write_text('{"text": "ok", "source": "books"}\n')
    with pytest.raises(CuratedInputError, match=r"a\.jsonl:1: record source 'books'"):
        write_shards(tmp_path / "cur", tmp_path / "out", data["tokenizer"])
    (d / "a.jsonl").write_text('{"body": "no text"}\n')
    with pytest.raises(CuratedInputError, match="no string field 'text'"):
        write_shards(tmp_path / "cur", tmp_path / "out", data["tokenizer"])
    (d / "a.jsonl").unlink()
    (d / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(CuratedInputError, match=r"b\.jsonl\.zst"):
        write_shards(tmp_path / "cur", tmp_path / "out", data["tokenizer"])


@pytest.mark.multiproc
def test_cli_parallel_workers(data, tmp_path):
    from pretrain.cli import main

    out = tmp_path / "out"
    rc = main(["shards", "--input", str(data["curated"]), "--output", str(out), "--tokenizer",
               str(data["tokenizer"]), "--shard-size", "60K", "--workers", "2"])
    assert rc == 0
    ref = load_manifests(data["shards"])
    got = load_manifests(out)
    for s in ref:  # same documents and tokens whether written by one process or two
        assert [(e.path, e.tokens, e.sha256) for e in got[s].shards] == [
            (e.path, e.tokens, e.sha256) for e in ref[s].shards]  # byte-identical shards (fixed tar mtime)
