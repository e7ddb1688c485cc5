"""The quickstart's embedded corpus is real text from this machine and a valid sources YAML."""
import json
from pathlib import Path

from data_pipeline.corpus import build_default_corpus
from data_pipeline.sources import load_sources


def test_default_corpus(tmp_path):
    path = build_default_corpus(tmp_path)
    specs = {s.name: s for s in load_sources(path)}
    assert {"python_code", "python_docs"} <= set(specs)
    assert specs["python_code"].code is True and specs["python_docs"].code is False
    docs = [json.loads(line) for line in (tmp_path / "corpus" / "python_docs.jsonl").open()]
    titles = {d["title"] for d in docs}
    assert "topic:assert" in titles and "module:json" not in titles  # packages are left out
    assert "module:textwrap.py" in titles
    textwrap = next(d for d in docs if d["title"] == "module:textwrap.py")
    assert "TextWrapper (class)" in textwrap["text"] and len(textwrap["text"].split()) > 100
    # Rebuilding reuses the written documents.
    before = (tmp_path / "corpus" / "python_docs.jsonl").stat().st_mtime_ns
    build_default_corpus(tmp_path)
    assert (tmp_path / "corpus" / "python_docs.jsonl").stat().st_mtime_ns == before


def test_render_man_page():
    from data_pipeline.corpus import render_man

    src = ('.\\" comment\n.TH glob 7\n.SH NAME\nglob \\- globbing pathnames\n.SH DESCRIPTION\n'
           'A library routine\n.BR glob (3)\nexists.\n.PP\nIt matches \\[aq]?\\[aq] and \\fIfiles\\fP.\n')
    text = render_man(src)
    assert text == "NAME\n\nglob - globbing pathnames\n\nDESCRIPTION\n\nA library routine glob(3) exists.\n\nIt matches '?' and files.\n"


def test_relative_output_dir(tmp_path, monkeypatch):
    """A relative --output (the Makefile's runs/quickstart) must give a sources YAML whose paths resolve."""
    monkeypatch.chdir(tmp_path)
    path = build_default_corpus("runs/qs")
    for spec in load_sources(path):
        for p in spec.paths:
            assert Path(p).exists(), p
