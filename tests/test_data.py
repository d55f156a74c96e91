"""Tokenizers, corpora and batch sampling."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

import pytest
import torch

from gptexp.core.errors import ConfigError, DataError
from gptexp.data import sources, tokenizers
from gptexp.data.batches import sample_batch
from gptexp.data.cache import cache_dir
from gptexp.data.corpus import prepare_corpus
from gptexp.data.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_json
from tests.conftest import compose_config

MIXED = "Hello, world! Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🙂\n\ttabs and spaces  "


def data_config(*overrides: str):
    return compose_config(list(overrides)).data


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(MIXED * 40, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trips_non_ascii_text():
    tokenizer = CharTokenizer.train(MIXED)
    ids = tokenizer.encode(MIXED)
    assert len(ids) == len(MIXED)
    assert tokenizer.decode(ids) == MIXED
    assert tokenizer.vocab_size == len(set(MIXED))


def _old_char_ids(text: str) -> tuple[list[str], list[int]]:
    """How ids were computed before arrays: existing runs and caches hold these."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return chars, [index[c] for c in text]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_char_ids_are_the_ones_runs_already_hold(chunk, monkeypatch):
    """Pieces of every kind (ASCII only, mixed, astral and lone surrogates) and piece
    boundaries inside them give the ids of the list-based tokenizer."""
    monkeypatch.setattr(tokenizers, "CHUNK_CHARS", chunk)
    text = "plain ascii text. " * 5 + MIXED * 3 + "\ud800 surrogate, \x00 NUL, \U0010ffff end"
    chars, ids = _old_char_ids(text)
    tokenizer = CharTokenizer.train(text)
    assert tokenizer.chars == chars
    assert tokenizer.encode(text) == ids
    assert tokenizer_from_json(tokenizer.to_json()).encode_array(text).tolist() == ids
    # A stored vocabulary in another order (or with a repeated entry) maps as its dict does.
    shuffled = CharTokenizer(chars[::-1] + [chars[0], "ab"])
    assert shuffled.encode(text) == [shuffled.index[c] for c in text]


def test_prepared_char_corpus_keeps_its_ids_and_split(text_file):
    corpus = prepare_corpus(data_config("data=text", f"data.path={text_file}"), block_size=16)
    text = text_file.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    _, ids = _old_char_ids(text)
    assert corpus.train.tolist() == ids[:cut] and corpus.val.tolist() == ids[cut:]
    assert corpus.train.dtype == corpus.val.dtype == torch.int64
    assert (corpus.train_units, corpus.val_units) == (cut, len(text) - cut)


MEMORY_PROBE = """
import resource, sys
from gptexp.core.config import DataConfig
from gptexp.data.corpus import _tokenize
n = 20_000_000
text = ("héllo wörld, the quick brown fox 日本 " * (n // 36 + 1))[:n]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_tokenize(DataConfig(), text, "fingerprint", None)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / n)
"""


def test_tokenizing_a_char_corpus_needs_little_more_than_its_ids():
    """20 M characters: the int64 ids are 8 bytes a character; the list-based tokenizer
    peaked at 16 (3.75 GB for a 200 MB text), arrays stay close to the ids."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], env=subprocess_env(), capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    assert float(probe.stdout) < 11, f"{float(probe.stdout):.1f} bytes per character"


def test_char_tokenizer_names_unknown_characters():
    tokenizer = CharTokenizer.train("abc ")
    with pytest.raises(ValueError, match="characters not in the tokenizer's vocabulary") as error:
        tokenizer.encode("a cab ßé")
    assert "ßé" in str(error.value)


def test_bpe_tokenizer_round_trips_any_text():
    tokenizer = BPETokenizer.train(MIXED * 50, vocab_size=300)
    assert 257 <= tokenizer.vocab_size <= 300
    assert len(tokenizer.encode(MIXED)) < len(MIXED.encode("utf-8"))  # it merged something
    # Byte-level: text with characters never seen in training round-trips too.
    for text in (MIXED, "unseen: Ωμέγα ∑ 🚀 \x00 ", ""):
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_json_round_trip(kind):
    tokenizer = tokenizers.train_tokenizer(kind, MIXED * 50, 300)
    blob = tokenizer.to_json()
    again = tokenizer_from_json(blob)
    assert type(again) is type(tokenizer)
    assert again.vocab_size == tokenizer.vocab_size
    assert again.encode(MIXED) == tokenizer.encode(MIXED)
    assert again.decode(tokenizer.encode(MIXED)) == MIXED
    assert again.to_json() == blob


# ----------------------------------------------------------------------------- sampling


TOKENS = torch.arange(1000)  # token i at position i: a window shows where it was cut
COORDS = {"seed": 1, "split": "train", "step": 5, "rank": 0, "micro": 0}


def test_sample_batch_is_a_pure_function_of_its_coordinates():
    x1, y1 = sample_batch(TOKENS, 16, 8, **COORDS)
    torch.manual_seed(999)  # no global RNG involved
    x2, y2 = sample_batch(TOKENS, 16, 8, **COORDS)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize(
    "change",
    [{"seed": 2}, {"split": "val"}, {"step": 6}, {"rank": 1}, {"micro": 1}],
    ids=lambda change: next(iter(change)),
)
def test_sample_batch_differs_when_any_coordinate_changes(change):
    x, _ = sample_batch(TOKENS, 16, 8, **COORDS)
    other, _ = sample_batch(TOKENS, 16, 8, **{**COORDS, **change})
    assert not torch.equal(x, other)


def test_sample_batch_targets_are_inputs_shifted_by_one():
    x, y = sample_batch(TOKENS, 16, 8, **COORDS)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # the next token of every position
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows of the text
    assert int(y.max()) < len(TOKENS)


# ----------------------------------------------------------------------------- corpora


def test_default_corpus_needs_no_file_or_download(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    corpus = prepare_corpus(data_config(), block_size=128)
    assert len(corpus.train) > 300_000 and len(corpus.val) > 30_000
    assert corpus.tokenizer.kind == "char"


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_text_file_is_split_by_val_fraction(text_file, fraction):
    cfg = data_config("data=text", f"data.path={text_file}", f"data.val_fraction={fraction}")
    corpus = prepare_corpus(cfg, block_size=32)
    total = len(corpus.train) + len(corpus.val)
    assert total == len(text_file.read_text(encoding="utf-8"))
    assert len(corpus.val) == pytest.approx(fraction * total, abs=1)
    # The validation split is the end of the text.
    assert corpus.tokenizer.decode(corpus.val.tolist()) == text_file.read_text()[-len(corpus.val) :]
    assert corpus.fingerprint == hashlib.sha256(text_file.read_bytes()).hexdigest()


def test_text_file_with_bpe(text_file):
    cfg = data_config("data=text", f"data.path={text_file}", "data.tokenizer=bpe")
    corpus = prepare_corpus(cfg, block_size=16)
    assert corpus.tokenizer.kind == "bpe"
    text = corpus.tokenizer.decode(corpus.train.tolist() + corpus.val.tolist())
    assert text == text_file.read_text(encoding="utf-8")


def test_a_given_tokenizer_is_reused_not_retrained(text_file):
    cfg = data_config("data=text", f"data.path={text_file}")
    saved = CharTokenizer(sorted(set(MIXED)) + ["§"])  # one extra symbol: not retrainable
    corpus = prepare_corpus(cfg, block_size=32, tokenizer=saved)
    assert corpus.tokenizer is saved


def test_non_utf8_file_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème brûlée ".encode("latin-1") * 100)
    with pytest.raises(DataError, match=r"data\.path=.*latin1\.txt.*not UTF-8"):
        prepare_corpus(data_config("data=text", f"data.path={path}"), block_size=16)


def test_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nowhere.txt"
    with pytest.raises(DataError, match=r"data\.path=.*nowhere\.txt.*no such file"):
        prepare_corpus(data_config("data=text", f"data.path={path}"), block_size=16)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("/dev/zero", "not a regular file (a device, pipe or socket); give a text file"),
        ("{tmp}", "a directory; give the text file itself"),
    ],
)
def test_a_path_that_is_not_a_text_file_says_what_it_is(tmp_path, where, message):
    path = where.format(tmp=tmp_path)
    with pytest.raises(DataError) as error:
        prepare_corpus(data_config("data=text", f"data.path={path}"), block_size=16)
    assert str(error.value) == f"data.path={path!r}: {message}"


def test_running_out_of_memory_is_one_line_naming_the_text(text_file, monkeypatch):
    def no_memory(self, text):
        raise MemoryError

    monkeypatch.setattr(CharTokenizer, "encode_array", no_memory)
    with pytest.raises(DataError) as error:
        prepare_corpus(data_config("data=text", f"data.path={text_file}"), block_size=16)
    message = str(error.value)
    assert message.startswith(f"data.path={str(text_file)!r}: out of memory while reading")
    assert "(0 MB)" in message and "use a smaller text" in message


def test_block_size_longer_than_a_split_names_the_key(text_file):
    cfg = data_config("data=text", f"data.path={text_file}")
    with pytest.raises(ConfigError, match=r"^model\.block_size=100000"):
        prepare_corpus(cfg, block_size=100_000)


# ----------------------------------------------------------------------------- shakespeare


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_shakespeare_from_a_wrong_local_file_is_refused(text_file, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    cfg = data_config("data=shakespeare", f"data.path={text_file}")
    with pytest.raises(DataError, match=r"data\.path=.*sha256") as error:
        prepare_corpus(cfg, block_size=16)
    assert "data=text" in str(error.value)  # what to do instead


def test_shakespeare_offline_names_data_path(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(DataError, match=r"data\.path") as error:
        prepare_corpus(data_config("data=shakespeare"), block_size=16)
    assert "could not download" in str(error.value)
    assert str(cache_dir()) in str(error.value)  # where to put a copy
    assert not (cache_dir() / "tinyshakespeare.txt").exists()


def test_shakespeare_cached_copy_is_used_without_download(monkeypatch):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    cache_dir().mkdir(parents=True)
    (cache_dir() / "tinyshakespeare.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    corpus = prepare_corpus(data_config("data=shakespeare"), block_size=16)
    assert corpus.tokenizer.decode(corpus.train.tolist() + corpus.val.tolist()) == text


class _Response:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self) -> bytes:
        return self.payload


def test_shakespeare_download_is_checked_and_cached(monkeypatch):
    good = "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 20
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(good.encode()).hexdigest())
    cached = cache_dir() / "tinyshakespeare.txt"

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(b"<html>oops"))
    with pytest.raises(DataError, match="sha256"):
        prepare_corpus(data_config("data=shakespeare"), block_size=16)
    assert not cached.exists()  # a bad download is never cached

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(good.encode()))
    prepare_corpus(data_config("data=shakespeare"), block_size=16)
    assert cached.read_text(encoding="utf-8") == good


def test_shakespeare_damaged_cache_is_downloaded_again(monkeypatch):
    good = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n" * 20
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(good.encode()).hexdigest())
    cached = cache_dir() / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    for damaged in (good[:-7].encode(), b"\xff\xfe not UTF-8 at all \x80"):
        cached.write_bytes(damaged)
        monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(good.encode()))
        corpus = prepare_corpus(data_config("data=shakespeare"), block_size=16)
        assert corpus.tokenizer.decode(corpus.train.tolist() + corpus.val.tolist()) == good
        assert cached.read_bytes() == good.encode()
