"""The tokenized corpus: a text from its source, tokenized (or read from the cache), split into
train and validation tokens and fingerprinted."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from gptexp.core.config import DataConfig
from gptexp.core.errors import ConfigError, DataError
from gptexp.core.fsio import sha256_text
from gptexp.data.cache import CachedCorpus, cache_dir, cache_path, load_cached, store
from gptexp.data.sources import load_text
from gptexp.data.tokenizers import (
    CharTokenizer,
    Tokenizer,
    cached_vocab_size,
    tokenizer_from_json,
    train_tokenizer,
)

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """A tokenized text split into train and validation tokens."""

    tokenizer: Tokenizer
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    fingerprint: str  # sha256 of the text
    train_units: int  # characters (or bytes) of each split's text, for bits per unit
    val_units: int

    def units_per_token(self, split: str) -> float:
        """Characters (char tokenizer) or UTF-8 bytes (BPE) per token of ``split``."""
        units, tokens = (
            (self.val_units, self.val) if split == "val" else (self.train_units, self.train)
        )
        return units / max(1, len(tokens))


def prepare_corpus(
    cfg: DataConfig,
    block_size: int,
    tokenizer: Tokenizer | None = None,
    expected_fingerprint: str | None = None,
) -> Corpus:
    """Load the text, tokenize it (training a tokenizer unless one is given) and split it.

    The split is by position: the last ``val_fraction`` of the text is validation. A run that
    already trained on a text gives its ``expected_fingerprint``: another text is refused
    before it is tokenized, wherever the file is now. The token ids are
    cached by the text's sha256 and the tokenizer settings (see ``corpus_cache``), so a second
    run on the same text does not tokenize it again.
    """
    try:
        return _prepare(cfg, block_size, tokenizer, expected_fingerprint)
    except MemoryError:
        # Reading and tokenizing need about 10 bytes per character (the text and its int64
        # ids); an allocation that fails is the text's size, not a bug.
        size = _source_size(cfg)
        raise DataError(
            f"{_source(cfg)}: out of memory while reading and tokenizing the text"
            f"{f' ({size / 1e6:,.0f} MB)' if size is not None else ''}; it needs about 10 "
            "bytes of memory per character: use a smaller text or a machine with more memory"
        ) from None


def _source(cfg: DataConfig) -> str:
    """The corpus as the user named it."""
    return f"data.path={cfg.path!r}" if cfg.path else f"data={cfg.name}"


def _source_size(cfg: DataConfig) -> int | None:
    try:
        return os.stat(cfg.path).st_size if cfg.path else None
    except OSError:
        return None


def _prepare(
    cfg: DataConfig,
    block_size: int,
    tokenizer: Tokenizer | None,
    expected_fingerprint: str | None,
) -> Corpus:
    text = load_text(cfg)
    if not text:
        raise DataError(f"data.name={cfg.name!r}: the text is empty")
    fingerprint = sha256_text(text)
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise DataError(
            f"{_source(cfg)}: the text differs from the one this run was trained on (sha256); "
            "use the original text (data.path=<where it is now>)"
        )
    given = tokenizer.to_json() if tokenizer is not None else None
    path = cache_path(cache_dir(), fingerprint, cfg, given)
    cached = load_cached(path, fingerprint, cached_vocab_size)
    if cached is not None:
        corpus = Corpus(
            tokenizer=tokenizer_from_json(cached.tokenizer_json),
            train=cached.train,
            val=cached.val,
            fingerprint=fingerprint,
            train_units=cached.train_units,
            val_units=cached.val_units,
        )
        _check_block_size(corpus, block_size)
        return corpus
    corpus = _tokenize(cfg, text, fingerprint, tokenizer)
    _check_block_size(corpus, block_size)
    entry = CachedCorpus(
        corpus.tokenizer.to_json(), corpus.train, corpus.val, corpus.train_units, corpus.val_units
    )
    store(path, fingerprint, entry, corpus.tokenizer.vocab_size)
    return corpus


def _tokenize(cfg: DataConfig, text: str, fingerprint: str, tokenizer: Tokenizer | None) -> Corpus:
    cut = int(len(text) * (1 - cfg.val_fraction))
    if tokenizer is None:
        # A char vocabulary covers the whole text, so that a character that occurs only in
        # the validation split still has a token; BPE is byte-level and covers anything.
        source = text if cfg.tokenizer == "char" else text[:cut]
        tokenizer = train_tokenizer(cfg.tokenizer, source, cfg.vocab_size)
    try:
        if isinstance(tokenizer, CharTokenizer):
            # One token per character: the whole text at once, split by position, with no
            # copy of either split's text.
            ids = torch.from_numpy(tokenizer.encode_array(text))
            train_ids, val_ids, units = ids[:cut], ids[cut:], (cut, len(text) - cut)
        else:
            train_text, val_text = text[:cut], text[cut:]
            train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
            val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
            units = (tokenizer.units(train_text), tokenizer.units(val_text))
    except ValueError as error:
        raise DataError(f"data: {error}") from None
    return Corpus(
        tokenizer=tokenizer,
        train=train_ids,
        val=val_ids,
        fingerprint=fingerprint,
        train_units=units[0],
        val_units=units[1],
    )


def _check_block_size(corpus: Corpus, block_size: int) -> None:
    shortest = min(len(corpus.train), len(corpus.val))
    if shortest <= block_size:
        raise ConfigError(
            f"model.block_size={block_size}: longer than the corpus allows "
            f"(the smaller split has {shortest} tokens; lower model.block_size or "
            "data.val_fraction, or use a longer text)"
        )
