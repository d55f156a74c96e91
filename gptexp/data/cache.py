"""The tokenized-corpus cache: a second run on the same text does not tokenize it again.

An entry is ``<cache_dir>/corpus/<text sha256>-<settings hash>.npz``: the train and val ids,
the tokenizer (its JSON) and the validation text's unit count. The settings hash covers what
the ids depend on besides the text: tokenizer kind, vocabulary size, validation fraction and,
when a run brings its own tokenizer (resume, eval), that tokenizer. Entries are written
atomically (a temporary file, then a rename) and read with ``np.load(allow_pickle=False)``;
an entry that cannot be read or does not match is ignored and written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptexp.core.config import DataConfig

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """gptexp's cache directory (``$GPTEXP_CACHE``, else ``~/.cache/gptexp``): corpora, the
    downloaded Shakespeare, the measured CPU peak."""
    return Path(os.environ.get("GPTEXP_CACHE", Path.home() / ".cache" / "gptexp"))


CACHE_FORMAT = 2  # 2: the train split's unit count too


@dataclass
class CachedCorpus:
    """A tokenized corpus as plain parts (gptexp.data.corpus builds its Corpus from them)."""

    tokenizer_json: str
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    train_units: int
    val_units: int


def cache_path(root: Path, fingerprint: str, cfg: DataConfig, tokenizer_json: str | None) -> Path:
    settings = json.dumps(
        {
            "format": CACHE_FORMAT,
            "tokenizer": cfg.tokenizer,
            "vocab_size": cfg.vocab_size if cfg.tokenizer != "char" else None,
            "val_fraction": cfg.val_fraction,
            "given_tokenizer": tokenizer_json,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(settings.encode("utf-8")).hexdigest()[:16]
    return root / "corpus" / f"{fingerprint}-{cfg.tokenizer}-{key}.npz"


def load_cached(path: Path, fingerprint: str, vocab_size_of) -> CachedCorpus | None:
    """The entry at ``path``, or None when there is none or it is unusable (then it is
    rewritten by the caller). ``vocab_size_of(tokenizer_json)`` bounds the ids."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            if str(entry["fingerprint"]) != fingerprint:
                raise ValueError("written for another text")
            tokenizer_json = entry["tokenizer"].tobytes().decode("utf-8")
            train = torch.from_numpy(entry["train"].astype(np.int64))
            val = torch.from_numpy(entry["val"].astype(np.int64))
            train_units, val_units = int(entry["train_units"]), int(entry["val_units"])
        vocab = vocab_size_of(tokenizer_json)
        if int(train.max()) >= vocab or int(val.max()) >= vocab:
            raise ValueError("token ids outside the tokenizer's vocabulary")
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        log.warning("corpus cache %s is unusable (%s): tokenizing again", path, e)
        return None
    return CachedCorpus(tokenizer_json, train, val, train_units, val_units)


def store(path: Path, fingerprint: str, entry: CachedCorpus, vocab_size: int) -> None:
    """Write the entry atomically; a cache that cannot be written only costs the speed-up."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.int32  # ids in half the bytes (or less)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                fingerprint=np.array(fingerprint),
                tokenizer=np.frombuffer(entry.tokenizer_json.encode("utf-8"), np.uint8),
                train=entry.train.numpy().astype(dtype),
                val=entry.val.numpy().astype(dtype),
                train_units=np.array(entry.train_units),
                val_units=np.array(entry.val_units),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        log.warning("could not write the corpus cache %s (%s)", path, error)
        tmp.unlink(missing_ok=True)
