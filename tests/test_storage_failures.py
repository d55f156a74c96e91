"""A full disk or a read-only directory: one ``error:`` line (exit 1), the run recorded as
``failed`` with its error, and nothing lost: the run resumes once the cause is gone (item 16
of issue 18).

Faults are injected from the test side by monkeypatching the write that fails, raising the
OSError the kernel would (ENOSPC, EROFS). chmod alone would not do: the tests run as root,
whom file permissions do not stop.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch.distributed.checkpoint.filesystem as dcp_filesystem

import gptexp.core.cli
import gptexp.core.fsio
import gptexp.eval
import gptexp.export
import gptexp.observe.metrics
import gptexp.observe.rundir
import gptexp.resume
import gptexp.train
import gptexp.training.trainer
from tests.conftest import FAST, call_main, files_of

STEPS = ["training.max_steps=6", "training.eval_every=3", "checkpoint.every_steps=3"]


def full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def read_only(path) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


def train(run_dir: Path, *args: str) -> tuple[int, str]:
    return call_main(
        gptexp.train.main, *FAST, *STEPS, *args, f"hydra.run.dir={run_dir}", cwd=run_dir.parent
    )


def assert_one_error_line(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert all(word in errors[0] for word in words), stderr


def fail_metrics_after_the_first_records(monkeypatch, run_dir: Path) -> None:
    log = gptexp.observe.metrics.MetricsFile.log
    written = []

    def log_until_full(self, record):
        if len(written) >= 3:
            raise full(self.path)
        written.append(record)
        log(self, record)

    monkeypatch.setattr(gptexp.observe.metrics.MetricsFile, "log", log_until_full)


def fail_samples(monkeypatch, run_dir: Path) -> None:
    def open_(path, *args, **kwargs):
        if Path(path).name == "samples.txt":
            raise full(path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(gptexp.training.trainer, "open", open_, raising=False)


def fail_second_checkpoint(monkeypatch, run_dir: Path) -> None:
    """The .pt writer: torch.save's bytes go through fsio.HashingWriter."""
    write = gptexp.core.fsio.HashingWriter.write
    checkpoints = run_dir / "checkpoints"

    def write_until_full(self, data):
        if any(checkpoints.glob("step_0000003.pt")):
            raise full(self.f.name)
        return write(self, data)

    monkeypatch.setattr(gptexp.core.fsio.HashingWriter, "write", write_until_full)


def fail_dcp_write(monkeypatch, run_dir: Path) -> None:
    """DCP wraps the writer's OSError in its CheckpointException (a BaseException)."""

    def write_data(self, plan, planner):
        raise full(run_dir / "checkpoints" / "__0_0.distcp")

    monkeypatch.setattr(dcp_filesystem.FileSystemWriter, "write_data", write_data)


@pytest.mark.parametrize(
    ("fault", "args", "where"),
    [
        (fail_metrics_after_the_first_records, [], "metrics.jsonl"),
        (fail_samples, [], "samples.txt"),
        (fail_second_checkpoint, ["checkpoint.async_save=false"], "step_0000006.pt"),
        (fail_dcp_write, ["checkpoint.format=dcp", "checkpoint.async_save=false"], ".distcp"),
    ],
    ids=["metrics", "samples", "checkpoint", "dcp"],
)
def test_a_full_disk_mid_run_is_one_line_and_a_failed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault, args: list[str], where: str
) -> None:
    run_dir = tmp_path / "run"
    fault(monkeypatch, run_dir)
    code, stderr = train(run_dir, *args)
    assert code == 1, stderr
    assert_one_error_line(stderr, where, "No space left on device", f"make resume RUN={run_dir}")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed"
    assert where in status["error"] and "No space left on device" in status["error"]


def test_a_failed_run_resumes_once_space_is_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_metrics_after_the_first_records(patch, run_dir)
        code, stderr = train(run_dir)
    assert code == 1, stderr
    code, stderr = call_main(gptexp.resume.main, f"run={run_dir}")
    assert code == 0, stderr
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 6
    assert "error" not in status  # the failure of the earlier attempt is over


def test_a_run_that_cannot_record_its_start_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"

    def write(path, obj):
        raise full(path)

    monkeypatch.setattr(gptexp.observe.rundir, "atomic_write_json", write)
    code, stderr = train(run_dir)
    assert code == 1, stderr
    assert_one_error_line(stderr, "run.json", "No space left on device")
    assert not run_dir.exists()  # nothing had started: Hydra's files went again


def test_a_full_train_log_is_one_warning_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"

    def flush(self):
        raise full(self.baseFilename)

    monkeypatch.setattr(gptexp.core.cli.RunLogHandler, "flush", flush)
    code, stderr = train(run_dir)
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Logging error" not in stderr, stderr
    assert stderr.count("train.log stops here") == 1, stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("eval", "export"))
    return copy


def test_eval_export_and_resume_of_a_read_only_run_say_so_in_one_line(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = files_of(run_copy)
    open_ = os.open

    def refuse_writes(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(path).is_relative_to(run_copy):
            raise read_only(path)
        return open_(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_writes)

    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", "batches=1")
    assert code == 1, stderr
    assert_one_error_line(stderr, str(run_copy / "eval"), "Read-only file system")

    def mkdtemp(prefix="", dir=None):
        raise read_only(dir)

    monkeypatch.setattr(gptexp.export.tempfile, "mkdtemp", mkdtemp)
    code, stderr = call_main(gptexp.export.main, f"run={run_copy}")
    assert code == 1, stderr
    assert_one_error_line(stderr, str(run_copy / "export"), "Read-only file system")

    code, stderr = call_main(gptexp.resume.main, f"run={run_copy}", "training.max_steps=30")
    assert code == 1, stderr
    assert_one_error_line(stderr, ".lock", "Read-only file system")
    monkeypatch.undo()
    assert files_of(run_copy) == before


def test_a_run_directory_hydra_cannot_write_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """.hydra/ is Hydra's to write; the open it (and the check before it) use is refused."""
    run_dir = tmp_path / "run"
    open_ = open

    def refuse_hydra_dir(path, *args, **kwargs):
        if ".hydra" in Path(path).parts:
            raise full(path)
        return open_(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse_hydra_dir)
    code, stderr = train(run_dir)
    assert code == 1, stderr
    assert_one_error_line(stderr, str(run_dir / ".hydra"), "No space left on device")
    assert not run_dir.exists()  # the folders the check made went again
