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

from gptexp.core.config import DataConfig
from gptexp.core.errors import ConfigError, DataError
from gptexp.core.fsio import atomic_write_bytes, sha256_text
from gptexp.data.cache import CachedCorpus, cache_path, load_cached, store

log = logging.getLogger(__name__)

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

SPLITS = {"train": 0, "val": 1}


# ----------------------------------------------------------------------------- tokenizers


# Characters per piece when a text is turned into arrays: 4 MB of UTF-32 at a time, so that
# tokenizing needs the int64 ids and little more (a Python list of ids took 19 bytes a char).
CHUNK_CHARS = 1 << 20


def _code_points(piece: str) -> np.ndarray:
    """The code points of ``piece``: its bytes for ASCII, else its UTF-32 (lone surrogates,
    which a str may hold, included)."""
    if piece.isascii():
        return np.frombuffer(piece.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _distinct(points: np.ndarray) -> np.ndarray:
    """The distinct code points of a piece, sorted (for bytes, a count beats a sort)."""
    if points.dtype == np.uint8:
        return np.flatnonzero(np.bincount(points, minlength=128))
    return np.unique(points)


def _pieces(text: str):
    for start in range(0, len(text), CHUNK_CHARS):
        yield start, text[start : start + CHUNK_CHARS]


class CharTokenizer:
    """One token per distinct character of the training text: token i is the i-th character
    in code point order (the order ``sorted`` gives), so ids never depend on how they were
    computed."""

    kind = "char"
    unit = "char"  # what bits-per-unit is counted in

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        # Code point -> id, from ``index`` (so a stored vocabulary with a repeated or a
        # multi-character entry maps as the dict does): a table for ASCII, a binary search over
        # the sorted code points for the rest; -1 marks a character outside the vocabulary.
        single = sorted((ord(c), i) for c, i in self.index.items() if len(c) == 1)
        self.points = np.array([point for point, _ in single], dtype=np.int64)
        self.ids = np.array([i for _, i in single], dtype=np.int64)
        self.ascii = np.full(128, -1, dtype=np.int64)
        ascii_points = self.points < 128
        self.ascii[self.points[ascii_points]] = self.ids[ascii_points]

    @classmethod
    def train(cls, text: str, vocab_size: int = 0) -> CharTokenizer:
        distinct = [_distinct(_code_points(piece)) for _, piece in _pieces(text)]
        points = np.unique(np.concatenate(distinct)) if distinct else np.array([], np.int64)
        return cls([chr(int(point)) for point in points])

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of ``text``, (len(text),) int64, built piece by piece in place."""
        ids = np.empty(len(text), dtype=np.int64)
        for start, piece in _pieces(text):
            points = _code_points(piece)
            found = self._lookup(points)
            if (found < 0).any():
                unknown = sorted({chr(int(p)) for p in np.unique(points[found < 0])})
                raise ValueError(
                    f"characters not in the tokenizer's vocabulary: {''.join(unknown)!r} "
                    f"(a char tokenizer knows only the {self.vocab_size} characters of its "
                    "corpus)"
                )
            ids[start : start + len(piece)] = found
        return ids

    def _lookup(self, points: np.ndarray) -> np.ndarray:
        if points.dtype == np.uint8:
            return self.ascii[points]
        if not len(self.points):
            return np.full(len(points), -1, dtype=np.int64)
        slot = np.minimum(np.searchsorted(self.points, points), len(self.points) - 1)
        return np.where(self.points[slot] == points, self.ids[slot], -1)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

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


def tokenizer_from_json(blob: str, source: str = "the tokenizer") -> Tokenizer:
    """Rebuild a tokenizer saved by ``to_json`` (in a run directory or a checkpoint); a
    DataError naming ``source`` when the blob is not one (it may be someone else's file)."""

    def damaged(why: str) -> DataError:
        return DataError(f"{source}: damaged tokenizer ({why})")

    try:
        data = json.loads(blob)
    except (ValueError, RecursionError) as error:
        raise damaged(str(error)[:200] or "nested too deep") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "char":
        chars = data.get("chars")
        if not (isinstance(chars, list) and all(isinstance(c, str) and len(c) == 1 for c in chars)):
            raise damaged("chars is not a list of single characters")
        if len(set(chars)) != len(chars):
            raise damaged("a character is listed twice")
        return CharTokenizer(chars)
    if kind == "bpe" and isinstance(data.get("tokenizer"), str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_str(data["tokenizer"]))
        except Exception as error:  # the Rust parser raises its own exception type
            raise damaged(str(error).splitlines()[0][:200]) from None
    raise damaged(f"no known kind (char or bpe) with its fields: kind={kind!r}")


def _cached_vocab_size(blob: str) -> int:
    """The vocabulary size of a cached tokenizer; a damaged one is a ValueError, which makes
    the cache entry a miss (it is rebuilt), not an error."""
    try:
        return tokenizer_from_json(blob, "the cached corpus").vocab_size
    except DataError as error:
        raise ValueError(str(error)) from None


def read_tokenizer(path: Path) -> Tokenizer:
    """A run's ``tokenizer.json``; a DataError naming the file when it is not one."""
    try:
        blob = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: damaged tokenizer ({error})") from None
    return tokenizer_from_json(blob, str(path))


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


def _read_utf8(path: Path, key: str) -> str:
    """The text of a regular file (a device such as /dev/zero never ends, a pipe is read once)."""
    named = f"{key}={str(path)!r}"
    if not path.exists():
        raise DataError(f"{named}: no such file")
    if path.is_dir():
        raise DataError(f"{named}: a directory; give the text file itself")
    if not path.is_file():
        raise DataError(f"{named}: not a regular file (a device, pipe or socket); give a text file")
    try:
        return path.read_text(encoding="utf-8")
    except PermissionError:
        raise DataError(f"{named}: permission denied (cannot read it)") from None
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
    atomic_write_bytes(cached, raw)
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
    cached = load_cached(path, fingerprint, _cached_vocab_size)
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


# ----------------------------------------------------------------------------- data order

# How a training step's batches are drawn; stored in every checkpoint as ``data_order``.
#   1: each (rank, micro-batch) draws its own batch (``sample_batch``): the data depends on the
#      world size. Checkpoints without ``data_order`` are of this order and keep it on resume.
#   2: the global batch of a step is drawn once from (seed, step) and every (rank, micro-batch)
#      takes a slice of it (``global_batch_slice``): the data does not depend on how the global
#      batch is split over processes and micro-batches.
DATA_ORDER_VERSION = 2
DATA_ORDERS = (1, 2)


def global_batch_starts(
    n_tokens: int, block_size: int, global_batch: int, *, seed: int, split: str, step: int
) -> np.ndarray:
    """Start offsets, (global_batch,) int64, of the windows of the global batch of ``step``.

    A pure function of its arguments: every process computes the same array and takes its slice.
    The leading version number keeps these streams apart from order 1's.
    """
    rng = np.random.default_rng([2, seed, SPLITS[split], step])
    return rng.integers(0, n_tokens - block_size, size=global_batch)


def global_batch_slice(
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    *,
    seed: int,
    split: str,
    step: int,
    rank: int,
    micro: int,
    grad_accum: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y), each (B, T), of micro-batch ``micro`` of ``rank`` in step ``step``.

    The global batch has ``batch_size * grad_accum * world_size`` windows; rank r's micro-batch
    m is the (r * grad_accum + m)-th run of ``batch_size`` of them. 2 ranks x 2 micro-batches,
    1 rank x 4 and 1 rank x 1 micro-batch of 4 x batch_size thus see the same windows.
    """
    if not (0 <= rank < world_size and 0 <= micro < grad_accum):
        raise ValueError(f"rank {rank} / micro {micro} outside {world_size} x {grad_accum}")
    starts = global_batch_starts(
        len(tokens),
        block_size,
        batch_size * grad_accum * world_size,
        seed=seed,
        split=split,
        step=step,
    )
    first = (rank * grad_accum + micro) * batch_size
    mine = torch.from_numpy(starts[first : first + batch_size])
    windows = tokens.unfold(0, block_size + 1, 1)[mine]  # (B, T+1) views, then gathered
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def train_batch(
    order: int,
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    *,
    seed: int,
    step: int,
    rank: int,
    micro: int,
    grad_accum: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of ``rank`` for training step ``step`` under data order ``order``."""
    if order == 1:
        return sample_batch(
            tokens,
            block_size,
            batch_size,
            seed=seed,
            split="train",
            step=step,
            rank=rank,
            micro=micro,
        )
    if order == 2:
        return global_batch_slice(
            tokens,
            block_size,
            batch_size,
            seed=seed,
            split="train",
            step=step,
            rank=rank,
            micro=micro,
            grad_accum=grad_accum,
            world_size=world_size,
        )
    raise DataError(
        f"data order {order} is unknown to this gptexp (it reads {DATA_ORDERS}); upgrade gptexp"
    )


def resume_grad_accum(global_batch: int, batch_size: int, world_size: int) -> int:
    """The ``grad_accum`` that keeps ``global_batch`` sequences per step on ``world_size``
    processes of ``batch_size`` each; ConfigError (listing the world sizes that work) if none.
    """
    per_rank, rest = divmod(global_batch, batch_size * world_size)
    if rest == 0 and per_rank >= 1:
        return per_rank
    if global_batch % batch_size:
        raise ConfigError(
            f"training.batch_size={batch_size} does not divide the run's global batch of "
            f"{global_batch} sequences; resume with a batch size that does"
        )
    micro_batches = global_batch // batch_size
    working = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
    raise ConfigError(
        f"cannot resume on {world_size} processes: the run's global batch of {global_batch} "
        f"sequences (training.batch_size={batch_size} x grad_accum x processes) does not split "
        f"over them; world sizes that keep it: {', '.join(map(str, working))}"
    )
