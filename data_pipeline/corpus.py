"""The quickstart's embedded default corpus: real text already on any machine that has Python, so a first run
needs no download.

Three sources, written as a sources YAML that `foldtron curate` reads (users replace it with their own):
  python_code  the standard library's own modules (a code source, one document per file)
  python_docs  prose: the reference-manual topics shipped in `pydoc_data` and, per stdlib module, its module,
               class and function docstrings (extracted with `ast`, nothing is imported or executed)
  manpages     system manual pages (sections 5 and 7), where the machine has them, rendered from troff to
               plain text (raw troff fails most prose filters on its markup, not on its text)
"""
from __future__ import annotations

import ast
import gzip
import json
import re
import sysconfig
from pathlib import Path
from typing import Any

import yaml

#: stdlib modules read as code and as docstrings: the top-level modules (~170 files, ~5 MB); fnmatch's `*`
#: crosses `/`, so "*/*" is what leaves out every package directory (site-packages, test, ...).
CODE_INCLUDE = ["*.py"]
CODE_EXCLUDE = ["*/*", "__phello__*", "this.py"]
MAN_SECTIONS = ("man5", "man7")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstring_document(path: Path, rel: str) -> str | None:
    """One prose document per module: its docstring, then each public class/function docstring under a heading."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 8:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                parts.append(f"{node.name} ({kind})\n\n{doc}")
    if not parts:
        return None
    return f"Module {rel[:-3].replace('/', '.')}\n\n" + "\n\n".join(parts)


def _matches(rel: str, include: list[str], exclude: list[str]) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(rel, p) for p in include) and not any(fnmatch(rel, p) for p in exclude)


def write_python_docs(out: Path) -> int:
    """Write the prose source as JSONL; returns the number of documents."""
    import pydoc_data.topics as topics

    root = stdlib_dir()
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for name in sorted(topics.topics):
            f.write(json.dumps({"text": topics.topics[name], "title": f"topic:{name}"}) + "\n")
            n += 1
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not _matches(rel, CODE_INCLUDE, CODE_EXCLUDE):
                continue
            doc = _docstring_document(path, rel)
            if doc:
                f.write(json.dumps({"text": doc, "title": f"module:{rel}"}) + "\n")
                n += 1
    tmp.replace(out)
    return n


_ESCAPES = {r"\-": "-", r"\[aq]": "'", r"\(aq": "'", r"\[dq]": '"', r"\(dq": '"', r"\[em]": "\u2014",
            r"\(em": "\u2014", r"\[en]": "\u2013", r"\(en": "\u2013", r"\[bu]": "\u2022", r"\(bu": "\u2022",
            r"\e": "\\", r"\ ": " ", r"\~": " ", r"\&": "", r"\/": "", r"\,": "", r"\|": "", r"\^": "", r"\:": ""}
_ESCAPE_RE = re.compile("|".join(re.escape(k) for k in sorted(_ESCAPES, key=len, reverse=True)))
_FONT_RE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_OTHER_RE = re.compile(r"\\(\[[^\]]*\]|\(..|\*\(..|\*.|s[-+]?\d|.)")
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}


def _inline(text: str) -> str:
    text = _FONT_RE.sub("", text)
    text = _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], text)
    return _OTHER_RE.sub("", text)


def _args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def render_man(source: str) -> str:
    """A small troff (man macros) to plain-text renderer: headings, paragraphs, font macros and the common
    escapes. Enough to turn a manual page into the prose a reader sees; tables and equations stay as text."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}', "\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in ("SH", "SS"):
                out.append("\n" + _inline(" ".join(_args(rest))) + "\n")
            elif macro in ("PP", "P", "LP", "TP", "sp", "br", "HP"):
                out.append("")
            elif macro == "IP":
                out.append("")
                if rest:
                    out.append(_inline(_args(rest)[0]) + " ")
            elif macro in ("B", "I", "SM", "SB"):
                out.append(_inline(" ".join(_args(rest))))
            elif macro in _ALTERNATING:
                out.append(_inline("".join(_args(rest))))
            continue  # other requests (TH, RS, RE, nf, fi, ...) carry layout only
        out.append(_inline(line))
    text = "\n".join(out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"(?<=[^\n])\n(?=[^\n])", " ", text)  # join filled lines into paragraphs
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def write_manpages(man_dirs: list[Path], out: Path) -> int:
    """Render every page under `man_dirs` to plain text, one JSONL record each; returns the count."""
    n = 0
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for d in man_dirs:
            for page in sorted(d.iterdir()):
                if not page.is_file():
                    continue
                raw = gzip.open(page).read() if page.suffix == ".gz" else page.read_bytes()
                text = render_man(raw.decode("utf-8", errors="replace"))
                if text.strip() and not text.startswith(".so"):
                    f.write(json.dumps({"text": text, "title": f"man:{d.name}/{page.name}"}) + "\n")
                    n += 1
    tmp.replace(out)
    return n


def build_default_corpus(out_dir: str | Path, man_root: str | Path = "/usr/share/man") -> Path:
    """Write OUT/corpus/python_docs.jsonl and OUT/corpus/sources.yaml; return the sources YAML path."""
    out = Path(out_dir).resolve() / "corpus"  # the YAML resolves relative paths against its own folder
    docs = out / "python_docs.jsonl"
    if not docs.exists():
        write_python_docs(docs)
    sources: list[dict[str, Any]] = [
        # A few stdlib files are not UTF-8: count and skip them rather than stop the run.
        {"name": "python_code", "kind": "code_tree", "paths": [str(stdlib_dir())],
         "include": CODE_INCLUDE, "exclude": CODE_EXCLUDE, "language": "python", "on_bad_input": "skip"},
        {"name": "python_docs", "kind": "jsonl", "paths": [str(docs)], "text_field": "text",
         "keep_fields": ["title"]},
    ]
    man = Path(man_root)
    man_dirs = [man / s for s in MAN_SECTIONS if (man / s).is_dir() and any((man / s).iterdir())]
    pages = out / "manpages.jsonl"
    if man_dirs and (pages.exists() or write_manpages(man_dirs, pages)):
        sources.append({"name": "manpages", "kind": "jsonl", "paths": [str(pages)], "text_field": "text",
                        "keep_fields": ["title"]})
    path = out / "sources.yaml"
    path.write_text("# The quickstart's embedded corpus (data_pipeline/corpus.py); replace with your own sources.\n"
                    + yaml.safe_dump({"sources": sources}, sort_keys=False))
    return path


# --- labelled sets for the quickstart's quality classifiers -----------------------------------------------------

def _shuffled(text: str, seed: int) -> str:
    import random

    r = random.Random(seed)
    paras = []
    for para in text.split("\n\n"):
        words = para.split()
        r.shuffle(words)
        paras.append(" ".join(words))
    return "\n\n".join(paras)


def _signature_listing(path: Path, rel: str) -> str | None:
    """Machine-made boilerplate from a module's code: one line per public def/class with its arguments, as an
    API index generator would print it; no explanation."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            args = ", ".join(a.arg for a in node.args.args)
            lines.append(f"{node.name} (function) {rel[:-3]}.{node.name}({args}) returns value see also {rel}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            lines.append(f"{node.name} (class) {rel[:-3]}.{node.name} bases: "
                         f"{', '.join(ast.unparse(b) for b in node.bases) or 'object'} module {rel}")
    return "\n".join(lines) if len(lines) >= 5 else None


def write_quality_sets(out_dir: str | Path) -> dict[str, Any]:
    """Labelled JSONL for two small quality classifiers, derived from the embedded corpus. What the labels mean:
      fluency   positive: the reference-manual topics shipped in `pydoc_data` (human-written prose);
                negative: the same topics with every paragraph's words shuffled (same words, no language).
      prose     positive: the same reference topics; negative: API listings generated from the stdlib's code
                (one line per public def/class and its arguments: machine-made boilerplate, no explanation).
    Neither is a judgement of "quality" in general: they score how much a document reads like the reference
    manual's explanatory prose. The topics are also in the `python_docs` source, so those documents are scored
    by classifiers that saw them in training (the held-out metrics are on documents they did not see)."""
    import pydoc_data.topics as topics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prose = [topics.topics[k] for k in sorted(topics.topics) if len(topics.topics[k].split()) >= 50]
    root = stdlib_dir()
    listings = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _matches(rel, CODE_INCLUDE, CODE_EXCLUDE):
            doc = _signature_listing(path, rel)
            if doc:
                listings.append(doc)
    sets = {"reference_prose": prose, "shuffled_prose": [_shuffled(t, i) for i, t in enumerate(prose)],
            "api_listings": listings}
    paths = {}
    for name, texts in sets.items():
        p = out / f"{name}.jsonl"
        tmp = p.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        tmp.replace(p)
        paths[name] = str(p)
    return {"paths": paths, "documents": {k: len(v) for k, v in sets.items()}}
