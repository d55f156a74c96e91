"""Text sources, tokenizers and batch sampling.

Sampling holds no state: the batch for (seed, split, step, rank, micro-step) is a pure
function of those numbers, so a resumed run draws exactly the batches the uninterrupted run
would have drawn, and nothing about the data needs to be checkpointed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptexp.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

SPLITS = {"train": 0, "val": 1}


class DataError(RuntimeError):
    """The text cannot be had or used; the message says why and what to do."""


# ----------------------------------------------------------------------------- tokenizers


class CharTokenizer:
    """One token per distinct character of the training text."""

    kind = "char"
    unit = "char"  # what bits-per-unit is counted in

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str, vocab_size: int = 0) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(
                f"characters not in the tokenizer's vocabulary: {''.join(unknown)!r} "
                f"(a char tokenizer knows only the {self.vocab_size} characters of its corpus)"
            )
        return [self.index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def units(self, text: str) -> int:
        return len(text)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=False)


class BPETokenizer:
    """A byte-level BPE (Hugging Face ``tokenizers``) trained on the training text."""

    kind = "bpe"
    unit = "byte"

    def __init__(self, tokenizer) -> None:  # tokenizers.Tokenizer
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        chunk = 1 << 16  # the trainer wants an iterator of strings
        bpe.train_from_iterator(
            (text[i : i + chunk] for i in range(0, len(text), chunk)),
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=False,
        )
        return cls(bpe._tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def units(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": self.tokenizer.to_str()})


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_json(blob: str) -> Tokenizer:
    """Rebuild a tokenizer saved by ``to_json`` (in a run directory or a checkpoint)."""
    data = json.loads(blob)
    if data["kind"] == "char":
        return CharTokenizer(list(data["chars"]))
    if data["kind"] == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(data["tokenizer"]))
    raise ValueError(f"unknown tokenizer kind {data['kind']!r}")


def train_tokenizer(kind: str, text: str, vocab_size: int) -> Tokenizer:
    return {"char": CharTokenizer, "bpe": BPETokenizer}[kind].train(text, vocab_size)


# ----------------------------------------------------------------------------- sources


def python_docs_text() -> str:
    """The default corpus: the documentation topics that ship with Python (``pydoc_data``).

    About 450 KB of English prose and code examples, licensed with Python itself, present on
    every Python installation, so the default run needs no download.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def cache_dir() -> Path:
    return Path(os.environ.get("GPTEXP_CACHE", Path.home() / ".cache" / "gptexp"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_utf8(path: Path, key: str) -> str:
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{key}={str(path)!r}: not UTF-8 text ({error.reason})") from None


def shakespeare_text(path: str | None) -> str:
    """tiny-shakespeare: from ``path`` if given, else the cache, else downloaded once."""
    if path:
        text = _read_utf8(Path(path), "data.path")
        if sha256_text(text) != SHAKESPEARE_SHA256:
            raise DataError(
                f"data.path={path!r} is not tiny-shakespeare (sha256 differs); "
                "use data=text for other files"
            )
        return text
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file():
        # Hash the bytes, not decoded text: a damaged cache may not even be UTF-8.
        raw = cached.read_bytes()
        if hashlib.sha256(raw).hexdigest() == SHAKESPEARE_SHA256:
            return raw.decode("utf-8")
        log.warning("cached %s is damaged (sha256 differs); downloading it again", cached)
    log.info("downloading tiny-shakespeare from %s", SHAKESPEARE_URL)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            raw = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise DataError(
            f"could not download tiny-shakespeare from {SHAKESPEARE_URL} ({error}). "
            f"Offline? Put the file at {cached} or pass data.path=<local copy>"
        ) from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise DataError(f"download from {SHAKESPEARE_URL} failed its sha256 check; not cached")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(raw)
    tmp.replace(cached)
    return raw.decode("utf-8")


def load_text(cfg: DataConfig) -> str:
    if cfg.name == "pydocs":
        return python_docs_text()
    if cfg.name == "shakespeare":
        return shakespeare_text(cfg.path)
    return _read_utf8(Path(cfg.path or ""), "data.path")


# ----------------------------------------------------------------------------- dataset


@dataclass
class Corpus:
    """A tokenized text split into train and validation tokens."""

    tokenizer: Tokenizer
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    fingerprint: str  # sha256 of the text
    val_units: int  # characters (or bytes) in the validation text, for bits per unit

    @property
    def val_units_per_token(self) -> float:
        return self.val_units / max(1, len(self.val))


def prepare_corpus(cfg: DataConfig, block_size: int, tokenizer: Tokenizer | None = None) -> Corpus:
    """Load the text, tokenize it (training a tokenizer unless one is given) and split it.

    The split is by position: the last ``val_fraction`` of the text is validation. The token
    ids are cached by the text's sha256 and the tokenizer settings (see ``corpus_cache``), so a
    second run on the same text does not tokenize it again.
    """
    text = load_text(cfg)
    if not text:
        raise DataError(f"data.name={cfg.name!r}: the text is empty")
    from gptexp.corpus_cache import cache_path, load_cached, store

    fingerprint = sha256_text(text)
    path = cache_path(fingerprint, cfg, tokenizer.to_json() if tokenizer is not None else None)
    cached = load_cached(path, fingerprint)
    if cached is not None:
        corpus = Corpus(
            tokenizer=cached.tokenizer,
            train=cached.train,
            val=cached.val,
            fingerprint=fingerprint,
            val_units=cached.val_units,
        )
        _check_block_size(corpus, block_size)
        return corpus
    corpus = _tokenize(cfg, text, fingerprint, tokenizer)
    _check_block_size(corpus, block_size)
    store(path, corpus)
    return corpus


def _tokenize(cfg: DataConfig, text: str, fingerprint: str, tokenizer: Tokenizer | None) -> Corpus:
    cut = int(len(text) * (1 - cfg.val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    if tokenizer is None:
        # A char vocabulary covers the whole text, so that a character that occurs only in
        # the validation split still has a token; BPE is byte-level and covers anything.
        source = text if cfg.tokenizer == "char" else train_text
        tokenizer = train_tokenizer(cfg.tokenizer, source, cfg.vocab_size)
    try:
        train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    except ValueError as error:
        raise DataError(f"data: {error}") from None
    return Corpus(
        tokenizer=tokenizer,
        train=torch.tensor(train_ids, dtype=torch.long),
        val=torch.tensor(val_ids, dtype=torch.long),
        fingerprint=fingerprint,
        val_units=tokenizer.units(val_text),
    )


def _check_block_size(corpus: Corpus, block_size: int) -> None:
    shortest = min(len(corpus.train), len(corpus.val))
    if shortest <= block_size:
        raise ConfigError(
            f"model.block_size={block_size}: longer than the corpus allows "
            f"(the smaller split has {shortest} tokens; lower model.block_size or "
            "data.val_fraction, or use a longer text)"
        )


def sample_batch(
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    *,
    seed: int,
    split: str,
    step: int,
    rank: int = 0,
    micro: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch (x, y), each (B, T), for these coordinates: a pure function of them."""
    rng = np.random.default_rng([seed, SPLITS[split], step, rank, micro])
    starts = torch.from_numpy(rng.integers(0, len(tokens) - block_size, size=batch_size))
    windows = tokens.unfold(0, block_size + 1, 1)[starts]  # (B, T+1) views, then gathered
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
