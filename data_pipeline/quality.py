"""Model-based quality classification (the Nemotron-CC / DCLM recipe): fastText classifiers trained on a
positive and a negative source, an ensemble score per document, and quality buckets.

Training (`foldtron classifier train`): labelled JSONL in (positive files, negative files; `.jsonl`, `.gz` or
`.zst`), a deterministic held-out split by hash of the text, fastText supervised training on one thread (so the
model file is the same bytes on a rerun), and `<model>.json` beside the model with held-out precision, recall,
F1 and accuracy of the positive label at p >= 0.5, the counts, the labels and the training settings.

Scoring (`foldtron curate`, write stage, after dedup so duplicates cost nothing): each classifier gives p, the
probability of its positive label; its integer score is min(floor(p * resolution), resolution - 1) (0..19 by
default, like Nemotron-CC's 20 levels, but from p directly rather than from corpus percentiles, so a task can
score its documents without a global pass); the ensemble score is their max (Nemotron-CC), mean (rounded
down) or min. A document's bucket is the first configured bucket whose `min_score` it reaches (buckets are
listed best first, the last one starting at 0, so every scorable document has one). A scored document keeps
`quality` ({classifier: p}), `quality_score` and `quality_bucket`; its output source is `<source>_<bucket>`
(e.g. `crawl_hq`). A document with no token a classifier can read (empty after normalization) is counted under
the accounting reason `unscorable`.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

UNSCORABLE = "unscorable"  # the accounting reason


class QualityError(RuntimeError):
    """Bad training data, an unreadable or unusable classifier file; the message names it."""


#: fastText reads at most 1024 tokens of a line as one example (MAX_LINE_SIZE) and takes the rest of a longer
#: line for unlabelled examples, which made training diverge ("Encountered NaN") on long documents here.
MAX_WORDS = 1000


def normalize(text: str, max_chars: int) -> str:
    """What a classifier reads: the first max_chars characters, lowercased, on one line (fastText splits on
    whitespace and reads one example per line), at most MAX_WORDS words."""
    return " ".join(text[:max_chars].lower().split()[:MAX_WORDS])


# --- config ------------------------------------------------------------------------------------------


class ClassifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # key in each document's `quality`
    path: str  # fastText .bin from `foldtron classifier train` (relative: to the config file's folder)
    label: str = "hq"  # the positive label; the score is its probability
    max_chars: int = Field(20000, ge=1)  # characters read per document


class BucketSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # output source `<source>_<name>`
    min_score: int = Field(ge=0)  # lowest ensemble score in this bucket


class QualityConfig(BaseModel):
    """Classifier ensemble and buckets; no classifiers (the default) turns the stage off."""
    model_config = ConfigDict(extra="forbid")
    classifiers: list[ClassifierSpec] = Field(default_factory=list)
    combine: Literal["max", "mean", "min"] = "max"  # Nemotron-CC: max over the ensemble
    resolution: int = Field(20, ge=2)  # integer score levels per classifier (0 .. resolution-1)
    buckets: list[BucketSpec] = Field(default_factory=list)  # best first; the last has min_score 0
    sources: list[str] | None = None  # sources scored and bucketed; null: every non-code source

    @model_validator(mode="after")
    def _check(self) -> "QualityConfig":
        if not self.classifiers:
            if self.buckets:
                raise ValueError("quality.buckets given but no quality.classifiers to score with")
            return self
        names = [c.name for c in self.classifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"quality.classifiers: names must be unique, got {names}")
        if not self.buckets:
            raise ValueError("quality.classifiers given but no quality.buckets (e.g. [{name: hq, min_score: 15}, "
                             "{name: mq, min_score: 8}, {name: lq, min_score: 0}])")
        bn = [b.name for b in self.buckets]
        if len(set(bn)) != len(bn):
            raise ValueError(f"quality.buckets: names must be unique, got {bn}")
        mins = [b.min_score for b in self.buckets]
        if mins != sorted(mins, reverse=True) or len(set(mins)) != len(mins):
            raise ValueError(f"quality.buckets must be listed best first with decreasing min_score, got {mins}")
        if mins[-1] != 0:
            raise ValueError(f"quality.buckets: the last bucket must have min_score 0 so every document gets one "
                             f"(got {mins[-1]})")
        if mins[0] > self.resolution - 1:
            raise ValueError(f"quality.buckets: min_score {mins[0]} can never be reached with resolution "
                             f"{self.resolution} (scores 0..{self.resolution - 1})")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.classifiers)

    def bucketed(self, source: str, is_code: bool) -> bool:
        if not self.enabled:
            return False
        return (not is_code) if self.sources is None else source in self.sources

    def bucket_of(self, score: int) -> int:
        for i, b in enumerate(self.buckets):
            if score >= b.min_score:
                return i
        raise AssertionError("unreachable: the last bucket starts at 0")

    def combine_scores(self, ints: np.ndarray) -> np.ndarray:
        """[docs, classifiers] integer scores -> ensemble integer score per document."""
        if self.combine == "max":
            return ints.max(axis=1)
        if self.combine == "min":
            return ints.min(axis=1)
        return np.floor(ints.mean(axis=1)).astype(np.int64)

    def int_score(self, p: np.ndarray) -> np.ndarray:
        return np.minimum(np.floor(p * self.resolution).astype(np.int64), self.resolution - 1)


# --- fastText models ---------------------------------------------------------------------------------


def _fasttext():
    try:
        import fasttext
    except ImportError as e:
        raise QualityError(f"quality classifiers need fastText (pip install fasttext-numpy2-wheel): {e}") from None
    fasttext.FastText.eprint = lambda *a, **k: None  # silence load_model's deprecation banner
    return fasttext


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Classifier:
    """One loaded fastText model and its positive label."""

    def __init__(self, spec: ClassifierSpec):
        self.spec = spec
        p = Path(spec.path)
        if not p.is_file():
            raise QualityError(f"classifier {spec.name!r}: model file {p} not found")
        ft = _fasttext()
        try:
            self.model = ft.load_model(str(p))
        except Exception as e:  # fastText raises ValueError / RuntimeError on a bad file
            raise QualityError(f"classifier {spec.name!r}: cannot load {p} as a fastText model "
                               f"({type(e).__name__}: {e})") from None
        labels = list(self.model.get_labels())
        want = f"__label__{spec.label}"
        if want not in labels:
            raise QualityError(f"classifier {spec.name!r}: {p} has labels {labels}, not the positive label "
                               f"{want!r} (set `label:` to one of its labels)")
        self.k = len(labels)
        self.label = want

    def predict(self, texts: list[str]) -> np.ndarray:
        """p(positive) per normalized text (texts must be non-empty single lines)."""
        if not texts:
            return np.zeros(0)
        labels, probs = self.model.predict(texts, k=self.k)
        out = np.zeros(len(texts))
        for i, (ls, ps) in enumerate(zip(labels, probs)):
            for lab, pr in zip(ls, ps):
                if lab == self.label:
                    out[i] = min(1.0, float(pr))
                    break
        return out


_LOADED: dict[tuple, Classifier] = {}


def load_classifier(spec: ClassifierSpec) -> Classifier:
    """Loaded once per process and spec (a pool worker or an array task scores many batches)."""
    p = Path(spec.path)
    st = p.stat() if p.is_file() else None  # a retrained file at the same path is a new model
    key = (spec.name, str(p.resolve()), spec.label, st and (st.st_size, st.st_mtime_ns))
    if key not in _LOADED:
        _LOADED[key] = Classifier(spec)
    return _LOADED[key]


def check_classifiers(cfg: QualityConfig) -> dict[str, str]:
    """Load every classifier (an error names the file) and return {name: sha256 of its model file}."""
    out = {}
    for spec in cfg.classifiers:
        load_classifier(spec)
        out[spec.name] = sha256_of(spec.path)
    return out


def score_batch(texts: list[str], cfg: QualityConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scorable mask, p [docs, classifiers] rounded to 4 digits, ensemble score, bucket index) for raw texts;
    entries of unscorable documents are 0 / -1."""
    n, k = len(texts), len(cfg.classifiers)
    probs = np.zeros((n, k))
    ok = np.ones(n, bool)
    for j, spec in enumerate(cfg.classifiers):
        norm = [normalize(t, spec.max_chars) for t in texts]
        for i, t in enumerate(norm):
            if not t:
                ok[i] = False
        idx = [i for i in range(n) if ok[i]]
        probs[idx, j] = load_classifier(spec).predict([norm[i] for i in idx])
    probs = np.round(probs, 4)
    ints = cfg.int_score(probs)
    score = np.where(ok, cfg.combine_scores(ints) if k else 0, -1)
    bucket = np.array([cfg.bucket_of(int(s)) if s >= 0 else -1 for s in score], dtype=np.int64)
    return ok, probs, score, bucket


# --- training ----------------------------------------------------------------------------------------


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text_field: str = "text"
    positive_label: str = "hq"
    negative_label: str = "lq"
    held_out: float = Field(0.1, gt=0.0, lt=1.0)  # fraction of documents (by hash of the text) held out
    max_chars: int = Field(20000, ge=1)
    epoch: int = Field(25, ge=1)  # sized for small labelled sets (thousands of documents); 5 is plenty for millions
    lr: float = Field(1.0, gt=0.0)
    word_ngrams: int = Field(2, ge=1)
    dim: int = Field(32, ge=1)
    bucket: int = Field(1 << 17, ge=1)  # hashed n-gram rows: model size ~ (vocab + bucket) * dim * 4 bytes
    min_count: int = Field(1, ge=1)
    seed: int = 0
    # fastText 0.9.x sometimes stops with "Encountered NaN" on long documents (seen here at lr 0.05..1, with no
    # pattern in lr or epochs); training then restarts with seed+1, ..., deterministically, and the metrics
    # record the seed that trained the model.
    nan_retries: int = Field(4, ge=0)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith((".zst", ".zstd")):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_labelled(paths: list[str | os.PathLike], text_field: str, what: str) -> Iterator[str]:
    """Texts of every record; a bad line is an error naming file and line (training data is small and must be
    exactly what the user gave)."""
    if not paths:
        raise QualityError(f"no {what} files given")
    for p in map(Path, paths):
        if not p.is_file():
            raise QualityError(f"{what} file {p} not found")
        try:
            with _open_text(p) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise QualityError(f"{p}:{n}: not JSON ({e})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise QualityError(f"{p}:{n}: record has no string field {text_field!r}")
                    yield obj[text_field]
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise QualityError(f"{what} file {p}: cannot read ({type(e).__name__}: {e})") from None


def _held_out(text: str, frac: float) -> bool:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little") / 2**64 < frac


_FIT = """
import json, sys
import fasttext
fasttext.FastText.eprint = lambda *a, **k: None
args, path = json.loads(sys.argv[1]), sys.argv[2]
try:
    fasttext.train_supervised(**args).save_model(path)
except RuntimeError as e:  # fastText's DenseMatrix::EncounteredNaNError
    print(json.dumps(str(e)))
    sys.exit(3)
"""


def _fit_in_fresh_process(args: dict, model_path: str) -> str | None:
    """Train in a new interpreter; None on success, else fastText's error. fastText 0.9.x keeps state between
    trainings in one process (the same data and seed give other model bytes, or NaN, when something was trained
    before), so each training starts clean and is a deterministic function of its inputs. A plain subprocess
    rather than multiprocessing: nothing of the caller's __main__ is re-imported."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FIT, json.dumps(args), model_path], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    if r.returncode == 3:
        return json.loads(r.stdout.strip().splitlines()[-1])
    raise QualityError(f"fastText training of {model_path} died (exit code {r.returncode}): {r.stderr.strip()[-500:]}")


def train_classifier(positive: list[str | os.PathLike], negative: list[str | os.PathLike],
                     output: str | os.PathLike, cfg: TrainConfig | None = None) -> dict:
    """Train, evaluate on the held-out split, write `output` (fastText .bin) and `output`.json; returns the
    metrics dict (also in the JSON)."""
    cfg = cfg or TrainConfig()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"train": [], "held_out": []}
    counts = {"positive": 0, "negative": 0, "empty_skipped": 0}
    for files, label, what in ((positive, cfg.positive_label, "positive"),
                               (negative, cfg.negative_label, "negative")):
        for text in read_labelled(list(files), cfg.text_field, what):
            norm = normalize(text, cfg.max_chars)
            if not norm:
                counts["empty_skipped"] += 1
                continue
            counts[what] += 1
            data["held_out" if _held_out(norm, cfg.held_out) else "train"].append((label, norm))
    for what in ("positive", "negative"):
        if counts[what] == 0:
            raise QualityError(f"no {what} documents with text (field {cfg.text_field!r})")
    if not data["held_out"] or not data["train"]:
        raise QualityError(f"{counts['positive'] + counts['negative']} documents are too few to hold out "
                           f"{cfg.held_out:.0%} and still train")
    fd, tmp_train = tempfile.mkstemp(prefix=".train-", suffix=".txt", dir=out.parent)
    tmp_model = out.parent / f".tmp-{out.name}"
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for label, text in data["train"]:
                f.write(f"__label__{label} {text}\n")
        seeds = [cfg.seed + k for k in range(cfg.nan_retries + 1)]
        args = dict(input=tmp_train, epoch=cfg.epoch, lr=cfg.lr, wordNgrams=cfg.word_ngrams, dim=cfg.dim,
                    bucket=cfg.bucket, minCount=cfg.min_count, thread=1, verbose=0, loss="softmax")
        for seed in seeds:
            err = _fit_in_fresh_process({**args, "seed": seed}, str(tmp_model))
            if err is None:
                break
            if "NaN" not in err or seed == seeds[-1]:
                raise QualityError(f"fastText training on {len(data['train'])} documents failed with seeds "
                                   f"{seeds[0]}..{seed} ({err}); try another seed, a lower lr or a larger bucket")
        os.replace(tmp_model, out)
    finally:
        os.unlink(tmp_train)
        if tmp_model.exists():
            tmp_model.unlink()
    clf = Classifier(ClassifierSpec(name="trained", path=str(out), label=cfg.positive_label,
                                    max_chars=cfg.max_chars))
    ho = data["held_out"]
    p = clf.predict([t for _, t in ho])
    truth = np.array([lab == cfg.positive_label for lab, _ in ho])
    pred = p >= 0.5
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    metrics = {
        "model": str(out), "sha256": sha256_of(out), "labels": [cfg.positive_label, cfg.negative_label],
        "documents": counts, "train_docs": len(data["train"]), "held_out_docs": len(ho),
        "held_out_positive": int(truth.sum()), "held_out_negative": int((~truth).sum()),
        "precision": round(prec, 4), "recall": round(rec, 4),
        "f1": round(2 * prec * rec / (prec + rec), 4) if prec + rec else 0.0,
        "accuracy": round(float((pred == truth).mean()), 4), "threshold": 0.5, "seed": seed,
        "positive": [str(x) for x in positive], "negative": [str(x) for x in negative],
        "config": cfg.model_dump(mode="json"),
    }
    side = out.with_name(out.name + ".json")
    tmp = side.with_name(f".tmp-{side.name}")
    tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, side)
    return metrics
