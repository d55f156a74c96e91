"""The checkpoint directory: crash-safe writes, verification, fallback, retention, safe loading.

In-process and fast; the crash and resume behaviour through the real entry points is in
test_resume.py.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptexp.checkpoint.manager
import gptexp.checkpoint.reader
import gptexp.fork
from gptexp.checkpoint.format import MANIFEST, checkpoint_name, load_checkpoint_file, snapshot
from gptexp.checkpoint.manager import FORK_START, CheckpointManager
from gptexp.core.config import CheckpointConfig
from gptexp.core.errors import CheckpointError
from gptexp.core.fsio import sha256_file, xxh3_128_file
from tests.conftest import call_main, fake_state, policy


def save(manager: CheckpointManager, step: int, metric: float | None = None) -> None:
    manager.save(fake_state(step), step, metric, ["periodic"])


def listed_steps(manager: CheckpointManager) -> list[int]:
    return [e.step for e in manager.entries()]


def files_on_disk(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("step_*.pt")}


# ----------------------------------------------------------------------------- writes


@pytest.mark.parametrize("asynchronous", [False, True])
def test_save_lists_checkpoint_with_hash_and_loads_weights_only(tmp_path, asynchronous):
    manager = CheckpointManager(tmp_path, policy(async_save=asynchronous))
    save(manager, 10, metric=2.5)
    manager.wait()
    (entry,) = manager.entries()
    path = tmp_path / entry.file
    assert entry.file == checkpoint_name(10) == "step_0000010.pt"
    assert entry.sha256 == sha256_file(path) and entry.bytes == path.stat().st_size
    assert entry.metric == 2.5
    state = torch.load(path, weights_only=True)  # plain data: no allow-listing needed
    assert torch.equal(state["model"]["w"], torch.full((4, 4), 10.0))
    assert not list(tmp_path.glob("*.tmp")), "no temporary file survives a completed save"


def test_async_save_writes_the_values_of_the_moment_it_was_called(tmp_path):
    manager = CheckpointManager(tmp_path, policy(async_save=True))
    state = fake_state(10)
    manager.save(state, 10, None, ["periodic"])
    state["model"]["w"].add_(100.0)  # training goes on mutating tensors in place
    manager.wait()
    loaded = manager.load(manager.find("last"))
    assert torch.equal(loaded["model"]["w"], torch.full((4, 4), 10.0))


def test_snapshot_keeps_shared_tensors_shared():
    weight = torch.randn(3, 3)
    copy = snapshot({"wte": weight, "lm_head": weight})
    assert copy["wte"] is copy["lm_head"], "tied weights are written once"
    assert copy["wte"] is not weight and torch.equal(copy["wte"], weight)


# ----------------------------------------------------------------------------- verification


def test_truncated_newest_falls_back_with_message(tmp_path):
    manager = CheckpointManager(tmp_path, policy(keep_last=3))
    for step in (10, 20, 30):
        save(manager, step)
    newest = tmp_path / checkpoint_name(30)
    newest.write_bytes(newest.read_bytes()[:100])
    messages: list[str] = []
    entry, state = manager.load_latest_valid(warn=messages.append)
    assert entry.step == 20 and state["step"] == 20
    assert any("step_0000030.pt" in m and "truncated" in m for m in messages)


def test_bit_flipped_newest_falls_back(tmp_path):
    manager = CheckpointManager(tmp_path, policy(keep_last=3))
    for step in (10, 20):
        save(manager, step)
    newest = tmp_path / checkpoint_name(20)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    newest.write_bytes(bytes(data))
    messages: list[str] = []
    entry, _ = manager.load_latest_valid(warn=messages.append)
    assert entry.step == 10
    assert any("corrupted" in m for m in messages)


def test_missing_newest_falls_back(tmp_path):
    manager = CheckpointManager(tmp_path, policy(keep_last=3))
    for step in (10, 20):
        save(manager, step)
    (tmp_path / checkpoint_name(20)).unlink()
    messages: list[str] = []
    entry, _ = manager.load_latest_valid(warn=messages.append)
    assert entry.step == 10
    assert any("missing" in m for m in messages)


def test_unlisted_newest_does_not_exist(tmp_path):
    """A file renamed into place whose manifest update never happened is ignored."""
    manager = CheckpointManager(tmp_path, policy(keep_last=3))
    save(manager, 10)
    torch.save(fake_state(20), tmp_path / checkpoint_name(20))
    messages: list[str] = []
    entry, _ = manager.load_latest_valid(warn=messages.append)
    assert entry.step == 10
    assert any("step_0000020.pt" in m and "not in the manifest" in m for m in messages)


def test_no_valid_checkpoint_is_none(tmp_path):
    manager = CheckpointManager(tmp_path, policy())
    assert manager.load_latest_valid(warn=lambda m: None) is None
    save(manager, 10)
    (tmp_path / checkpoint_name(10)).write_bytes(b"garbage")
    assert manager.load_latest_valid(warn=lambda m: None) is None


def test_find_by_name_and_step(tmp_path):
    manager = CheckpointManager(tmp_path, policy(keep_last=5, keep_best=5))
    for step, metric in ((10, 3.0), (20, 1.0), (30, 2.0)):
        save(manager, step, metric)
    assert manager.find("last").step == 30
    assert manager.find("best").step == 20
    assert manager.find(10).step == 10
    with pytest.raises(CheckpointError, match="no checkpoint at step 15 .*10, 20, 30"):
        manager.find(15)


def test_stale_temporary_files_are_removed(tmp_path):
    manager = CheckpointManager(tmp_path, policy())
    save(manager, 10)
    (tmp_path / "step_0000020.pt.tmp").write_bytes(b"half a checkpoint")
    manager.remove_stale_temporaries()
    assert files_on_disk(tmp_path) == {"step_0000010.pt"}
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- safe loading


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / checkpoint_name(10)
    payload = {"model": _RunsCode(marker), "step": 10}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint_file(path)
    assert not marker.exists(), "the payload's code must never run"


def test_listed_malicious_checkpoint_is_skipped_for_an_older_valid_one(tmp_path):
    manager = CheckpointManager(tmp_path, policy(keep_last=3))
    save(manager, 10)
    marker = tmp_path / "pwned"
    evil = tmp_path / checkpoint_name(20)
    torch.save({"model": _RunsCode(marker), "step": 20}, evil)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    entry = dict(manifest["checkpoints"][0])
    entry.update(file=evil.name, step=20, sha256=sha256_file(evil), bytes=evil.stat().st_size)
    entry["xxh3_128"] = xxh3_128_file(evil)
    manifest["checkpoints"].append(entry)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    messages: list[str] = []
    found, _ = manager.load_latest_valid(warn=messages.append)
    assert found.step == 10
    assert any("refused" in m for m in messages)
    assert not marker.exists()


# ----------------------------------------------------------------------------- disk full

_FULL_DISK_SCRIPT = """
import resource, sys, torch
from pathlib import Path
from gptexp.checkpoint.manager import CheckpointManager, CheckpointError
from gptexp.core.config import CheckpointConfig
from tests.conftest import call_main, fake_state, policy
directory = Path(sys.argv[1])
manager = CheckpointManager(directory, CheckpointConfig(every_steps=10, keep_last=5,
                                                        async_save=sys.argv[2] == "async"))
# The earlier checkpoints are small; the new one is larger than the file-size limit allows.
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
big = {"model": {"w": torch.zeros(100_000)}, "step": 30}
try:
    manager.save(big, 30, None, ["periodic"])
    manager.wait()
except CheckpointError as error:
    print(error)
    sys.exit(3)
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, mode):
    manager = CheckpointManager(tmp_path, policy(keep_last=5))
    for step in (10, 20):
        save(manager, step)
    manifest_before = (tmp_path / MANIFEST).read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 3, result.stderr
    assert "could not write checkpoint" in result.stdout
    assert "earlier checkpoints are intact" in result.stdout
    assert (tmp_path / MANIFEST).read_bytes() == manifest_before
    assert files_on_disk(tmp_path) == {"step_0000010.pt", "step_0000020.pt"}
    assert not list(tmp_path.glob("*.tmp")), "the partial file is removed"
    for entry in manager.entries():
        assert manager.load(entry)["step"] == entry.step


# ----------------------------------------------------------------------------- retention


def test_retention_keeps_exactly_what_the_policy_says_over_a_long_run(tmp_path):
    """200 steps: periodic every 10, evaluations every 25 with a noisy falling metric."""
    cfg = policy(every_steps=10, keep_last=3, keep_best=2, keep_every=50)
    manager = CheckpointManager(tmp_path, cfg)
    metrics = {}
    for step in range(1, 201):
        metric = None
        if step % 25 == 0:
            metric = 10.0 / step + (0.5 if step in (100, 175) else 0.0)  # two bad evals
            metrics[step] = metric
        reasons = manager.wants(step, metric, final=step == 200)
        if reasons:
            manager.save(fake_state(step), step, metric, reasons)
    manager.wait()
    best_two = sorted(metrics, key=metrics.get)[:2]
    expected = {180, 190, 200} | set(best_two) | {50, 100, 150, 200}
    assert sorted(listed_steps(manager)) == sorted(expected)
    assert files_on_disk(tmp_path) == {checkpoint_name(s) for s in expected}
    assert manager.find("best").step == min(metrics, key=metrics.get)


def test_best_checkpoints_survive_periodic_retention(tmp_path):
    manager = CheckpointManager(tmp_path, policy(every_steps=10, keep_last=1, keep_best=1))
    manager.save(fake_state(10), 10, 0.5, ["periodic", "best"])  # the best, early
    for step in range(20, 110, 10):
        manager.save(fake_state(step), step, 1.0 + step, ["periodic"])
    assert listed_steps(manager) == [10, 100]


def test_best_only_policy_saves_on_improvement_and_keeps_newest(tmp_path):
    manager = CheckpointManager(tmp_path, policy(every_steps=0, keep_last=1, keep_best=1))
    for step, metric in ((10, 3.0), (20, 2.0), (30, 2.5), (40, 1.5)):
        reasons = manager.wants(step, metric, final=False)
        assert ("best" in reasons) == (metric in (3.0, 2.0, 1.5))
        if reasons:
            manager.save(fake_state(step), step, metric, reasons)
    manager.save(fake_state(50), 50, None, manager.wants(50, None, final=True))
    assert listed_steps(manager) == [40, 50]


def test_max_mode_ranks_higher_as_better(tmp_path):
    manager = CheckpointManager(tmp_path, policy(keep_last=1, keep_best=1, mode="max"))
    for step, metric in ((10, 0.2), (20, 0.9), (30, 0.4)):
        manager.save(fake_state(step), step, metric, ["periodic"])
    assert listed_steps(manager) == [20, 30]
    assert manager.find("best").step == 20


def test_disabled_policy_wants_nothing(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(enabled=False, every_steps=10))
    assert manager.wants(10, 1.0, final=True) == []


def test_a_fork_start_survives_retention_like_the_best(tmp_path):
    """A fork's first checkpoint (its parent's state at the fork step) is its lineage's anchor."""
    manager = CheckpointManager(tmp_path, policy(keep_last=1, keep_best=0))
    manager.save(fake_state(23), 23, None, [FORK_START])
    for step in (30, 40, 50):
        save(manager, step)
    assert listed_steps(manager) == [23, 50]
    assert manager.load(manager.find(23))["step"] == 23


def test_a_real_forks_start_checkpoint_outlives_keep_last(finished_run, tmp_path):
    fork_dir = tmp_path / "fork"
    keep_one = ["checkpoint.every_steps=5", "checkpoint.keep_last=1", "checkpoint.keep_best=0"]
    args = [f"run={finished_run}", "ckpt=10", f"out={fork_dir}", *keep_one]
    code, stderr = call_main(gptexp.fork.main, *args, cwd=tmp_path)
    assert code == 0, stderr
    manager = CheckpointManager(fork_dir / "checkpoints", CheckpointConfig())
    assert [(e.step, e.reasons) for e in manager.entries()][0] == (10, [FORK_START])
    assert listed_steps(manager) == [10, 20]  # 15 went; the fork's start stays


# ----------------------------------------------------------------------------- hostile manifests


def craft_entry(directory: Path, **fields) -> None:
    """Append an entry (a copy of the first one with ``fields`` changed) to the manifest."""
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["checkpoints"].append(dict(manifest["checkpoints"][0], **fields))
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["parent", "absolute", "inside a folder", "link"])
def test_a_manifest_entry_outside_checkpoints_is_refused_and_nothing_is_deleted(tmp_path, how):
    directory = tmp_path / "run" / "checkpoints"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    manager = CheckpointManager(directory, policy(keep_last=1, keep_best=0))
    save(manager, 10)
    name = {
        "parent": "../../victim",
        "absolute": str(victim),
        "inside a folder": "old/step_0000005.pt",
        "link": "step_0000005.pt",
    }[how]
    if how == "link":
        (directory / name).symlink_to(victim)
    craft_entry(directory, file=name, step=5)  # older: retention would drop it at the next save

    with pytest.raises(CheckpointError, match=r"manifest.json: damaged manifest: entry 1 "):
        save(manager, 20)
    with pytest.raises(CheckpointError, match="gptexp.repair"):
        manager.load_latest_valid()
    assert (victim / "thesis.txt").read_text() == "years of work"
    assert (directory / checkpoint_name(10)).is_file()


@pytest.mark.parametrize(
    "fields",
    [
        {"step": "10"},
        {"step": True},
        {"bytes": [1]},
        {"sha256": None},
        {"reasons": "periodic"},
        {"reasons": [1]},
        {"metric": "low"},
        {"time": {}},
        {"files": {"a": "b"}},  # a .pt file has no member files
        {"step": 20},  # file step_0000010.pt does not say step 20
        {"file": "step_00000010.pt"},  # step 10, but not its checkpoint's name
        {"owner": "me"},
    ],
    ids=str,
)
def test_manifest_entries_of_the_wrong_type_are_one_clean_error(tmp_path, fields):
    manager = CheckpointManager(tmp_path, policy())
    save(manager, 10)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["checkpoints"][0].update(fields)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    for use in (manager.entries, manager.load_latest_valid, lambda: manager.find(10)):
        with pytest.raises(CheckpointError, match=r"damaged manifest: entry 0 \("):
            use()


@pytest.mark.parametrize(
    "text", ['{"checkpoints": {}}', "[1, 2]", '{"checkpoints": [[]]}', "[" * 100_000, "\xff"]
)
def test_a_manifest_that_is_not_a_list_of_entries_is_one_clean_error(tmp_path, text):
    manager = CheckpointManager(tmp_path, policy())
    (tmp_path / MANIFEST).write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError, match="damaged manifest"):
        manager.load_latest_valid()


# ----------------------------------------------------------------------------- damaged newest


def test_a_damaged_newest_never_costs_a_valid_checkpoint(tmp_path, caplog):
    """keep_last=1, resumed from step 10 past a truncated step 20: retention counts the verified
    checkpoints only, so the save of step 13 and the checkpoint resumed from both stay."""
    save(CheckpointManager(tmp_path, policy(keep_last=2)), 10)
    save(CheckpointManager(tmp_path, policy(keep_last=2)), 20)
    newest = tmp_path / checkpoint_name(20)
    newest.write_bytes(newest.read_bytes()[:100])
    manager = CheckpointManager(tmp_path, policy(keep_last=1, keep_best=0))
    entry, _ = manager.load_latest_valid(warn=lambda m: None)
    assert entry.step == 10

    manager.save(fake_state(13), 13, None, ["signal"])  # "saved checkpoint at step 13"
    assert listed_steps(manager) == [10, 13]
    for entry in manager.entries():
        assert manager.load(entry)["step"] == entry.step
    aside = tmp_path / "step_0000020.pt.damaged"
    assert len(aside.read_bytes()) == 100, "the damaged file is kept, under another name"
    said = [r.getMessage() for r in caplog.records if "step_0000020.pt.damaged" in r.getMessage()]
    assert len(said) == 1 and "truncated" in said[0]

    save(manager, 20)  # training reaches step 20 again: a new file, the damaged one untouched
    save(manager, 30)
    assert listed_steps(manager) == [30]
    assert manager.load(manager.find(30))["step"] == 30
    assert len(aside.read_bytes()) == 100


def test_a_save_never_overwrites_a_file_the_manifest_does_not_vouch_for(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, policy(keep_last=5))
    save(manager, 10)
    theirs = tmp_path / checkpoint_name(20)
    theirs.write_bytes(b"not written by this process")
    save(manager, 20)
    assert listed_steps(manager) == [10, 20]
    assert manager.load(manager.find(20))["step"] == 20
    assert (tmp_path / "step_0000020.pt.unlisted").read_bytes() == b"not written by this process"
    assert any("not in the manifest" in r.getMessage() for r in caplog.records)
    save(manager, 20)  # its own listed checkpoint of the step: replaced, nothing more set aside
    assert sorted(p.name for p in tmp_path.glob("step_0000020*")) == [
        "step_0000020.pt",
        "step_0000020.pt.unlisted",
    ]


def test_checkpoints_without_a_manifest_are_refused_naming_the_repair(tmp_path):
    run = tmp_path / "my run"
    manager = CheckpointManager(run / "checkpoints", policy(keep_last=5))
    for step in (10, 20):
        save(manager, step)
    (run / "checkpoints" / MANIFEST).unlink()
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    fresh = CheckpointManager(run / "checkpoints", policy(keep_last=1))
    for use in (fresh.load_latest_valid, lambda: save(fresh, 10), lambda: save(fresh, 30)):
        with pytest.raises(CheckpointError) as error:
            use()
        assert f"python -m gptexp.repair run='{run}'" in str(error.value)
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert after == before, "nothing overwritten, deleted or added"


@pytest.mark.parametrize("crash_at", ["before the rename", "after the rename"])
def test_a_crash_in_the_first_save_needs_no_repair(tmp_path, monkeypatch, crash_at):
    """A SIGKILL between the manifest write and the rename of a run's first checkpoint
    (simulated by an exception there) leaves nothing that looks like a copy without its
    manifest: the next process starts or resumes, it is not sent to ``gptexp.repair``."""
    directory = tmp_path / "checkpoints"
    real_replace = os.replace

    class Killed(BaseException):
        pass

    def replace(src, dst):
        if Path(dst).name != checkpoint_name(10):
            return real_replace(src, dst)
        if crash_at == "after the rename":
            real_replace(src, dst)
        raise Killed

    monkeypatch.setattr(gptexp.checkpoint.manager.os, "replace", replace)
    with pytest.raises(Killed):
        save(CheckpointManager(directory, policy(keep_last=2)), 10)
    monkeypatch.setattr(gptexp.checkpoint.manager.os, "replace", real_replace)
    later = CheckpointManager(directory, policy(keep_last=2))
    found = later.load_latest_valid(warn=lambda message: None)
    assert (found[0].step if found else None) == (10 if crash_at == "after the rename" else None)
    later.remove_stale_temporaries()
    save(later, 10)
    save(later, 20)
    assert listed_steps(later) == [10, 20]


# ----------------------------------------------------------------------------- a live run


def save_when_read(writer: CheckpointManager, step: int):
    """A side effect that saves ``step`` with the writer (keep_last=1: the older one goes), once."""
    done = []

    def act() -> None:
        if not done:
            done.append(step)
            save(writer, step)

    return act


@pytest.mark.parametrize("moment", ["after the manifest", "after the checksum", "after the load"])
def test_a_reader_racing_retention_takes_the_newest_valid_checkpoint(tmp_path, monkeypatch, moment):
    """eval / export of a live run with keep_last=1: retention deletes the checkpoint the reader
    chose between two of its reads (made deterministic here by saving at that moment)."""
    writer = CheckpointManager(tmp_path, policy(keep_last=1, keep_best=0))
    save(writer, 10)
    reader = CheckpointManager(tmp_path, policy())
    race = save_when_read(writer, 20)
    if moment == "after the manifest":
        entries = reader.entries
        monkeypatch.setattr(reader, "entries", lambda: (entries(), race())[0])
    else:
        name = "xxh3_128_of_open_file" if moment == "after the checksum" else "load_checkpoint_file"
        real = getattr(gptexp.checkpoint.reader, name)
        monkeypatch.setattr(
            gptexp.checkpoint.reader, name, lambda *a, **k: (real(*a, **k), race())[0]
        )
    messages: list[str] = []
    entry, state = reader.load_latest_valid(warn=messages.append)
    assert (entry.step, state["step"]) == (20, 20)
    assert messages == [], "nothing was damaged: no message"
    assert not (tmp_path / checkpoint_name(10)).exists(), "the race did happen"


def test_an_explicit_step_that_retention_took_meanwhile_is_a_clear_error(tmp_path, monkeypatch):
    writer = CheckpointManager(tmp_path, policy(keep_last=1, keep_best=0))
    save(writer, 10)
    reader = CheckpointManager(tmp_path, policy())
    race = save_when_read(writer, 20)
    real = gptexp.checkpoint.reader.xxh3_128_of_open_file
    monkeypatch.setattr(
        gptexp.checkpoint.reader, "xxh3_128_of_open_file", lambda f: (real(f), race())[0]
    )
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 10 \(have: 20\)"):
        reader.load_requested(10)


def test_a_dcp_save_never_removes_a_directory_the_manifest_does_not_list(tmp_path):
    manager = CheckpointManager(tmp_path, policy(format="dcp", keep_last=5))
    save(manager, 10)
    theirs = tmp_path / "step_0000020.dcp"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    save(manager, 20)
    manager.wait()
    assert listed_steps(manager) == [10, 20]
    assert manager.load(manager.find(20))["step"] == 20
    assert (tmp_path / "step_0000020.dcp.unlisted" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- one manager


def test_a_runs_checkpoint_manager_has_one_source_and_the_policy_its_use_needs(tmp_path):
    """A reader's manager (eval, export, fork, diff, repair) ranks ``best`` by the run's own
    stored policy; a training start passes the policy it trains under."""
    from gptexp.checkpoint.manager import run_checkpoints
    from gptexp.observe.rundir import RunDirectory

    run = RunDirectory(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"checkpoint": {"mode": "max"}}}))
    reader = run_checkpoints(run)
    assert reader.directory == run.checkpoints and reader.policy.mode == "max"
    writer = run_checkpoints(run, CheckpointConfig(keep_last=7))
    assert writer.policy.keep_last == 7 and writer.directory == run.checkpoints
    (tmp_path / "run.json").write_text(json.dumps({"config": {"checkpoint": "not a dict"}}))
    assert run_checkpoints(run).policy == CheckpointConfig()


def test_no_module_builds_a_runs_checkpoint_manager_itself():
    """Only gptexp.checkpoint.manager.run_checkpoints does (bench and gpucheck time their own
    scratch directories)."""
    root = Path(gptexp.checkpoint.manager.__file__).parents[1]  # the gptexp package
    builders = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "CheckpointManager(" in path.read_text(encoding="utf-8")
    }
    assert builders == {"checkpoint/manager.py", "tools/gpucheck.py", "tools/bench/measure.py"}
