"""End-to-end curation on real text (the Python standard library's code and docstrings): accounting
invariant, byte-identical reruns, Slurm-style task splitting, resume after a kill, bad input."""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from data_pipeline import minhash
from data_pipeline.curate import CurateConfig, CurationError, run_curation
from data_pipeline.sources import SourceError, iter_curated

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ROOT = Path(__file__).resolve().parents[1]


def stdlib_docstring_docs(n: int, min_words: int = 150, max_chars: int = 12000) -> list[str]:
    """Prose from real docstrings: each stdlib module's docstrings joined, first n with enough words."""
    out = []
    for f in sorted(STDLIB.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)[:max_chars]
        if len(text.split()) >= min_words:
            out.append(text)
        if len(out) >= n:
            break
    return out


def edit_to_jaccard(text: str, target: float, tol: float = 0.03) -> str:
    """Replace k evenly spaced characters, k found by bisection, so that the 24-gram Jaccard with
    `text` is within tol of target."""
    def edited(k: int) -> str:
        step = len(text) / (k + 1)
        chars = list(text)
        for i in range(1, k + 1):
            p = int(i * step)
            chars[p] = "Q" if chars[p] != "Q" else "Z"
        return "".join(chars)

    lo, hi = 1, max(2, len(text) // 2)
    best = None
    while lo <= hi:
        k = (lo + hi) // 2
        out = edited(k)
        j = minhash.jaccard(text, out)
        if best is None or abs(j - target) < abs(best[0] - target):
            best = (j, out)
        if abs(j - target) <= tol:
            return out
        lo, hi = (k + 1, hi) if j > target else (lo, k - 1)
    raise AssertionError(f"could not reach Jaccard {target} (closest {best[0]:.3f})")


def write_jsonl(path: Path, recs: list[dict], opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def make_corpus(tmp: Path, n_prose: int = 40, code_files: int = 25) -> Path:
    """Sources YAML over: docstring prose as jsonl.gz (with planted duplicates), the same prose as
    parquet, and a tree of real stdlib .py files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.filters import FilterConfig, reject_reason

    docs = stdlib_docstring_docs(n_prose)
    good = [i for i, t in enumerate(docs) if reject_reason(t, False, FilterConfig()) is None]
    recs = [{"text": t, "n": i} for i, t in enumerate(docs)]
    recs.append({"text": docs[good[0]], "plant": "exact"})
    recs.append({"text": "  " + docs[good[1]].upper() + "\n", "plant": "exact_normalized"})
    recs.append({"text": edit_to_jaccard(docs[good[2]], 0.9), "plant": "near_0.9"})
    recs.append({"text": edit_to_jaccard(docs[good[3]], 0.5), "plant": "near_miss_0.5"})
    (tmp / "prose").mkdir(parents=True)
    half = len(recs) // 2
    write_jsonl(tmp / "prose" / "a.jsonl.gz", recs[:half], gzip.open)
    write_jsonl(tmp / "prose" / "b.jsonl", recs[half:])
    pq.write_table(pa.table({"content": docs[:10]}), tmp / "docs.parquet")
    code = tmp / "code"
    for f in sorted((STDLIB / "json").glob("*.py"))[:code_files] + sorted(STDLIB.glob("c*.py"))[:code_files]:
        rel = f.relative_to(STDLIB)
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_bytes(f.read_bytes())
    spec = [
        {"name": "prose", "kind": "jsonl", "paths": ["prose/*.jsonl*"], "keep_fields": ["n", "plant"]},
        {"name": "pq", "kind": "parquet", "paths": ["docs.parquet"], "text_field": "content"},
        {"name": "code", "kind": "code_tree", "paths": ["code"], "include": ["*.py"], "language": "python"},
    ]
    (tmp / "sources.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "sources.yaml"


def small_units() -> CurateConfig:
    return CurateConfig.model_validate({"unit_bytes": 60_000, "batch_docs": 16, "dedup": {"partitions": 4}})


def tree_digest(out: Path) -> dict[str, str]:
    """sha256 of every output file (curated shards and reports)."""
    res = {}
    for sub in ("curated", "reports"):
        for p in sorted((out / sub).rglob("*")):
            if p.is_file():
                res[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return res


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref") / "out"
    return out, run_curation(corpus, out, small_units())


def _check_invariant(r: dict) -> None:
    removed = sum(c["docs"] for c in r["filtered"].values()) + sum(c["docs"] for c in r["bad_input"].values())
    removed += r["exact_duplicates"]["docs"] + r["fuzzy_duplicates"]["docs"]
    assert r["input"]["docs"] == r["kept"]["docs"] + removed
    rb = sum(c["bytes"] for c in r["filtered"].values()) + sum(c["bytes"] for c in r["bad_input"].values())
    rb += r["exact_duplicates"]["bytes"] + r["fuzzy_duplicates"]["bytes"]
    assert r["input"]["bytes"] == r["kept"]["bytes"] + rb


def test_accounting_invariant_and_outputs(corpus, reference_run):
    out, rep = reference_run
    assert set(rep["sources"]) == {"prose", "pq", "code"}
    assert rep["units"] > 3  # several units, so tasks really split the work
    for r in [rep, *rep["sources"].values()]:
        _check_invariant(r)
    # inputs counted = records written by make_corpus
    assert rep["sources"]["pq"]["input"]["docs"] == 10
    assert rep["sources"]["code"]["input"]["docs"] == len(list((corpus.parent / "code").rglob("*.py")))
    # the parquet copies of the prose are all exact duplicates of the jsonl ones (which come first)
    assert rep["sources"]["pq"]["exact_duplicates"]["docs"] + sum(
        c["docs"] for c in rep["sources"]["pq"]["filtered"].values()) == 10
    assert rep["sources"]["pq"]["kept"]["docs"] == 0
    # planted: one exact copy, one normalized-exact copy, one ~0.9 edit in the prose source
    assert rep["sources"]["prose"]["exact_duplicates"]["docs"] == 2
    assert rep["sources"]["prose"]["fuzzy_duplicates"]["docs"] >= 1
    kept_plants = {d.get("plant") for d in iter_curated(out, ["prose"])}
    assert "near_miss_0.5" in kept_plants and not {"exact", "exact_normalized", "near_0.9"} & kept_plants
    # curated files hold exactly the kept documents, in the documented format
    kept = list(iter_curated(out))
    assert len(kept) == rep["kept"]["docs"]
    by_src = {}
    for d in kept:
        assert {"id", "source", "text", "language", "code"} <= set(d)
        by_src[d["source"]] = by_src.get(d["source"], 0) + 1
    for s, r in rep["sources"].items():
        assert by_src.get(s, 0) == r["kept"]["docs"]
    ids = [d["id"] for d in kept]
    assert len(set(ids)) == len(ids)
    assert all("n" in d or "plant" in d for d in kept if d["source"] == "prose")
    assert any(d["id"].startswith("code:json/") and d["code"] for d in kept)
    assert json.loads((out / "reports" / "run.json").read_text()) == rep


def test_rerun_skips_and_is_byte_identical(corpus, reference_run, tmp_path):
    out, rep = reference_run
    before = tree_digest(out)
    markers = {p: p.stat().st_mtime_ns for p in (out / "_work").rglob("*.done")}
    assert run_curation(corpus, out, small_units()) == rep
    assert {p: p.stat().st_mtime_ns for p in (out / "_work").rglob("*.done")} == markers  # nothing redone
    assert tree_digest(out) == before
    fresh = tmp_path / "fresh"
    assert run_curation(corpus, fresh, small_units(), cpus=2) == rep  # process pool: same bytes
    assert tree_digest(fresh) == before


def test_slurm_array_tasks_match_local_run(corpus, reference_run, tmp_path, monkeypatch):
    out, rep = reference_run
    dist = tmp_path / "dist"
    for stage in ("map", "reduce", "write"):
        for i in (1, 0, 2):  # any order within a stage
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
            r = run_curation(corpus, dist, small_units(), stage=stage)
    assert r == rep
    assert tree_digest(dist) == tree_digest(out)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(CurationError, match="needs the whole run"):
        run_curation(corpus, tmp_path / "x", small_units(), task_index=0, num_tasks=2)
    with pytest.raises(CurationError, match="map tasks not done"):
        run_curation(corpus, tmp_path / "y", small_units(), stage="reduce")


def test_changed_config_into_same_output_is_an_error(corpus, reference_run):
    out, _ = reference_run
    cfg = small_units()
    cfg.dedup.threshold = 0.5
    with pytest.raises(CurationError, match="different inputs or config"):
        run_curation(corpus, out, cfg)


@pytest.mark.multiproc
def test_killed_run_resumes_to_identical_outputs(corpus, reference_run, tmp_path):
    out, _ = reference_run
    run_dir = tmp_path / "killed"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(small_units().model_dump(mode="json")))
    cmd = [sys.executable, "-m", "pretrain.cli", "curate", "--sources", str(corpus), "--output", str(run_dir),
           "--config", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / "_work" / "map").glob("*.done")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "reports" / "run.json").exists(), "run finished before it was killed"
    done_before = len(list((run_dir / "_work" / "map").glob("*.done")))
    assert done_before >= 1
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert tree_digest(run_dir) == tree_digest(out)


def test_bad_input_policies(tmp_path):
    docs = stdlib_docstring_docs(3)
    d = tmp_path / "in"
    d.mkdir()
    with open(d / "x.jsonl", "wb") as f:
        f.write((json.dumps({"text": docs[0]}) + "\n").encode())
        f.write(b'{"text": "unterminated\n')  # line 2: malformed JSON
        f.write((json.dumps({"body": docs[1]}) + "\n").encode())  # line 3: no text field
        f.write(b'{"text": "caf\xe9 bad bytes"}\n')  # line 4: not UTF-8
        f.write((json.dumps({"text": docs[2]}) + "\n").encode())
        f.write(b'{"text": "lone \\ud800 surrogate"}\n')  # line 6: valid JSON, not encodable text
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "x", "kind": "jsonl", "paths": ["in/x.jsonl"]}]))
    with pytest.raises(CurationError, match=r"x\.jsonl:2: malformed_json"):
        run_curation(tmp_path / "s.yaml", tmp_path / "o1")
    rep = run_curation(tmp_path / "s.yaml", tmp_path / "o2", on_bad_input="skip")
    assert {k: v["docs"] for k, v in rep["bad_input"].items()} == \
        {"malformed_json": 1, "missing_text": 1, "undecodable": 2}
    assert rep["input"]["docs"] == 6
    assert rep["kept"]["docs"] + sum(c["docs"] for c in rep["filtered"].values()) == 2
    assert [(e["line"], e["reason"]) for e in rep["bad_input_examples"]] == \
        [(2, "malformed_json"), (3, "missing_text"), (4, "undecodable"), (6, "undecodable")]
    _check_invariant(rep)


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {
        "path does not exist": [{"name": "a", "kind": "jsonl", "paths": ["nope.jsonl"]}],
        "matches no files": [{"name": "a", "kind": "jsonl", "paths": ["*.jsonl"]}],
        "no input files": [{"name": "a", "kind": "text_tree", "paths": ["empty"]}],
        "unique": [{"name": "a", "kind": "text_tree", "paths": ["empty"]}] * 2,
        "kind": [{"name": "a", "kind": "csv", "paths": ["empty"]}],
    }
    for msg, spec in cases.items():
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(SourceError, match=msg):
            run_curation(tmp_path / "s.yaml", tmp_path / "o")
    with pytest.raises(SourceError, match="not found"):
        run_curation(tmp_path / "missing.yaml", tmp_path / "o")


def test_text_tree_reads_gzipped_man_pages_and_cli(tmp_path):
    docs = stdlib_docstring_docs(2)
    man = tmp_path / "man" / "man1"
    man.mkdir(parents=True)
    for i, t in enumerate(docs):
        with gzip.open(man / f"tool{i}.1.gz", "wt", encoding="utf-8") as f:
            f.write(t)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "man", "kind": "text_tree", "paths": ["man"]}]))
    from pretrain.cli import main

    assert main(["curate", "--sources", str(tmp_path / "s.yaml"), "--output", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    got = sorted(iter_curated(tmp_path / "o"), key=lambda d: d["id"])
    assert [d["id"] for d in got] == ["man:man1/tool0.1", "man:man1/tool1.1"]
    assert [d["text"] for d in got] == docs
    assert main(["curate", "--sources", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o")]) == 2
