"""SLURM requeue, end to end through submitit's local executor (``hydra/launcher=slurm_local``):
the pre-timeout signal (SIGUSR1) makes a running job save, stop and requeue itself; the
requeued job resumes in the same run directory and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import FAST, read_metrics, subprocess_env, wait_until

pytestmark = pytest.mark.slow


def test_sigusr1_checkpoints_stops_and_requeues_the_job_into_its_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = subprocess_env()
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)  # gptexp's own choice applies: SIGUSR1
    launch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptexp.train",
            "-m",
            "hydra/launcher=slurm_local",
            *FAST,
            "training.max_steps=300",
            "training.eval_every=0",
            "checkpoint.every_steps=0",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = sweep_dir / "0"
    try:
        wait_until(lambda: len(read_metrics(run)) >= 5, process=launch, what="the job's 5th step")
        job_pid = json.loads((run / "run.json").read_text())["pid"]
        os.kill(job_pid, signal.SIGUSR1)  # what SLURM sends before the time limit
        out, err = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait(timeout=30)
    assert launch.returncode == 0, err[-3000:]

    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 300
    assert status["pid"] != job_pid  # the requeued job is another process
    (resume,) = status["resumes"]
    stopped_at = resume["from_step"]
    assert 5 <= stopped_at < 300 and resume["sweep_job"] == "0"
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == [
        "0",
        "multirun.yaml",
        "summary.md",
        "sweep.json",
    ]
    log = (run / "train.log").read_text()
    assert "SIGUSR1 received: stopping after this step" in log
    assert f"saved checkpoint at step {stopped_at}" in log and "requeueing this job" in log
    submitit_logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*.out"))
    assert "Requeued job" in submitit_logs
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, 301))  # each step logged once: rewound at the checkpoint
