"""Tokenizer: a Hugging Face `tokenizers` byte-level BPE, loaded from a `tokenizer.json` or trained on curated
data, with an explicit BOS/EOS policy.

The policy (Nemotron 3: no BOS, EOS appended) is written into the tokenizer's post-processor, so the same
`tokenizer.json` gives the same ids in `tokenizers`, in `transformers` and in our shards; the Rust side does all
the work (`encode_batch` runs on all cores), we only pick the special tokens and the storage dtype.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_EOS = "<|endoftext|>"
DEFAULT_BOS = "<|begin_of_text|>"
DEFAULT_PAD = "<|pad|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot serve our policy (missing special token, unreadable file)."""


class TokenizerPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    add_bos: bool = False  # Nemotron 3 prepends nothing
    add_eos: bool = True  # every document ends with EOS, so packed documents stay separated
    bos_token: str = DEFAULT_BOS
    eos_token: str = DEFAULT_EOS


class Tokenizer:
    """A loaded `tokenizers.Tokenizer` plus the policy; `encode_batch` returns compact numpy arrays."""

    def __init__(self, hf_tokenizer, policy: TokenizerPolicy | None = None, source: str | None = None):
        from tokenizers.processors import TemplateProcessing

        self.hf = hf_tokenizer
        self.policy = policy or TokenizerPolicy()
        self.source = source
        self.eos_id = self._special_id(self.policy.eos_token) if self.policy.add_eos else self._maybe_id(
            self.policy.eos_token)
        self.bos_id = self._special_id(self.policy.bos_token) if self.policy.add_bos else self._maybe_id(
            self.policy.bos_token)
        single = " ".join(([f"{self.policy.bos_token}:0"] if self.policy.add_bos else []) + ["$A:0"]
                          + ([f"{self.policy.eos_token}:0"] if self.policy.add_eos else []))
        specials = [(t, i) for t, i, on in ((self.policy.bos_token, self.bos_id, self.policy.add_bos),
                                             (self.policy.eos_token, self.eos_id, self.policy.add_eos)) if on]
        # A pair template is required by the API; documents are always single sequences here.
        self.hf.post_processor = TemplateProcessing(single=single, pair=f"{single} $B:1", special_tokens=specials)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        # uint16 halves shard size for vocabularies up to 65536 (tests, small models); Nemotron's 131072 needs 32.
        self.dtype = np.dtype("<u2") if self.vocab_size <= 1 << 16 else np.dtype("<u4")

    def _maybe_id(self, token: str) -> Optional[int]:
        return self.hf.token_to_id(token)

    def _special_id(self, token: str) -> int:
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"tokenizer {self.source or ''} has no token {token!r}, which the BOS/EOS policy "
                                 f"needs; set bos_token/eos_token to one of its special tokens")
        return tid

    @classmethod
    def from_file(cls, path: str | Path, policy: TokenizerPolicy | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error names the JSON problem; add the file
            raise TokenizerError(f"cannot load tokenizer {path}: {e}") from e
        return cls(hf, policy, source=str(path))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=self.dtype) for e in self.hf.encode_batch(texts, add_special_tokens=True)]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer with its policy: shards made with another tokenizer are refused."""
        blob = self.hf.to_str() + json.dumps(self.policy.model_dump(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> dict:
        return {"sha256": self.fingerprint(), "vocab_size": self.vocab_size, "dtype": self.dtype.str,
                "eos_id": self.eos_id, "bos_id": self.bos_id, "add_bos": self.policy.add_bos,
                "add_eos": self.policy.add_eos, "source": self.source}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(4096, ge=300)  # 256 byte symbols + specials + a few merges at the very least
    min_frequency: int = Field(2, ge=1)  # a merge must be seen this often
    max_documents: Optional[int] = Field(None, ge=1)  # None: every document of the input
    special_tokens: list[str] = Field(default_factory=lambda: [DEFAULT_EOS, DEFAULT_BOS, DEFAULT_PAD])


def train_bpe(texts: Iterable[str], config: TrainConfig | None = None,
              policy: TokenizerPolicy | None = None, input_name: str = "the input") -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: every byte representable, no unknown token). No documents at all is
    an error naming `input_name` (a tokenizer of nothing but the byte alphabet would shard any text)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    config = config or TrainConfig()
    policy = policy or TokenizerPolicy()
    specials = list(dict.fromkeys(config.special_tokens + [policy.eos_token]
                                  + ([policy.bos_token] if policy.add_bos else [])))
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)

    seen = [0]

    def limited() -> Iterator[str]:
        for i, t in enumerate(texts):
            if config.max_documents is not None and i >= config.max_documents:
                return
            seen[0] += 1
            yield t

    hf.train_from_iterator(limited(), trainer=trainer)
    if not seen[0]:
        raise TokenizerError(f"empty input: no documents to train the tokenizer on in {input_name}")
    return Tokenizer(hf, policy, source="trained")
