"""Multiruns through the real CLI: failures, summaries, launchers, Optuna, resumable sweeps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

import gptexp.train
from tests.conftest import (
    FAST,
    ROOT,
    call_main,
    read_metrics,
    run_module,
    subprocess_env,
    sweep,
    wait_until,
)

# Two short jobs: what every sweep below varies.
LRS = "training.lr=1e-3,3e-4"


def summary(sweep_dir: Path) -> dict[str, dict]:
    jobs = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    return {job["run"]: job for job in jobs}


def test_failed_job_is_recorded_and_the_others_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 1e4 makes the loss NaN within a few steps; a negative max_steps fails validation.
    result = sweep(sweep_dir, "training.lr=1e-3,1e4,-1", "training.max_steps=10", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # a job failed: the command says so
    assert "2 of 3 runs did not finish" in result.stderr
    jobs = summary(sweep_dir)
    assert [jobs[name]["status"] for name in ("0", "1", "2")] == ["finished", "failed", "failed"]
    assert "NaN" in jobs["1"]["error"] and "training.lr" in jobs["2"]["error"]
    assert jobs["0"]["final/val_loss"] > 0 and jobs["0"]["step"] == 10
    assert "| 1 | failed | 10000.0 |" in (sweep_dir / "summary.md").read_text()
    assert json.loads((sweep_dir / "1" / "run.json").read_text())["status"] == "failed"


def test_killed_sweep_resumes_by_config(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "-m", "gptexp.train", "-m", *FAST, LRS, "training.max_steps=30"]
    process = subprocess.Popen(
        [*args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: any(r["step"] >= 5 for r in read_metrics(sweep_dir / "0")),
        process=process,
        what="step 5 of job 0",
    )
    process.send_signal(signal.SIGTERM)  # saves a checkpoint and stops the whole sweep
    assert process.wait(timeout=120) == 130, process.stderr.read()
    status = json.loads((sweep_dir / "0" / "run.json").read_text())
    assert status["status"] == "interrupted" and status["step"] < 30
    assert not (sweep_dir / "1").exists()

    again = run_module(
        "gptexp.train",
        "-m",
        *FAST,
        LRS,
        "training.max_steps=30",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    jobs = summary(sweep_dir)
    assert {name: job["status"] for name, job in jobs.items()} == {
        "0": "finished",
        "1": "finished",
    }
    resumed = json.loads((sweep_dir / "0" / "run.json").read_text())
    assert resumed["resumes"][0]["from_step"] == status["step"]
    steps = [r["step"] for r in read_metrics(sweep_dir / "0")]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # no step twice, none missing

    # The same sweep with its values in another order: every job finds its finished run by
    # config (not by job number) and skips it; no new directory appears.
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")}
    reordered = run_module(
        "gptexp.train",
        "-m",
        *FAST,
        "training.lr=3e-4,1e-3",
        "training.max_steps=30",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert reordered.returncode == 0, reordered.stderr
    assert reordered.stderr.count("skipped") == 2
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")} == before
    # Hydra rewrote each job's .hydra/ for the other job's config; it was put back.
    for run in ("0", "1"):
        config = OmegaConf.load(sweep_dir / run / ".hydra" / "config.yaml")
        assert (
            config.training.lr == jobs[run]["training.lr"]
            or float(jobs[run]["training.lr"]) == config.training.lr
        )


def test_new_value_in_an_old_slot_gets_its_own_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    assert (
        sweep(sweep_dir, "training.lr=1e-3", "training.max_steps=5", cwd=tmp_path).returncode == 0
    )
    result = sweep(sweep_dir, "training.lr=3e-4,1e-3", "training.max_steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = summary(sweep_dir)
    assert set(jobs) == {"0", "0-1"}  # job 0 (lr 3e-4) could not use 0: it holds lr 1e-3
    assert float(jobs["0"]["training.lr"]) == 1e-3 and float(jobs["0-1"]["training.lr"]) == 3e-4
    assert OmegaConf.load(sweep_dir / "0" / ".hydra" / "config.yaml").training.lr == 1e-3
    assert all(job["status"] == "finished" for job in jobs.values())


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, "hydra/launcher=parallel", LRS, "training.max_steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = summary(sweep_dir)
    assert [job["status"] for job in jobs.values()] == ["finished", "finished"]
    pids = {json.loads((sweep_dir / name / "run.json").read_text())["pid"] for name in jobs}
    assert len(pids) == 2


def test_submitit_local_twin_of_the_slurm_launcher(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(
        sweep_dir, "hydra/launcher=slurm_local", LRS, "training.max_steps=5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert [job["status"] for job in summary(sweep_dir).values()] == ["finished", "finished"]
    assert (sweep_dir / ".submitit").is_dir()


def test_optuna_nan_trial_fails_without_crashing_the_search(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(
        sweep_dir,
        "experiment=optuna_lr",
        "hydra/sweeper/sampler=grid",
        "training.lr=choice(0.001,10000.0)",  # the grid: one good trial, one that diverges
        "training.warmup_steps=5",
        "training.max_steps=10",
        "training.eval_every=5",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    statuses = sorted(job["status"] for job in summary(sweep_dir).values())
    assert statuses == ["failed", "finished"]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    finished = next(job for job in summary(sweep_dir).values() if job["status"] == "finished")
    assert best.best_params["training.lr"] == 0.001
    assert best.best_value == finished["final/val_loss"]


def test_launcher_configs_compose(capsys):
    # gptexp.train's main() in this process (``--cfg`` prints and launches nothing); the
    # sweeps above start it as a real process, hydra/launcher=slurm_local included.
    for launcher, target in (("slurm", "SlurmLauncher"), ("slurm_local", "LocalLauncher")):
        args = (f"hydra/launcher={launcher}", "--cfg", "hydra", "-p", "hydra.launcher")
        code, stderr = call_main(gptexp.train.main, *args, cwd=ROOT)
        out = capsys.readouterr().out
        assert code == 0, stderr
        assert target in out and "submitit_folder" in out
