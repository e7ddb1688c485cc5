"""`foldtron tokenizer train|encode`: a byte-level BPE (HF `tokenizers`) trained on curated data, and a quick look
at what a tokenizer.json does to a text under the BOS/EOS policy."""
from __future__ import annotations

import argparse


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--add-bos", action="store_true", help="prepend BOS (Nemotron 3: no)")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS (Nemotron 3 appends it)")
    p.add_argument("--eos-token", default=None, help="EOS token string (default <|endoftext|>)")
    p.add_argument("--bos-token", default=None, help="BOS token string (default <|begin_of_text|>)")


def _policy(args):
    from data_pipeline.tokenizer import TokenizerPolicy

    kw = {"add_bos": args.add_bos, "add_eos": not args.no_eos}
    if args.eos_token:
        kw["eos_token"] = args.eos_token
    if args.bos_token:
        kw["bos_token"] = args.bos_token
    return TokenizerPolicy(**kw)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or try a byte-level BPE tokenizer", description=__doc__)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tr = tsub.add_parser("train", help="train a byte-level BPE on curated JSONL (<dir>/<source>/*.jsonl[.zst|.gz])")
    tr.add_argument("--input", required=True, metavar="CURATED_DIR")
    tr.add_argument("--vocab-size", type=int, default=4096)
    tr.add_argument("--min-frequency", type=int, default=2)
    tr.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    tr.add_argument("--output", required=True, metavar="tokenizer.json")
    _policy_args(tr)
    tr.set_defaults(func=_train)
    enc = tsub.add_parser("encode", help="print the ids of a text")
    enc.add_argument("--tokenizer", required=True, metavar="tokenizer.json")
    enc.add_argument("text")
    _policy_args(enc)
    enc.set_defaults(func=_encode)


def _train(args: argparse.Namespace) -> int:
    from data_pipeline.shards import iter_documents, list_curated
    from data_pipeline.tokenizer import TrainConfig, train_bpe

    files = [f for fs in list_curated(args.input).values() for f in fs]
    texts = (t for f in files for _, t in iter_documents(f))
    cfg = TrainConfig(vocab_size=args.vocab_size, min_frequency=args.min_frequency, max_documents=args.max_documents)
    tok = train_bpe(texts, cfg, _policy(args), input_name=f"{args.input} ({len(files)} curated files)")
    tok.save(args.output)
    d = tok.describe()
    print(f"wrote {args.output}: vocab {d['vocab_size']}, eos id {d['eos_id']}, bos id {d['bos_id']}, "
          f"add_bos={d['add_bos']} add_eos={d['add_eos']}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer, _policy(args))
    ids = tok.encode(args.text)
    print(" ".join(str(int(i)) for i in ids))
    return 0
