"""The tokenized-corpus cache: a second prepare_corpus on the same text reads the ids back
instead of tokenizing, and a damaged entry is ignored and written again."""

from __future__ import annotations

import pytest
import torch

from gptexp.core.config import DataConfig
from gptexp.data import corpus as data_module
from gptexp.data.cache import load_cached
from gptexp.data.corpus import prepare_corpus
from gptexp.data.tokenizers import CharTokenizer, tokenizer_from_json

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return DataConfig(name="text", path=str(path))


def _entries(tmp_path):
    return sorted((tmp_path / "cache" / "corpus").glob("*.npz"))


def _forbid_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds this text")

    monkeypatch.setattr(data_module, "train_tokenizer", refuse)
    monkeypatch.setattr(CharTokenizer, "encode", refuse)


def test_second_prepare_corpus_reads_the_cache_without_tokenizing(
    tmp_path, corpus_file, monkeypatch
):
    first = prepare_corpus(corpus_file, block_size=16)
    (entry,) = _entries(tmp_path)
    assert entry.name.startswith(first.fingerprint)

    _forbid_tokenizing(monkeypatch)
    second = prepare_corpus(corpus_file, block_size=16)
    assert torch.equal(second.train, first.train) and second.train.dtype == torch.long
    assert torch.equal(second.val, first.val)
    assert second.tokenizer.to_json() == first.tokenizer.to_json()
    assert (second.fingerprint, second.val_units) == (first.fingerprint, first.val_units)
    assert not list(entry.parent.glob("*.tmp")), "no temporary file is left behind"


def test_other_settings_or_text_get_their_own_entry(tmp_path, corpus_file):
    prepare_corpus(corpus_file, block_size=16)
    prepare_corpus(DataConfig(name="text", path=corpus_file.path, val_fraction=0.2), 16)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    prepare_corpus(DataConfig(name="text", path=str(other)), block_size=16)
    assert len(_entries(tmp_path)) == 3


def test_a_given_tokenizer_is_part_of_the_key(tmp_path, corpus_file):
    own = prepare_corpus(corpus_file, block_size=16)
    wider = CharTokenizer(sorted(set(TEXT) | set("XYZ")))  # other ids for the same text
    corpus = prepare_corpus(corpus_file, block_size=16, tokenizer=wider)
    assert corpus.tokenizer.to_json() == wider.to_json()
    cut = int(len(TEXT) * 0.9)  # data.val_fraction=0.1
    assert corpus.train.tolist() == wider.encode(TEXT[:cut]) != own.train.tolist()
    assert len(_entries(tmp_path)) == 2


def VOCAB(blob: str) -> int:  # noqa: N802 (a constant-like helper)
    return tokenizer_from_json(blob).vocab_size


@pytest.mark.parametrize("damage", [b"", b"not a zip file", None])
def test_a_damaged_entry_is_ignored_and_rewritten(tmp_path, corpus_file, damage):
    first = prepare_corpus(corpus_file, block_size=16)
    (entry,) = _entries(tmp_path)
    raw = entry.read_bytes()
    entry.write_bytes(raw[: len(raw) // 2] if damage is None else damage)
    assert load_cached(entry, first.fingerprint, VOCAB) is None  # truncated or junk

    again = prepare_corpus(corpus_file, block_size=16)
    assert torch.equal(again.train, first.train) and torch.equal(again.val, first.val)
    assert load_cached(entry, first.fingerprint, VOCAB) is not None, "the entry was written again"


def test_the_block_size_check_holds_for_a_cached_corpus(tmp_path, corpus_file):
    from gptexp.core.errors import ConfigError

    prepare_corpus(corpus_file, block_size=16)
    with pytest.raises(ConfigError, match="model.block_size=100000"):
        prepare_corpus(corpus_file, block_size=100_000)
