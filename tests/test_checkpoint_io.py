"""Fast verified loads (hash and map in one pass) and pre-allocated snapshot buffers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from gptexp.checkpoint import reader as checkpoint
from gptexp.checkpoint.format import MANIFEST
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig
from gptexp.core.errors import CheckpointError
from gptexp.core.fsio import sha256_file, xxh3_128_file
from tests.conftest import fake_state, policy


def saved(tmp_path, step: int = 10, **overrides) -> CheckpointManager:
    manager = CheckpointManager(tmp_path, policy(**overrides))
    manager.save(fake_state(step), step, None, ["periodic"])
    manager.wait()
    return manager


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    for data in (b"", b"x" * 3_000_001):
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_a_loaded_checkpoint_can_be_modified_without_touching_the_file(tmp_path):
    manager = saved(tmp_path)
    entry = manager.find("last")
    state = manager.load(entry)
    assert torch.equal(state["model"]["w"], torch.full((4, 4), 10.0))
    state["model"]["w"].add_(1.0)  # as an optimizer updates its loaded state in place
    state["optimizer"]["state"][0]["exp_avg"].mul_(3.0)
    assert manager.verify(entry) is None  # the file's bytes are unchanged
    again = manager.load(entry)
    assert torch.equal(again["model"]["w"], torch.full((4, 4), 10.0))
    assert torch.equal(again["optimizer"]["state"][0]["exp_avg"], torch.ones(3) * 10)


@pytest.mark.parametrize("offset", [0, 100, -50])
def test_a_flipped_byte_anywhere_is_refused(tmp_path, offset):
    manager = saved(tmp_path)
    entry = manager.find("last")
    path = tmp_path / entry.file
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        manager.load(entry)


def test_a_truncated_file_is_refused_before_it_is_read(tmp_path):
    manager = saved(tmp_path)
    entry = manager.find("last")
    with open(tmp_path / entry.file, "r+b") as f:
        f.truncate(entry.bytes // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        manager.load(entry)


def test_a_file_replaced_between_hash_and_load_is_refused(tmp_path, monkeypatch):
    manager = saved(tmp_path)
    entry = manager.find("last")
    path = tmp_path / entry.file
    other = tmp_path / "other.pt"
    torch.save(fake_state(99), other)
    real_load = checkpoint.load_checkpoint_file

    def load_then_swap(p, **kwargs):
        state = real_load(p, **kwargs)
        other.replace(path)  # another writer renames a new file over it meanwhile
        return state

    monkeypatch.setattr(checkpoint, "load_checkpoint_file", load_then_swap)
    with pytest.raises(CheckpointError, match="replaced while it was being read"):
        manager.load(entry)


def test_prepare_allocates_the_buffers_the_first_save_copies_into(tmp_path):
    manager = CheckpointManager(tmp_path, policy(async_save=True))
    state = fake_state(10)
    manager.prepare({"model": state["model"], "optimizer": state["optimizer"]})
    buffers = dict(manager._snapshot_buffers)
    assert ("model", "w") in buffers and ("optimizer", "state", 0, "exp_avg") in buffers
    pointers = {place: b.data_ptr() for place, b in buffers.items()}

    state["model"]["w"].fill_(42.0)  # training goes on after prepare()
    manager.save(state, 10, None, ["periodic"])
    manager.wait()
    for place, pointer in pointers.items():  # the first save copied into the same memory
        assert manager._snapshot_buffers[place].data_ptr() == pointer, place
    loaded = manager.load(manager.find("last"))
    assert torch.equal(loaded["model"]["w"], torch.full((4, 4), 42.0))  # today's values


def test_prepare_does_nothing_without_asynchronous_saves(tmp_path):
    for config in (policy(async_save=False), CheckpointConfig(enabled=False)):
        manager = CheckpointManager(tmp_path, config)
        manager.prepare({"model": fake_state(1)["model"]})
        assert manager._snapshot_buffers == {}


def test_the_manifest_lists_both_checksums_and_loading_checks_the_fast_one(tmp_path):
    manager = saved(tmp_path)
    entry = manager.find("last")
    path = tmp_path / entry.file
    assert entry.sha256 == sha256_file(path) and entry.xxh3_128 == xxh3_128_file(path)
    entry.xxh3_128 = "0" * 32  # a listed checksum the file does not have
    with pytest.raises(CheckpointError, match="XXH3 checksum differs"):
        manager.load(entry)


def test_a_manifest_from_before_the_fast_checksum_is_verified_by_sha256(tmp_path):
    manager = saved(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    for entry in manifest["checkpoints"]:
        del entry["xxh3_128"]  # as gptexp wrote manifests before
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    entry = manager.find("last")
    assert entry.xxh3_128 is None
    assert manager.load(entry)["step"] == 10
    entry.sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="sha256 differs"):
        manager.load(entry)
