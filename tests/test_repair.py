"""A run directory that lost or damaged its manifest: every command refuses it and names the
repair, ``python -m gptexp.repair`` rebuilds the manifest from the files that load (deleting
nothing), and the run then resumes; eval and export of a live run racing its retention."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import gptexp.checkpoint.manager
import gptexp.checkpoint.reader
import gptexp.eval
import gptexp.export
import gptexp.fork
import gptexp.repair
import gptexp.resume
from gptexp.checkpoint.format import MANIFEST, checkpoint_name
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig
from gptexp.observe.rundir import RunDirectory
from tests.conftest import call_main, files_of


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared finished run (checkpoints at steps 10 and 20)."""
    copy = tmp_path / "a run"  # a space: the printed command must still work
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("eval", "export"))
    return copy


def manager(run: Path) -> CheckpointManager:
    return CheckpointManager(run / "checkpoints", CheckpointConfig())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_without_its_manifest_a_run_is_refused_by_every_command_then_repaired(run, tmp_path):
    listed = {e.file: e.sha256 for e in manager(run).entries()}
    (run / "checkpoints" / MANIFEST).unlink()
    before = files_of(run / "checkpoints")
    commands = [
        (gptexp.resume.main, [f"run={run}", "training.max_steps=30"]),
        (gptexp.eval.main, [f"run={run}", "samples=0"]),
        (gptexp.export.main, [f"run={run}"]),
        (gptexp.fork.main, [f"run={run}", f"out={tmp_path / 'fork'}", "training.lr=1e-4"]),
    ]
    for main, args in commands:
        code, stderr = call_main(main, *args, cwd=tmp_path)
        assert code == 2, stderr
        (line,) = error_lines(stderr)
        assert "no manifest.json" in line and f"python -m gptexp.repair run='{run}'" in line
        assert "Traceback" not in stderr
    assert files_of(run / "checkpoints") == before, "no checkpoint overwritten or deleted"
    assert not (tmp_path / "fork").exists()

    code, stderr = call_main(gptexp.repair.main, f"run={run}")
    assert code == 0, stderr
    assert "2 checkpoint(s) listed (steps 10, 20)" in stderr
    # make would split RUN= at the space: the hint is the command make runs, quoted
    assert f"continue with: python -m gptexp.resume 'run={run}'" in stderr
    rebuilt = manager(run).entries()
    assert {e.file: e.sha256 for e in rebuilt} == listed
    for entry in rebuilt:
        assert manager(run).load(entry)["step"] == entry.step

    code, stderr = call_main(gptexp.resume.main, f"run={run}", "training.max_steps=30")
    assert code == 0, stderr
    assert "resuming from step_0000020.pt" in stderr
    assert manager(run).find("last").step == 30


def test_repair_lists_only_what_loads_and_deletes_nothing(run, tmp_path):
    checkpoints = run / "checkpoints"
    good = (checkpoints / checkpoint_name(20)).read_bytes()
    marker = tmp_path / "pwned"
    (checkpoints / checkpoint_name(30)).write_bytes(b"garbage")
    (checkpoints / checkpoint_name(40)).write_bytes(good[:100_000])  # truncated
    torch.save({"model": _RunsCode(marker), "step": 50}, checkpoints / checkpoint_name(50))
    (checkpoints / checkpoint_name(60)).write_bytes(good)  # says step 60, holds step 20
    state = torch.load(checkpoints / checkpoint_name(20), weights_only=True)
    foreign = state | {"step": 70, "data_fingerprint": "0" * 64}  # another text
    torch.save(foreign, checkpoints / checkpoint_name(70))
    (checkpoints / "step_0000080.dcp").mkdir()
    (checkpoints / "step_00000010.pt").write_bytes(good)  # step 10's, not under its name
    (checkpoints / MANIFEST).write_text('{"checkpoints": [{"file": "../../x"}]}')  # damaged
    before = files_of(checkpoints)

    code, stderr = call_main(gptexp.repair.main, f"run={run}")
    assert code == 0, stderr
    assert [e.step for e in manager(run).entries()] == [10, 20]
    for step, why in [
        (30, "unreadable"),
        (40, "unreadable"),
        (50, "refused to load"),
        (60, "holds step 20"),
        (70, "another run"),
    ]:
        assert f"left untouched, not listed: {checkpoint_name(step)}: " in stderr
        assert why in stderr.split(checkpoint_name(step) + ": ")[1].splitlines()[0]
    assert "step_0000080.dcp: a DCP directory" in stderr
    assert "step_00000010.pt: not the name gptexp gives step 10's checkpoint" in stderr
    assert not marker.exists(), "no code in a checkpoint ever runs"
    after = files_of(checkpoints)
    (backup,) = [name for name in after if name.startswith(f"{MANIFEST}.bak-")]
    assert after[backup] == before[MANIFEST], "the old manifest is kept"
    assert {k: v for k, v in after.items() if k not in (backup, MANIFEST)} == {
        k: v for k, v in before.items() if k != MANIFEST
    }, "nothing else changed"
    assert (checkpoints / "step_0000080.dcp").is_dir()


def test_repair_refuses_a_live_run_and_a_run_with_nothing_that_loads(run):
    manifest = (run / "checkpoints" / MANIFEST).read_bytes()
    with RunDirectory(run).lock():  # what a training process holds
        code, stderr = call_main(gptexp.repair.main, f"run={run}")
    assert code == 2 and "live process" in error_lines(stderr)[0]
    assert (run / "checkpoints" / MANIFEST).read_bytes() == manifest

    for path in (run / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"garbage")
    code, stderr = call_main(gptexp.repair.main, f"run={run}")
    assert code == 2 and "nothing written" in error_lines(stderr)[0]
    assert (run / "checkpoints" / MANIFEST).read_bytes() == manifest


# ----------------------------------------------------------------------------- a live run


def retention_at_first_read(run: Path, monkeypatch) -> None:
    """The live run saves step 30 (step 20's state) with keep_last=1, keep_best=0 the moment
    eval or export has checksummed the checkpoint it chose and before it reads it: its
    retention deletes every other checkpoint."""
    policy = CheckpointConfig(every_steps=10, keep_last=1, keep_best=0, async_save=False)
    live = CheckpointManager(run / "checkpoints", policy)
    state = live.load(live.find(20))
    real, done = gptexp.checkpoint.reader.xxh3_128_of_open_file, []

    def checksum(f):
        digest = real(f)
        if not done:
            done.append(True)
            live.save(state | {"step": 30}, 30, None, ["periodic"])
        return digest

    monkeypatch.setattr(gptexp.checkpoint.reader, "xxh3_128_of_open_file", checksum)


def test_eval_of_a_live_run_whose_retention_deletes_the_chosen_checkpoint(run, monkeypatch):
    retention_at_first_read(run, monkeypatch)
    code, stderr = call_main(gptexp.eval.main, f"run={run}", "samples=0")
    assert code == 0, stderr
    assert not (run / "checkpoints" / checkpoint_name(20)).exists(), "the race did happen"
    result = json.loads((run / "eval" / "last.json").read_text())
    assert result["step"] == 30 and result["skipped_checkpoints"] == []
    assert "skipping" not in stderr


def test_export_of_a_step_that_retention_took_meanwhile_is_one_clear_line(run, monkeypatch):
    retention_at_first_read(run, monkeypatch)
    code, stderr = call_main(gptexp.export.main, f"run={run}", "ckpt=20")
    assert code == 2, stderr
    (line,) = error_lines(stderr)
    assert "no checkpoint at step 20" in line and "ckpt=last" in line
    assert "Traceback" not in stderr


def test_repair_keeps_what_the_old_manifest_says_of_an_unchanged_file(run):
    manifest = json.loads((run / "checkpoints" / MANIFEST).read_text())
    ten, twenty = manifest["checkpoints"]
    manifest["checkpoints"] = [ten, dict(twenty, file="/etc")]  # a hostile entry
    (run / "checkpoints" / MANIFEST).write_text(json.dumps(manifest))
    code, stderr = call_main(gptexp.repair.main, f"run={run}")
    assert code == 0, stderr
    rebuilt = {e.step: e for e in manager(run).entries()}
    assert (rebuilt[10].reasons, rebuilt[10].metric, rebuilt[10].time) == (
        ten["reasons"],
        ten["metric"],
        ten["time"],
    )
    state = manager(run).load(rebuilt[20])
    assert rebuilt[20].reasons == ["repaired", "periodic"]  # from the run's policy
    assert rebuilt[20].metric == state["metric"] == twenty["metric"]
