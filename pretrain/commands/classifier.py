"""`foldtron classifier train`: a fastText quality classifier from labelled JSONL, the DCLM / Nemotron-CC way: one
or more files of positive documents (the quality you want) and of negative ones (what you want less of).

    foldtron classifier train --positive hq/*.jsonl --negative crawl.jsonl.zst --output models/hq.bin

Writes the model (`--output`, fastText .bin) and `<output>.json`: held-out precision, recall, F1 and accuracy of
the positive label at p >= 0.5, document counts, labels and settings. Use it in `foldtron curate --config` under
`quality.classifiers` (see examples/configs/curate.yaml); `foldtron classifier score` prints a file's scores.
"""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classifier", help="train / apply fastText quality classifiers", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="classifier_command", metavar="ACTION", required=True)
    t = csub.add_parser("train", help="train from positive and negative JSONL; writes MODEL and MODEL.json")
    t.add_argument("--positive", nargs="+", required=True, metavar="JSONL", help="positive documents (.jsonl/.gz/.zst)")
    t.add_argument("--negative", nargs="+", required=True, metavar="JSONL", help="negative documents")
    t.add_argument("--output", required=True, metavar="MODEL.bin")
    from data_pipeline.quality import TrainConfig

    d = TrainConfig()
    t.add_argument("--text-field", default=d.text_field)
    t.add_argument("--positive-label", default=d.positive_label, help="label whose probability is the score")
    t.add_argument("--negative-label", default=d.negative_label)
    t.add_argument("--held-out", type=float, default=d.held_out, help="fraction held out for precision/recall")
    t.add_argument("--epoch", type=int, default=d.epoch)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--word-ngrams", type=int, default=d.word_ngrams)
    t.add_argument("--dim", type=int, default=d.dim)
    t.add_argument("--bucket", type=int, default=d.bucket, help="hashed n-gram rows (model size)")
    t.add_argument("--max-chars", type=int, default=d.max_chars, help="characters read per document")
    t.add_argument("--seed", type=int, default=d.seed)
    t.set_defaults(func=_train)
    s = csub.add_parser("score", help="print p(positive) per document of a JSONL file")
    s.add_argument("--model", required=True, metavar="MODEL.bin")
    s.add_argument("--label", default="hq", help="the positive label (default hq)")
    s.add_argument("--input", required=True, metavar="JSONL")
    s.add_argument("--text-field", default="text")
    s.set_defaults(func=_score)


def _train(args: argparse.Namespace) -> int:
    import sys

    from pydantic import ValidationError

    from data_pipeline.quality import QualityError, TrainConfig, train_classifier

    try:
        cfg = TrainConfig(text_field=args.text_field, positive_label=args.positive_label,
                          negative_label=args.negative_label, held_out=args.held_out, epoch=args.epoch, lr=args.lr,
                          word_ngrams=args.word_ngrams, dim=args.dim, bucket=args.bucket, max_chars=args.max_chars,
                          seed=args.seed)
        m = train_classifier(args.positive, args.negative, args.output, cfg)
    except (QualityError, ValidationError) as e:
        print(f"foldtron classifier train: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: m[k] for k in ("model", "precision", "recall", "f1", "accuracy", "train_docs",
                                        "held_out_docs", "documents")}, indent=1))
    return 0


def _score(args: argparse.Namespace) -> int:
    import sys

    from data_pipeline.quality import ClassifierSpec, QualityError, load_classifier, normalize, read_labelled

    try:
        spec = ClassifierSpec(name="cli", path=args.model, label=args.label)
        clf = load_classifier(spec)
        for text in read_labelled([args.input], args.text_field, "input"):
            norm = normalize(text, spec.max_chars)
            print(json.dumps({"p": round(float(clf.predict([norm])[0]), 4) if norm else None}))
    except QualityError as e:
        print(f"foldtron classifier score: {e}", file=sys.stderr)
        return 2
    return 0
