"""The training loop's less travelled paths, through the real entry point: SIGUSR1 (SLURM's
pre-timeout signal), monitoring train/loss, torch.compile, the log under a progress bar, and
an export in a format gptexp does not read."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import gptexp.eval
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig
from gptexp.core.errors import ConfigError
from gptexp.export import load_export
from tests.conftest import FAST, call_main, read_metrics, subprocess_env, train, wait_until

pytestmark = pytest.mark.slow


def start(run_dir: Path, *overrides: str, cwd: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "gptexp.train", *FAST, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, cwd=cwd, env=subprocess_env(), **popen)


def test_sigusr1_saves_and_stops_like_sigterm(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        run_dir,
        "training.max_steps=100000",
        "training.compile=false",  # auto would compile a run this long: seconds of waiting
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: any(r["step"] >= 3 for r in read_metrics(run_dir)), process=proc, what="step 3"
    )
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "stopped by SIGUSR1 at step" in stderr and f"make resume RUN={run_dir}" in stderr
    status = json.loads((run_dir / "run.json").read_text())
    entries = CheckpointManager(run_dir / "checkpoints", CheckpointConfig()).entries()
    assert status["status"] == "interrupted" and entries[-1].reasons == ["signal"]
    assert entries[-1].step == status["step"]


def test_monitoring_train_loss_ranks_checkpoints_by_it(tmp_path):
    run_dir = tmp_path / "run"
    done = train(
        run_dir,
        "checkpoint.monitor=train/loss",
        "checkpoint.every_steps=0",
        "checkpoint.keep_best=1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    train_loss = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    entries = CheckpointManager(run_dir / "checkpoints", CheckpointConfig()).entries()
    best = [e for e in entries if e.metric is not None]
    # evaluations at 10 and 20: each checkpoint's metric is the training loss of its step
    assert best and all(e.metric == train_loss[e.step] for e in best)
    status = json.loads((run_dir / "run.json").read_text())
    assert status["best/train_loss"] == min(train_loss[10], train_loss[20])


def test_compile_true_trains(tmp_path):
    done = train(
        tmp_path / "run",
        "training.compile=true",
        "training.max_steps=3",
        "training.eval_every=0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "finished" and status["config"]["training"]["compile"] == "true"
    # The compiled model's checkpoint evaluates (the long runs of the other tests, which
    # compile=auto would compile, set compile=false).
    code, stderr = call_main(gptexp.eval.main, f"run={tmp_path / 'run'}", "samples=0")
    assert code == 0, stderr
    assert math.isfinite(json.loads((tmp_path / "run" / "eval" / "last.json").read_text())["loss"])


def test_progress_lines_go_to_the_log_file_only_under_a_bar(tmp_path):
    """On a terminal the bar is shown and the plain step lines go to train.log alone."""
    run_dir = tmp_path / "run"
    leader, follower = pty.openpty()
    # A terminal of 30 x 120 characters (a new pty has none, and tqdm would draw nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = start(
        run_dir,
        "training.max_steps=4",
        "training.eval_every=0",
        cwd=tmp_path,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    screen = bytearray()

    def closed() -> bool:  # reads what the child wrote; True once it closed the terminal
        while select.select([leader], [], [], 0)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: no process holds the terminal any more
                return True
            if not chunk:
                return True
            screen.extend(chunk)
        return False

    wait_until(closed, timeout=180, what="the run closing its terminal")
    assert proc.wait(timeout=120) == 0, screen.decode(errors="replace")[-3000:]
    os.close(leader)
    text = screen.decode(errors="replace")
    assert re.search(r"\r100%\|[█#]+\| 4/4 \[[^\]]*step", text), text[-3000:]  # tqdm's full bar
    assert "step 4/4 | loss" not in text  # the plain line is not on the screen ...
    assert "step 4/4 | loss" in (run_dir / "train.log").read_text()  # ... but in the log


def test_load_export_refuses_an_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ConfigError, match="not a gptexp export"):
        load_export(tmp_path)
