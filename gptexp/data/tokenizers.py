"""Tokenizers: characters (the text's own alphabet) or byte-level BPE, saved with a run and
rebuilt from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from gptexp.core.errors import DataError

log = logging.getLogger(__name__)

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


def cached_vocab_size(blob: str) -> int:
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
