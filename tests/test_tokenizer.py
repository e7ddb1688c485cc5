"""Byte-level BPE: trained small, EOS appended and no BOS by default, policy configurable, errors named."""
from __future__ import annotations

import json

import pytest

from data_pipeline.tokenizer import Tokenizer, TokenizerError, TokenizerPolicy, TrainConfig, train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n", "Ünïcödé text, emoji \U0001F600 and tabs\t!"] * 50


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    tok = train_bpe(TEXTS, TrainConfig(vocab_size=400, min_frequency=1))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


def test_eos_appended_no_bos_and_round_trip(tok_path):
    tok = Tokenizer.from_file(tok_path)
    assert tok.vocab_size <= 400 and tok.dtype.itemsize == 2
    ids = tok.encode(TEXTS[1])
    assert int(ids[-1]) == tok.eos_id and tok.bos_id not in ids.tolist()
    assert tok.decode(ids[:-1]) == TEXTS[1]  # byte-level: any text round-trips, no unknown token


def test_bos_policy_and_fingerprint(tok_path):
    plain = Tokenizer.from_file(tok_path)
    both = Tokenizer.from_file(tok_path, TokenizerPolicy(add_bos=True))
    ids = both.encode("x = 1")
    assert int(ids[0]) == both.bos_id and int(ids[-1]) == both.eos_id
    assert ids[1:].tolist() == plain.encode("x = 1").tolist()
    assert plain.fingerprint() != both.fingerprint()
    none = Tokenizer.from_file(tok_path, TokenizerPolicy(add_eos=False))
    assert none.encode("x = 1").tolist() == plain.encode("x = 1")[:-1].tolist()


def test_errors_name_the_problem(tok_path, tmp_path):
    with pytest.raises(TokenizerError, match="no token '<eos>'"):
        Tokenizer.from_file(tok_path, TokenizerPolicy(eos_token="<eos>"))
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": 1}))
    with pytest.raises(TokenizerError, match="bad.json"):
        Tokenizer.from_file(bad)


def test_cli_train(tmp_path):
    from pretrain.cli import main
    from tests.pipeline_data import write_curated

    cur = write_curated(tmp_path)
    out = tmp_path / "t.json"
    assert main(["tokenizer", "train", "--input", str(cur), "--vocab-size", "512", "--output", str(out)]) == 0
    tok = Tokenizer.from_file(out)
    assert 300 < tok.vocab_size <= 512 and int(tok.encode("import os")[-1]) == tok.eos_id
