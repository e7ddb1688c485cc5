"""Data pipeline under broken input (issue 20): truncated compressed sources are a counted, named bad input
(never a raw EOFError, never silent loss), empty input is an error at every step, `shards --input RUN` (the
curate run instead of RUN/curated) is refused without leaving folders, and manifests are cross-checked against
the shards on disk and against their own totals."""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest
import yaml

from data_pipeline.curate import CurationError, run_curation
from data_pipeline.sources import SourceError, TruncatedInput, iter_curated, iter_jsonl_zst, iter_lines
from tests.test_curate import _check_invariant, stdlib_docstring_docs

pytestmark = pytest.mark.reliability


def _lines(docs: list[str]) -> bytes:
    return b"".join((json.dumps({"text": t}) + "\n").encode() for t in docs)


def _zst(data: bytes) -> bytes:
    import io

    import zstandard

    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
        for i in range(0, len(data), 4096):  # several blocks, as a streaming writer leaves them
            w.write(data[i:i + 4096])
            w.flush(zstandard.FLUSH_BLOCK)
    return buf.getvalue()


def _whole_lines_before_cut(kind: str, cut: bytes) -> int:
    """How many complete lines a decoder can recover from the cut-off stream (what skip must keep)."""
    if kind == "gz":
        out = zlib.decompressobj(wbits=31).decompress(cut)
    else:
        import zstandard

        out = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    return out.count(b"\n")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stdlib_docstring_docs(40)


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_source(tmp_path, docs, kind):
    data = _lines(docs)
    full = gzip.compress(data) if kind == "gz" else _zst(data)
    cut = full[: int(len(full) * 0.6)]
    whole = _whole_lines_before_cut(kind, cut)
    assert 0 < whole < len(docs)
    d = tmp_path / "in"
    d.mkdir()
    src = d / f"web.jsonl.{kind}"
    src.write_bytes(cut)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "web", "kind": "jsonl", "paths": ["in"]}]))
    with pytest.raises(CurationError, match=rf"{src}:{whole + 1}: truncated"):
        run_curation(tmp_path / "s.yaml", tmp_path / "fail", on_bad_input="fail")
    rep = run_curation(tmp_path / "s.yaml", tmp_path / "skip", on_bad_input="skip")
    assert {k: v["docs"] for k, v in rep["bad_input"].items()} == {"truncated": 1}  # not malformed_json
    assert rep["input"]["docs"] == whole + 1
    _check_invariant(rep)
    assert [(e["path"], e["line"], e["reason"]) for e in rep["bad_input_examples"]] == [(str(src), whole + 1,
                                                                                           "truncated")]
    kept = sorted(int(r["id"].rsplit(":", 1)[1]) for r in iter_curated(tmp_path / "skip"))
    dropped = rep["input"]["docs"] - 1 - rep["kept"]["docs"]
    assert len(kept) == rep["kept"]["docs"] and set(kept) <= set(range(1, whole + 1)) and dropped >= 0
    # every whole line before the cut was read and accounted for (kept, filtered or duplicate)
    assert rep["kept"]["docs"] + sum(c["docs"] for c in rep["filtered"].values()) \
        + rep["exact_duplicates"]["docs"] + rep["fuzzy_duplicates"]["docs"] == whole


def test_truncated_zstd_is_not_silent_for_any_reader(tmp_path, docs):
    """zstandard's stream_reader ends quietly at a cut-off frame; every reader here raises, naming the file."""
    p = tmp_path / "part-00000.jsonl.zst"
    full = _zst(_lines(docs))
    p.write_bytes(full)
    assert len(list(iter_jsonl_zst(p))) == len(docs)
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(TruncatedInput, match=rf"{p}: truncated"):
        list(iter_jsonl_zst(p))
    with pytest.raises(SourceError, match=str(p)):
        list(iter_lines(str(p)))


def test_truncated_gzip_text_tree_file_is_a_bad_input(tmp_path, docs):
    man = tmp_path / "man"
    man.mkdir()
    for i in range(2):
        (man / f"tool{i}.1.gz").write_bytes(gzip.compress(docs[i].encode()))
    full = gzip.compress(docs[2].encode())
    (man / "tool2.1.gz").write_bytes(full[: len(full) // 2])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "man", "kind": "text_tree", "paths": ["man"]}]))
    with pytest.raises(CurationError, match=r"tool2\.1\.gz:1: truncated"):
        run_curation(tmp_path / "s.yaml", tmp_path / "fail")
    rep = run_curation(tmp_path / "s.yaml", tmp_path / "skip", on_bad_input="skip")
    assert {k: v["docs"] for k, v in rep["bad_input"].items()} == {"truncated": 1}
    _check_invariant(rep)


def test_empty_input_to_curate_is_an_error(tmp_path):
    from pretrain.cli import main

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"")
    (d / "b.jsonl").write_bytes(b"\n\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "web", "kind": "jsonl", "paths": ["in"]}]))
    with pytest.raises(CurationError, match=r"empty input: source 'web' read 0 documents from 2 file\(s\) \(.*a\.jsonl"):
        run_curation(tmp_path / "s.yaml", tmp_path / "o")
    assert main(["curate", "--sources", str(tmp_path / "s.yaml"), "--output", str(tmp_path / "o2"),
                 "--no-progress"]) == 2
    assert not (tmp_path / "o" / "curated").exists()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, docs) -> Path:
    from data_pipeline.tokenizer import TrainConfig, train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(docs, TrainConfig(vocab_size=320)).save(path)
    return path


def _everything(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) if d.exists() else []


def test_shards_input_pointing_at_the_curate_run(tmp_path, docs, tokenizer, capsys):
    from pretrain.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "web.jsonl").write_bytes(_lines(docs[:10]))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "web", "kind": "jsonl", "paths": ["in"]}]))
    run = tmp_path / "run"
    run_curation(tmp_path / "s.yaml", run)
    out = tmp_path / "shards"
    assert main(["shards", "--input", str(run), "--output", str(out), "--tokenizer", str(tokenizer)]) == 2
    assert f"pass --input {run / 'curated'}" in capsys.readouterr().err
    assert not out.exists()
    # the same one level too high without the run's reports: the records say which source they belong to
    (tmp_path / "data").mkdir()
    (run / "curated").rename(tmp_path / "data" / "curated")
    assert main(["shards", "--input", str(tmp_path / "data"), "--output", str(out), "--tokenizer",
                 str(tokenizer)]) == 2
    assert "record source 'web' but the file is under source directory 'curated'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["shards", "--input", str(tmp_path / "data" / "curated"), "--output", str(out), "--tokenizer",
                 str(tokenizer)]) == 0
    assert (out / "web" / "manifest.json").is_file()


def test_shards_failing_midway_leaves_no_temporary_folders(tmp_path, docs, tokenizer):
    from data_pipeline.shards import CuratedInputError, write_shards

    cur = tmp_path / "curated" / "web"
    cur.mkdir(parents=True)
    (cur / "a.jsonl").write_bytes(_lines(docs[:3]) + b'{"text": "unterminated\n')
    out = tmp_path / "shards"
    with pytest.raises(CuratedInputError, match=r"a\.jsonl:4: not JSON"):
        write_shards(tmp_path / "curated", out, tokenizer)
    assert _everything(out) == []


def test_empty_input_to_shards_and_tokenizer_is_an_error(tmp_path, tokenizer, capsys):
    from pretrain.cli import main

    cur = tmp_path / "curated" / "web"
    cur.mkdir(parents=True)
    (cur / "part-00000.jsonl").write_bytes(b"\n")
    out = tmp_path / "shards"
    assert main(["shards", "--input", str(tmp_path / "curated"), "--output", str(out), "--tokenizer",
                 str(tokenizer)]) == 2
    assert "empty input: source 'web' has no documents in its 1 curated file(s)" in capsys.readouterr().err
    assert not out.exists()
    assert main(["tokenizer", "train", "--input", str(tmp_path / "curated"), "--vocab-size", "320",
                 "--output", str(tmp_path / "tok.json")]) == 2
    assert f"empty input: no documents to train the tokenizer on in {tmp_path / 'curated'}" in capsys.readouterr().err
    assert not (tmp_path / "tok.json").exists()


@pytest.fixture
def sharded(tmp_path, docs, tokenizer) -> Path:
    from data_pipeline.shards import write_shards

    cur = tmp_path / "curated" / "web"
    cur.mkdir(parents=True)
    (cur / "a.jsonl").write_bytes(_lines(docs[:20]))
    (cur / "b.jsonl").write_bytes(_lines(docs[20:]))
    write_shards(tmp_path / "curated", tmp_path / "shards", tokenizer, shard_bytes=8 << 10)
    return tmp_path / "shards"


def test_shard_on_disk_but_not_in_the_manifest_is_an_error(sharded):
    from data_pipeline.manifest import ShardError, load_manifests

    m = load_manifests(sharded)["web"]
    assert len(m.shards) > 2
    stray = sharded / "web" / "extra-000000.tar"
    stray.write_bytes((sharded / "web" / m.shards[0].path).read_bytes())
    with pytest.raises(ShardError, match=rf"1 shard\(s\) in {sharded / 'web'} are not in its manifest .*"
                                         r"extra-000000\.tar"):
        load_manifests(sharded)
    from data_pipeline.loader import BlendedLoader

    cur = sharded.parent / "cur.yaml"
    cur.write_text(yaml.safe_dump({"phases": [{"name": "p", "tokens": 64, "seq_length": 16, "global_batch_size": 2,
                                               "blend": {"web": 1.0}}]}))
    with pytest.raises(ShardError, match="extra-000000"):
        BlendedLoader(sharded, cur, phase="p", seq_length=16, micro_batch_size=1, global_batch_size=2,
                      dp_rank=0, dp_size=1, seed=0, num_workers=0)


def test_manifest_totals_must_match_its_shards(sharded):
    from data_pipeline.manifest import ShardError, load_manifests

    path = sharded / "web" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["tokens"] += 45000
    path.write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=rf"manifest {path}: total tokens {raw['tokens']} disagrees"):
        load_manifests(sharded)
    raw["tokens"] -= 45000
    raw["documents"] -= 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ShardError, match="total documents"):
        load_manifests(sharded)


def test_resharding_removes_only_the_stale_shards_it_wrote(sharded, tokenizer):
    """Re-sharding a curated file that shrank (or after one is gone) leaves no stale shards behind that the
    manifest check would then refuse; a file the user put there is left alone (and named)."""
    from data_pipeline.manifest import ShardError, load_manifests
    from data_pipeline.shards import write_shards

    before = [s.path for s in load_manifests(sharded)["web"].shards]
    assert sum(p.startswith("a-") for p in before) > 1
    cur = sharded.parent / "curated"
    (cur / "web" / "a.jsonl").write_bytes(_lines(stdlib_docstring_docs(1)))
    write_shards(cur, sharded, tokenizer, shard_bytes=8 << 10)
    after = [s.path for s in load_manifests(sharded)["web"].shards]
    assert [p for p in after if p.startswith("a-")] == ["a-000000.tar"]
    assert sorted(p.name for p in (sharded / "web").glob("*.tar")) == sorted(after)
    (cur / "web" / "b.jsonl").unlink()
    write_shards(cur, sharded, tokenizer, shard_bytes=1 << 30)
    assert [s.path for s in load_manifests(sharded)["web"].shards] == ["a-000000.tar"]
    assert sorted(p.name for p in (sharded / "web").glob("*.tar")) == ["a-000000.tar"]
    (sharded / "web" / "mine.tar").write_bytes(b"x")
    write_shards(cur, sharded, tokenizer, shard_bytes=1 << 30)
    assert (sharded / "web" / "mine.tar").read_bytes() == b"x"
    with pytest.raises(ShardError, match="mine.tar"):
        load_manifests(sharded)


def test_truncated_parquet_source_is_a_named_bad_input(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"text": docs[:10]}), d / "good.parquet")
    pq.write_table(pa.table({"text": docs[10:20]}), d / "cut.parquet")
    raw = (d / "cut.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "pq", "kind": "parquet", "paths": ["in"]}]))
    with pytest.raises(CurationError, match=r"cut\.parquet:1: truncated: not a readable parquet file"):
        run_curation(tmp_path / "s.yaml", tmp_path / "fail")
    rep = run_curation(tmp_path / "s.yaml", tmp_path / "skip", on_bad_input="skip")
    assert {k: v["docs"] for k, v in rep["bad_input"].items()} == {"truncated": 1}
    assert rep["input"]["docs"] == 11
    _check_invariant(rep)
