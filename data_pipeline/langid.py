"""Language identification for curation: py3langid (langid.py's Naive Bayes over byte n-grams, 97 languages),
whose model ships inside the wheel (`py3langid/data/model.npz.xz`), so nothing is downloaded at run time.

Every document that reaches this step gets `detected_language` (ISO 639-1 code) and `language_score` (the
probability of that language, py3langid's length-calibrated softmax, rounded to 4 digits). A prose document is
dropped, under the accounting reason `language`, when its language is not in `keep` or its score is below
`min_score`; code documents are labelled but only dropped when `code: true` (a source file's "language" is
that of its comments and identifiers). The source's declared `language` field is left as it is.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

REASON = "language"  # the accounting reason (filtered[REASON])


class LangIdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False  # off: no language fields, nothing dropped
    keep: list[str] | None = Field(default_factory=lambda: ["en"])  # languages kept; null keeps every one
    min_score: float = Field(0.0, ge=0.0, le=1.0)  # below this probability a document is dropped too
    max_chars: int = Field(4000, ge=1)  # characters of each document read (from its start)
    code: bool = False  # also drop code documents by their detected language


class LangIdError(RuntimeError):
    """The language model could not be loaded (named in the message)."""


_IDENTIFIER = None


def identifier():
    """The packaged py3langid model, loaded once per process (probabilities normalized)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        try:
            from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier
        except ImportError as e:
            raise LangIdError(f"language identification needs py3langid (pip install py3langid): {e}") from None
        try:
            _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        except Exception as e:  # a damaged install: name the file
            raise LangIdError(f"cannot load the py3langid model {MODEL_DIR / MODEL_FILE}: "
                              f"{type(e).__name__}: {e}") from None
    return _IDENTIFIER


def check(cfg: LangIdConfig) -> None:
    """Load the model and check `keep` against its labels; raises LangIdError naming what is wrong."""
    if not cfg.enabled:
        return
    ident = identifier()
    if cfg.keep is not None:
        unknown = sorted(set(cfg.keep) - set(ident.labels))
        if unknown:
            raise LangIdError(f"langid.keep: unknown language code(s) {unknown}; py3langid knows "
                              f"{', '.join(sorted(ident.labels))}")


def identify(text: str, cfg: LangIdConfig) -> tuple[str, float]:
    """(language code, probability) of the first `max_chars` characters."""
    lang, score = identifier().classify(text[:cfg.max_chars])
    return lang, round(float(score), 4)


def keeps(lang: str, score: float, is_code: bool, cfg: LangIdConfig) -> bool:
    if is_code and not cfg.code:
        return True
    return (cfg.keep is None or lang in cfg.keep) and score >= cfg.min_score
