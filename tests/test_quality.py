"""Language identification, fastText quality classifiers and quality buckets in curation, on real text (the Python
standard library's docstrings and code). Two classifiers are trained here from labelled JSONL:
  order  natural word order (prose and code) against the same documents with the words shuffled
  kind   prose (natural and shuffled) against code (natural and shuffled)
so on documents neither saw, natural prose scores high on both and shuffled prose low on `order`: with
`combine: min` the planted corpus's bucket assignment is known (natural -> hq, shuffled -> lq)."""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_pipeline.curate import CurateConfig, CurationError, run_curation
from data_pipeline.quality import QualityConfig, QualityError, TrainConfig, score_batch, train_classifier
from tests.test_curate import ROOT, STDLIB, stdlib_docstring_docs, tree_digest, write_jsonl
from tests.test_slurm import SLURM, cluster, exit_code, job_env, wait  # noqa: F401  (cluster: a fixture)

GERMAN = ("Die Bibliothek stellt Funktionen bereit, mit denen man Dateien lesen und schreiben kann. Jede Funktion "
          "nimmt einen Pfad und gibt den Inhalt der Datei zurück, oder sie meldet einen Fehler, wenn die Datei "
          "nicht gelesen werden kann. Die Beispiele in diesem Kapitel zeigen, wie man die Funktionen in einem "
          "kleinen Programm verwendet und wie man die Fehler behandelt, die dabei auftreten können. Außerdem "
          "erklärt das Kapitel, warum man Dateien immer schließen sollte, sobald man sie nicht mehr braucht, und "
          "wie der Interpreter das mit einem Kontextmanager für den Benutzer übernimmt.")


def shuffle_words(text: str, seed: int) -> str:
    """Every paragraph's words in random order: the same words, no longer language."""
    r = random.Random(seed)
    out = []
    for para in text.split("\n\n"):
        w = para.split()
        r.shuffle(w)
        out.append(" ".join(w))
    return "\n\n".join(out)


def shuffle_lines(text: str, seed: int) -> str:
    r = random.Random(seed)
    out = []
    for line in text.split("\n"):
        w = line.split(" ")
        r.shuffle(w)
        out.append(" ".join(w))
    return "\n".join(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("models")
    prose = stdlib_docstring_docs(140)
    code = [t[:12000] for t in (f.read_text(encoding="utf-8") for f in sorted(STDLIB.glob("*.py"))) if len(t) > 3000]
    tp, tc = prose[:90], code[:90]
    sp = [shuffle_words(t, i) for i, t in enumerate(tp)]
    sc = [shuffle_lines(t, i) for i, t in enumerate(tc)]
    for name, texts in (("natural", tp + tc), ("shuffled", sp + sc), ("prose", tp + sp), ("code", tc + sc)):
        write_jsonl(d / f"{name}.jsonl", [{"text": t} for t in texts])
    cfg = TrainConfig(epoch=30)
    order = train_classifier([d / "natural.jsonl"], [d / "shuffled.jsonl"], d / "order.bin", cfg)
    kind = train_classifier([d / "prose.jsonl"], [d / "code.jsonl"], d / "kind.bin", cfg)
    return {"dir": d, "order": order, "kind": kind, "held_out_prose": prose[90:]}


def quality_cfg(models: dict, **over) -> dict:
    q = {"classifiers": [{"name": "order", "path": str(models["dir"] / "order.bin")},
                         {"name": "kind", "path": str(models["dir"] / "kind.bin")}],
         "combine": "min", "buckets": [{"name": "hq", "min_score": 10}, {"name": "lq", "min_score": 0}]}
    q.update(over)
    return q


def test_training_writes_model_and_held_out_metrics(models):
    for name in ("order", "kind"):
        m = models[name]
        side = json.loads((models["dir"] / f"{name}.bin.json").read_text())
        assert side == m
        assert m["held_out_docs"] == m["held_out_positive"] + m["held_out_negative"] > 10
        assert m["train_docs"] + m["held_out_docs"] == m["documents"]["positive"] + m["documents"]["negative"]
        assert m["precision"] >= 0.8 and m["recall"] >= 0.7, m  # both tasks are learnable from these sets
    # the same data and settings give the same model bytes (one training thread)
    again = train_classifier([models["dir"] / "prose.jsonl"], [models["dir"] / "code.jsonl"],
                             models["dir"] / "kind2.bin", TrainConfig(epoch=30))
    assert again["sha256"] == models["kind"]["sha256"]


def test_training_input_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine words here"}\n{"body": "no text"}\n')
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"text": f"document number {i} with words"} for i in range(30)])
    with pytest.raises(QualityError, match=r"bad\.jsonl:2: record has no string field 'text'"):
        train_classifier([good], [bad], tmp_path / "m.bin")
    with pytest.raises(QualityError, match="negative file .*missing.jsonl not found"):
        train_classifier([good], [tmp_path / "missing.jsonl"], tmp_path / "m.bin")
    from pretrain.cli import main

    assert main(["classifier", "train", "--positive", str(good), "--negative", str(bad),
                 "--output", str(tmp_path / "m.bin")]) == 2


def test_score_combination_and_buckets():
    q = QualityConfig.model_validate({"classifiers": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}],
                                      "buckets": [{"name": "hq", "min_score": 15}, {"name": "mq", "min_score": 8},
                                                  {"name": "lq", "min_score": 0}]})
    p = np.array([[0.99, 0.10], [0.50, 0.45], [0.05, 0.30], [1.0, 0.7999]])
    ints = q.int_score(p)
    assert ints.tolist() == [[19, 2], [10, 9], [1, 6], [19, 15]]
    assert q.combine_scores(ints).tolist() == [19, 10, 6, 19]  # max, the default (Nemotron-CC)
    assert [q.bucket_of(s) for s in (19, 15, 14, 8, 7, 0)] == [0, 0, 1, 1, 2, 2]
    q.combine = "mean"
    assert q.combine_scores(ints).tolist() == [10, 9, 3, 17]
    q.combine = "min"
    assert q.combine_scores(ints).tolist() == [2, 9, 1, 15]
    for bad, msg in (({"buckets": [{"name": "hq", "min_score": 5}]}, "min_score 0"),
                     ({"buckets": [{"name": "a", "min_score": 0}, {"name": "b", "min_score": 5}]}, "best first"),
                     ({"buckets": []}, "no quality.buckets"),
                     ({"buckets": [{"name": "a", "min_score": 25}, {"name": "b", "min_score": 0}]}, "never be reached")):
        with pytest.raises(ValueError, match=msg):
            QualityConfig.model_validate({"classifiers": [{"name": "a", "path": "x"}], **bad})
    with pytest.raises(ValueError, match="no quality.classifiers"):
        QualityConfig.model_validate({"buckets": [{"name": "a", "min_score": 0}]})


def planted_corpus(tmp: Path, models: dict) -> tuple[Path, dict]:
    """A prose source of unseen natural docstrings (-> hq), the same shuffled (-> lq), one German document (dropped
    by langid) and an exact duplicate; a code source (labelled by langid, not bucketed)."""
    from data_pipeline.filters import reject_reason

    filters = curate_cfg(models).filters
    pairs = [(t, shuffle_words(t, 1000 + i)) for i, t in enumerate(models["held_out_prose"])]
    pairs = [(a, b) for a, b in pairs if reject_reason(a, False, filters) is None
             and reject_reason(b, False, filters) is None][:20]
    assert len(pairs) == 20
    prose = [a for a, _ in pairs]
    recs = [{"text": a, "want": "hq"} for a, _ in pairs] + [{"text": b, "want": "lq"} for _, b in pairs]
    recs.append({"text": GERMAN, "want": "language"})
    recs.append({"text": prose[3], "want": "duplicate"})
    order = random.Random(7).sample(range(len(recs)), len(recs))
    recs = [recs[i] for i in order]
    (tmp / "crawl").mkdir(parents=True)
    write_jsonl(tmp / "crawl" / "a.jsonl", recs[: len(recs) // 2])
    write_jsonl(tmp / "crawl" / "b.jsonl", recs[len(recs) // 2:])
    code = tmp / "code"
    code.mkdir()
    for f in sorted((STDLIB / "json").glob("*.py")):
        (code / f.name).write_bytes(f.read_bytes())
    spec = [{"name": "crawl", "kind": "jsonl", "paths": ["crawl/*.jsonl"], "keep_fields": ["want"]},
            {"name": "code", "kind": "code_tree", "paths": ["code"], "include": ["*.py"]}]
    (tmp / "sources.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "sources.yaml", {"hq": 20, "lq": 20}


def curate_cfg(models: dict, **quality_over) -> CurateConfig:
    # the German document is also too short for the prose filters' 50-word floor: lowered so that langid,
    # which runs first, is what drops it
    return CurateConfig.model_validate({
        "unit_bytes": 40_000, "batch_docs": 8, "dedup": {"partitions": 3},
        "filters": {"prose": {"min_words": 20, "max_top_ngram": {}, "max_dup_ngram": {}}},
        "langid": {"enabled": True, "keep": ["en"]},
        "quality": quality_cfg(models, **quality_over)})


@pytest.fixture(scope="module")
def planted_run(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    sources, want = planted_corpus(tmp / "in", models)
    out = tmp / "out"
    return sources, out, run_curation(sources, out, curate_cfg(models)), want


def test_planted_buckets_langid_and_accounting(models, planted_run):
    from data_pipeline.sources import iter_curated

    sources, out, rep, want = planted_run
    crawl = rep["sources"]["crawl"]
    assert crawl["input"]["docs"] == 42
    assert crawl["filtered"] == {"language": crawl["filtered"]["language"]}
    assert crawl["filtered"]["language"]["docs"] == 1
    assert crawl["exact_duplicates"]["docs"] == 1
    assert {k: v["docs"] for k, v in crawl["kept_by_bucket"].items()} == {"crawl_hq": 20, "crawl_lq": 20}
    assert rep["kept_by_bucket"]["code"]["docs"] == rep["sources"]["code"]["kept"]["docs"] > 0
    assert crawl["languages"]["de"]["docs"] == 1 and crawl["languages"]["en"]["docs"] == 41
    # input = kept per bucket + filtered per reason + duplicates, in documents and bytes
    for r in (rep, crawl):
        for k in ("docs", "bytes"):
            removed = sum(c[k] for key in ("filtered", "bad_input") for c in r[key].values())
            removed += r["exact_duplicates"][k] + r["fuzzy_duplicates"][k]
            assert r["input"][k] == sum(c[k] for c in r["kept_by_bucket"].values()) + removed
    assert sum(c["docs"] for c in crawl["quality_scores"].values()) == 40
    for bucket in ("hq", "lq"):
        docs = list(iter_curated(out, [f"crawl_{bucket}"]))
        assert len(docs) == want[bucket]
        assert {d["want"] for d in docs} == {bucket}
        for d in docs:
            assert set(d["quality"]) == {"order", "kind"} and d["quality_bucket"] == bucket
            assert d["detected_language"] == "en" and 0 < d["language_score"] <= 1
            assert d["source"] == f"crawl_{bucket}" and d["from_source"] == "crawl"
            assert d["quality_score"] == min(min(int(p * 20), 19) for p in d["quality"].values())
        man = json.loads((out / "curated" / f"crawl_{bucket}" / "manifest.json").read_text())
        assert man["documents"] == want[bucket] and man["from_source"] == "crawl"
        assert man["bucket"]["name"] == bucket and man["bucket"]["combine"] == "min"
        for part in man["parts"]:
            from data_pipeline.quality import sha256_of

            assert sha256_of(out / "curated" / f"crawl_{bucket}" / part["file"]) == part["sha256"]
    code = list(iter_curated(out, ["code"]))
    assert code and all("quality" not in d and "detected_language" in d for d in code)
    assert json.loads((out / "curated" / "code" / "manifest.json").read_text())["bucket"] is None


def test_buckets_feed_shards_as_sources(planted_run, tmp_path):
    from data_pipeline.shards import write_shards
    from data_pipeline.sources import iter_curated
    from data_pipeline.tokenizer import TrainConfig as TokConfig
    from data_pipeline.tokenizer import train_bpe

    _, out, rep, _ = planted_run
    tok = train_bpe((d["text"] for d in iter_curated(out)), TokConfig(vocab_size=512))
    tok.save(tmp_path / "tok.json")
    man = write_shards(out / "curated", tmp_path / "shards", tmp_path / "tok.json", shard_bytes=1 << 20)
    assert set(man) == {"code", "crawl_hq", "crawl_lq"}
    assert {s: m.documents for s, m in man.items()} == {s: c["docs"] for s, c in rep["kept_by_bucket"].items()}


def test_slurm_array_tasks_and_rerun_match_local_run(models, planted_run, tmp_path, monkeypatch):
    sources, out, rep, _ = planted_run
    dist = tmp_path / "dist"
    for stage in ("map", "reduce", "write"):
        for i in (2, 0, 1):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
            r = run_curation(sources, dist, curate_cfg(models), stage=stage)
    assert r == rep
    assert tree_digest(dist) == tree_digest(out)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert run_curation(sources, out, curate_cfg(models)) == rep  # rerun: every task skipped, same report
    assert tree_digest(dist) == tree_digest(out)


def test_bad_classifier_or_langid_config_fails_before_any_task(models, planted_run, tmp_path):
    sources, _, _, _ = planted_run
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a fastText model at all")
    cases = [
        ({"classifiers": [{"name": "order", "path": str(tmp_path / "missing.bin")}]}, "missing.bin not found"),
        ({"classifiers": [{"name": "order", "path": str(junk)}]}, r"junk\.bin as a fastText model"),
        ({"classifiers": [{"name": "order", "path": str(models["dir"] / "order.bin"), "label": "great"}]},
         "not the positive label '__label__great'"),
        ({"sources": ["crawl", "web"]}, r"quality.sources names \['web'\]"),
    ]
    for i, (over, msg) in enumerate(cases):
        out = tmp_path / f"o{i}"
        with pytest.raises(CurationError, match=msg):
            run_curation(sources, out, curate_cfg(models, **over))
        assert not (out / "_work" / "map").exists()
    cfg = curate_cfg(models)
    cfg.langid.keep = ["en", "klingon"]
    with pytest.raises(CurationError, match=r"langid.keep: unknown language code\(s\) \['klingon'\]"):
        run_curation(sources, tmp_path / "lang", cfg)


def test_unscorable_documents_are_counted(models, tmp_path):
    """A document whose first max_chars characters hold no word cannot be scored: counted, not kept."""
    from data_pipeline.filters import FilterConfig, reject_reason

    docs = [t for t in models["held_out_prose"] if reject_reason("\n" * 40 + t, False, FilterConfig()) is None][:3]
    assert len(docs) == 3
    write_jsonl(tmp_path / "x.jsonl", [{"text": "\n" * 40 + docs[0]}, {"text": docs[1]}, {"text": docs[2]}])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "x", "kind": "jsonl", "paths": ["x.jsonl"]}]))
    q = quality_cfg(models)
    q["classifiers"][0]["max_chars"] = 32
    rep = run_curation(tmp_path / "s.yaml", tmp_path / "o", CurateConfig.model_validate({"quality": q}))
    assert rep["filtered"]["unscorable"]["docs"] == 1
    assert sum(c["docs"] for c in rep["kept_by_bucket"].values()) == rep["kept"]["docs"] == 2
    ok, _, score, bucket = score_batch(["   ", "some words"], QualityConfig.model_validate(q))
    assert ok.tolist() == [False, True] and score[0] == -1 and bucket[0] == -1


def test_config_paths_are_relative_to_the_config_file(models, tmp_path):
    from data_pipeline.curate import load_config

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "order.bin").write_bytes((models["dir"] / "order.bin").read_bytes())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"quality": {
        "classifiers": [{"name": "order", "path": "m/order.bin"}], "buckets": [{"name": "all", "min_score": 0}]}}))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.quality.classifiers[0].path == str(tmp_path / "m" / "order.bin")


@pytest.mark.slow
def test_quickstart_curation_buckets_its_corpus(tmp_path):
    """The quickstart's own steps up to curation: two classifiers from its corpus, langid, and both buckets of
    the prose sources populated (the curriculum then blends them)."""
    from pretrain.quickstart import Quickstart

    q = Quickstart(tmp_path, cpus=1, log=lambda m: None)
    for step in ("corpus", "classifiers", "curate"):
        q.run_step(step, getattr(q, step))
    models = q.results["classifiers"]["models"]
    assert set(models) == {"fluency", "prose"} and all(m["held_out_docs"] > 0 for m in models.values())
    cur = q.results["curate"]
    assert cur["buckets"]["python_docs_hq"] > 0 and cur["buckets"]["python_docs_mq"] > 0
    assert "python_code" in cur["buckets"] and cur["languages"]["en"] > 0
    assert sum(cur["buckets"].values()) == cur["kept_docs"]


def test_classifier_cli_train_and_score(models, tmp_path, capsys):
    from pretrain.cli import main

    d = models["dir"]
    out = tmp_path / "m.bin"
    assert main(["classifier", "train", "--positive", str(d / "prose.jsonl"), "--negative", str(d / "code.jsonl"),
                 "--output", str(out), "--epoch", "30"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["precision"] == models["kind"]["precision"] and out.with_name("m.bin.json").is_file()
    probe = tmp_path / "probe.jsonl"
    write_jsonl(probe, [{"text": models["held_out_prose"][0]}, {"text": (STDLIB / "json" / "decoder.py").read_text()}])
    assert main(["classifier", "score", "--model", str(out), "--input", str(probe)]) == 0
    p = [json.loads(line)["p"] for line in capsys.readouterr().out.splitlines()]
    assert p[0] > 0.5 > p[1]
    assert main(["classifier", "score", "--model", str(tmp_path / "nope.bin"), "--input", str(probe)]) == 2


@pytest.mark.slurm
@pytest.mark.multiproc
@pytest.mark.usefixtures("cluster")  # skips, saying how to start one, when no Slurm answers
def test_real_slurm_arrays_with_langid_and_buckets_match_local_run(models, planted_run, tmp_path):
    """submit_curation.sh (map array -> reduce array -> write array, afterok) with langid + two classifiers +
    buckets: byte-identical curated buckets, manifests and report to the local run."""
    sources, out, rep, _ = planted_run
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(yaml.safe_dump(curate_cfg(models).model_dump(mode="json")))
    dist, logs = tmp_path / "slurm", tmp_path / "logs"
    logs.mkdir()
    sub = subprocess.run([str(SLURM / "submit_curation.sh"), "--reduce-tasks=2", "--cpus-per-task=1", "--mem=0",
                          "--time=10", f"--output={logs}/%x-%A_%a.out", "2", "2", str(sources), str(dist), str(cfg)],
                         capture_output=True, text=True, env=job_env(), cwd=ROOT, timeout=60)
    assert sub.returncode == 0, sub.stderr
    ids = sub.stdout.split()
    recs = wait(ids, 600, sorted(logs.glob("*")))
    for jid in ids:
        for r in recs[jid]:
            assert (r["JobState"], exit_code(r)) == ("COMPLETED", 0), [p.read_text()[-2000:] for p in logs.glob("*")]
    assert json.loads((dist / "reports" / "run.json").read_text()) == rep
    assert tree_digest(dist) == tree_digest(out)
