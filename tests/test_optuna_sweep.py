"""gptexp's Optuna sweeper through the real CLI: pruning on checkpoints, and a study that
survives SIGKILL (experiment=optuna_lr on the nano model, a few steps, four trials)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from gptexp.observe.rundir import RunDirectory
from tests.conftest import FAST, read_metrics, run_module, subprocess_env, sweep, wait_until
from tests.test_wandb import offline_run

# Four trials of 30 steps, evaluated every 10, judged from the second trial on; the seed makes
# the proposals repeatable.
SEARCH = [
    "experiment=optuna_lr",
    "training.max_steps=30",
    "training.eval_every=10",
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.pruner_startup_trials=1",
    "hydra.sweeper.pruner_warmup_steps=0",  # the preset waits for its longest warm-up (100)
    "hydra.sweeper.sampler.seed=1",
]


def study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="optuna_lr", storage=f"sqlite:///{sweep_dir}/optuna.db")


def jobs(sweep_dir: Path) -> dict[str, dict]:
    return {job["run"]: job for job in json.loads((sweep_dir / "sweep.json").read_text())["jobs"]}


def checkpointed_steps(run_dir: Path) -> list[int]:
    """The steps whose checkpoint is listed and in place (a save lists it just before the
    rename that puts its file there)."""
    checkpoints = run_dir / "checkpoints"
    manifest = checkpoints / "manifest.json"
    if not manifest.is_file():
        return []
    entries = json.loads(manifest.read_text())["checkpoints"]
    return [entry["step"] for entry in entries if (checkpoints / entry["file"]).exists()]


def evaluations(run_dir: Path) -> dict[int, float]:
    """The run's val/loss by training step (step 0, untrained, is not reported)."""
    records = read_metrics(run_dir)
    return {r["step"]: r["val/loss"] for r in records if "val/loss" in r and r["step"]}


def test_a_pruned_search_stops_weak_trials_at_a_checkpoint(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, *SEARCH, "logger=wandb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = study(sweep_dir).trials
    assert len(trials) == 4
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 4
    rows = jobs(sweep_dir)
    for trial in trials:  # trial n trained as job n and reported every evaluation
        run_dir = sweep_dir / str(trial.number)
        assert trial.intermediate_values == evaluations(run_dir)
        assert float(rows[str(trial.number)]["training.lr"]) == trial.params["training.lr"]
        status = json.loads((run_dir / "run.json").read_text())["status"]
        assert offline_run(run_dir)["summary"]["status"] == status  # W&B says pruned too
    for trial in pruned:
        run_dir = sweep_dir / str(trial.number)
        status = json.loads((run_dir / "run.json").read_text())
        assert status["status"] == rows[str(trial.number)]["status"] == "pruned"
        assert status["step"] == trial.last_step < 30  # stopped at the evaluation that judged it
        assert read_metrics(run_dir)[-1]["step"] == trial.last_step
        assert trial.last_step in checkpointed_steps(run_dir)
        assert f"{trial.number} at step {trial.last_step}" in result.stderr
    for trial in complete:
        assert trial.value == rows[str(trial.number)]["final/val_loss"]
    assert "did not finish" not in result.stderr  # a pruned trial is a result, not a failure
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == min(t.value for t in complete)

    # compare shows the status; make resume continues a pruned run to its end like any run.
    shown = run_module("gptexp.compare", str(sweep_dir), cwd=tmp_path)
    assert shown.returncode == 0 and "pruned" in shown.stdout, shown.stderr
    weak = sweep_dir / str(pruned[0].number)
    resumed = run_module("gptexp.resume", f"run={weak}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    status = json.loads((weak / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 30
    assert status["resumes"][0]["from_step"] == pruned[0].last_step


@pytest.mark.slow
def test_a_search_killed_at_a_checkpoint_continues_where_it_stopped(tmp_path):
    # No pruning before step 15: trial 1 checkpoints at step 10 and trains on.
    search = [*SEARCH, "hydra.sweeper.pruner_warmup_steps=15"]
    reference = tmp_path / "reference"
    assert sweep(reference, *search, cwd=tmp_path).returncode == 0

    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "gptexp.train", "-m", *FAST, *search]
    command.append(f"hydra.sweep.dir={sweep_dir}")
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes every process of it
    )
    wait_until(
        lambda: checkpointed_steps(sweep_dir / "1"),
        process=process,
        what="trial 1's first checkpoint",
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = study(sweep_dir).trials
    assert [t.state.name for t in killed] == ["COMPLETE", "RUNNING"]
    finished_metrics = (sweep_dir / "0" / "metrics.jsonl").read_bytes()

    again = sweep(sweep_dir, *search, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "trial 1 was running: continuing it" in again.stderr
    trials, expected = study(sweep_dir).trials, study(reference).trials
    assert len(trials) == 4 and {t.number for t in trials} == {0, 1, 2, 3}
    # Trial 0 was not run again; trial 1 resumed from its checkpoint in its own directory
    # and reported to its own trial.
    assert (sweep_dir / "0" / "metrics.jsonl").read_bytes() == finished_metrics
    assert "resumes" not in json.loads((sweep_dir / "0" / "run.json").read_text())
    resumed = json.loads((sweep_dir / "1" / "run.json").read_text())
    assert resumed["resumes"][0]["from_step"] == 10
    assert trials[1].intermediate_values == evaluations(sweep_dir / "1")
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    # The same proposals in the same order, the same outcomes, the same best value.
    assert [t.params for t in trials] == [t.params for t in expected]
    assert [t.state for t in trials] == [t.state for t in expected]
    assert [t.intermediate_values for t in trials] == [t.intermediate_values for t in expected]
    assert study(sweep_dir).best_value == study(reference).best_value
    assert math.isfinite(study(sweep_dir).best_value)

    # A relaunch of a complete study runs nothing and says so.
    done = sweep(sweep_dir, *search, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Launching" not in done.stderr and len(study(sweep_dir).trials) == 4


def test_a_running_trial_that_a_live_process_trains_is_left_to_it(tmp_path):
    # The same search launched twice: the other launch's trial 0 is running, its run locked.
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0").mkdir(parents=True)
    other = optuna.create_study(study_name="optuna_lr", storage=f"sqlite:///{sweep_dir}/optuna.db")
    other.ask(
        {
            "training.lr": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True),
            "training.warmup_steps": optuna.distributions.CategoricalDistribution([0, 25, 50, 100]),
        }
    )
    with RunDirectory(sweep_dir / "0").lock():
        result = sweep(sweep_dir, *SEARCH, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trial 0: another process trains it" in result.stderr
    assert [t.state.name for t in study(sweep_dir).trials] == ["RUNNING", "COMPLETE"]
    assert not (sweep_dir / "0" / "run.json").exists()  # not trained here
