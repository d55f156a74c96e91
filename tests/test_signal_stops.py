"""Stops on signals as a person sees them: a double Ctrl-C, and the resume command that a stop
under torchrun prints (items 20 and 21 of issue 18)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gptexp.observe.rundir import RunDirectory
from tests.conftest import (
    FAST,
    ROOT,
    files_of,
    read_metrics,
    subprocess_env,
    torchrun,
    wait_until,
)


def test_a_second_ctrl_c_during_the_save_leaves_an_interrupted_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "double_interrupt.py"),
            *FAST,
            "training.max_steps=10",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 130, done.stderr
    assert "SIGINT again: stopping now without saving" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert RunDirectory(run_dir).status() == "interrupted"


@pytest.mark.slow
def test_a_world_size_refusal_under_torchrun_is_one_line_and_writes_nothing(
    finished_run: Path, tmp_path: Path
) -> None:
    """The shared run trained on one process with a global batch of one micro-batch: it cannot
    be split over two."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns("eval", "export"))
    before = files_of(run_dir)
    result = torchrun("gptexp.resume", f"run={run_dir}", "training.max_steps=30")
    assert result.returncode != 0
    assert result.stderr.count("error: cannot resume on 2 processes") == 1, result.stderr
    assert "exitcode  : 2" in result.stderr, result.stderr  # every rank: bad input
    # What the ranks print comes before torchrun's own report (its ChildFailedError).
    ranks = result.stderr.split("torch/distributed/elastic")[0]
    assert "Traceback" not in ranks, result.stderr
    after = files_of(run_dir)
    after.pop(".lock"), before.pop(".lock")  # the lock names its holder's pid, by design
    assert after == before  # train.log included


@pytest.mark.slow
def test_a_stop_under_torchrun_says_how_to_resume_on_two_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        launch = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "gptexp.train",
                *FAST,
                "training.max_steps=2000",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_until(lambda: len(read_metrics(run_dir)) >= 3, process=launch, what="step 2")
            rank0 = json.loads((run_dir / "run.json").read_text())["pid"]
            os.kill(rank0, signal.SIGTERM)
            launch.wait(timeout=120)
        finally:
            launch.kill()
    text = stderr.read_text()
    assert f"resume with: make resume RUN={run_dir} NPROC=2" in text, text
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
