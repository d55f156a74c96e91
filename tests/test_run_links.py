"""Symbolic links in a run directory: gptexp writes nothing through one, and walks over
directories never follow a link to a folder (item 8 of issue 18)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import gptexp.eval
import gptexp.resume
from tests.conftest import call_main, files_of, run_module


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("eval", "export"))
    return copy


def test_a_linked_train_log_is_refused_not_appended_to(run_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.log"
    outside.write_text("someone else's log\n")
    (run_copy / "train.log").unlink()
    (run_copy / "train.log").symlink_to(outside)
    before = files_of(run_copy)
    code, stderr = call_main(gptexp.resume.main, f"run={run_copy}", "training.max_steps=30")
    assert code == 2, stderr
    assert stderr.count("error:") == 1 and "train.log is a symbolic link" in stderr, stderr
    assert outside.read_text() == "someone else's log\n"
    assert files_of(run_copy) == before  # nothing trained, nothing written


def test_a_linked_tensorboard_folder_receives_nothing(run_copy: Path, tmp_path: Path) -> None:
    """logger=tensorboard writes its event files into <run>/tensorboard, and a resume rewinds
    them: a link there is refused like any folder training writes."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (run_copy / "tensorboard").symlink_to(outside, target_is_directory=True)
    code, stderr = call_main(
        gptexp.resume.main, f"run={run_copy}", "training.max_steps=30", "logger.tensorboard=true"
    )
    assert code == 2, stderr
    assert stderr.count("error:") == 1 and "tensorboard is a symbolic link" in stderr, stderr
    assert list(outside.iterdir()) == []


def test_a_linked_eval_folder_receives_nothing(run_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (run_copy / "eval").symlink_to(outside, target_is_directory=True)
    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", "batches=1")
    assert code == 2, stderr
    assert stderr.count("error:") == 1 and "eval is a symbolic link" in stderr, stderr
    assert list(outside.iterdir()) == []


def test_compare_tree_does_not_follow_a_link_loop(run_copy: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    nested = sweep / "group"
    nested.mkdir(parents=True)
    shutil.move(run_copy, nested / "0")
    (nested / "loop").symlink_to(sweep, target_is_directory=True)  # group/loop -> sweep/
    # A subprocess with a time limit (a guard against a hang, not a speed requirement): without
    # the fix the walk goes round the loop until the kernel's 40 links, listing the run each
    # time round (with two such links, 2**40 times: forever).
    done = run_module("gptexp.compare", "--tree", str(sweep), cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("group/0") == 1, done.stdout
