"""What a new user hit (issue 13): each bug through the real entry points."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gptexp.eval
import gptexp.resume
import gptexp.train
from gptexp.core.errors import ConfigError
from gptexp.observe.rundir import RunDirectory
from gptexp.observe.runtable import distinguishing_keys, label, run_rows
from tests.conftest import (
    FAST,
    ROOT,
    call_main,
    compose_config,
    files_of,
    run_module,
    subprocess_env,
    train,
)

CORPUS = "The quick brown fox jumps over the lazy dog.\n" * 200


# ----------------------------------------------------------------------------- 1: data.path


def test_data_path_does_not_apply_to_pydocs(tmp_path):
    with pytest.raises(ConfigError, match="data=text data.path=") as caught:
        compose_config(["data.path=my_corpus.txt"])
    assert "does not apply to data=pydocs" in str(caught.value)
    code, stderr = call_main(
        gptexp.train.main, *FAST, "data.path=my_corpus.txt", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 2 and "data=text data.path=" in stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 2: moved corpus


@pytest.mark.slow
def test_a_relative_corpus_path_is_stored_absolute_and_a_moved_corpus_resumes(tmp_path):
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "my_corpus.txt").write_text(CORPUS)
    run_dir = tmp_path / "run"
    done = train(
        run_dir, "data=text", "data.path=my_corpus.txt", "training.max_steps=6", cwd=launch
    )
    assert done.returncode == 0, done.stderr
    stored = json.loads((run_dir / "run.json").read_text())["config"]["data"]["path"]
    assert stored == str(launch / "my_corpus.txt")
    assert "data.path=my_corpus.txt" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    # eval from anywhere else finds it
    assert call_main(gptexp.eval.main, f"run={run_dir}", "samples=0", cwd=ROOT)[0] == 0

    moved = tmp_path / "moved.txt"
    shutil.move(launch / "my_corpus.txt", moved)
    code, stderr = call_main(
        gptexp.resume.main, f"run={run_dir}", "training.max_steps=8", cwd=tmp_path
    )
    assert code == 2 and "no such file" in stderr
    changed = tmp_path / "changed.txt"
    changed.write_text(CORPUS.upper())
    code, stderr = call_main(
        gptexp.resume.main,
        f"run={run_dir}",
        f"data.path={changed}",
        "training.max_steps=8",
        cwd=tmp_path,
    )
    assert code == 2 and "differs from the one this run was trained on" in stderr
    resumed = run_module(
        "gptexp.resume",
        f"run={run_dir}",
        f"data.path={moved}",
        "training.max_steps=8",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    status = json.loads((run_dir / "run.json").read_text())
    assert status["step"] == 8 and status["config"]["data"]["path"] == str(moved)


# ----------------------------------------------------------------------------- 3 and 4


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Run a (lr 1e-3, 6 steps, later extended to 10) and run b (lr 3e-4, 6 steps).

    a and b train at the same time, to keep the set-up short."""
    base = tmp_path_factory.mktemp("two_runs")
    a, b = base / "runs" / "a", base / "runs" / "b"
    launched = [
        subprocess.Popen(
            [sys.executable, "-m", "gptexp.train", *FAST, f"training.lr={lr}"]
            + ["training.max_steps=6", f"hydra.run.dir={run_dir}"],
            cwd=base,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_dir, lr in ((a, "1e-3"), (b, "3e-4"))
    ]
    for process in launched:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    done = run_module("gptexp.resume", f"run={a}", "training.max_steps=10", cwd=base)
    assert done.returncode == 0, done.stderr
    return a, b


@pytest.mark.slow
def test_compare_shows_what_the_run_became(two_runs, tmp_path):
    a, b = two_runs
    done = run_module("gptexp.compare", str(a), str(b), "--plot", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    header, _, *lines = done.stdout.splitlines()
    columns = header.split()
    rows = {line.split()[0]: line.split() for line in lines}
    assert "training.max_steps" in columns and "training.lr" in columns
    at = columns.index("training.max_steps")
    assert rows["a"][at] == "10" and rows["b"][at] == "6"  # not the 6 typed at launch
    assert rows["a"][columns.index("step")] == "10/10"
    # the plot lands next to the runs, and the command says where
    png = a.parent / "losses.png"
    assert png.read_bytes().startswith(b"\x89PNG") and f"plot: {png}" in done.stderr
    assert not (tmp_path / "losses.png").exists()
    rows = run_rows([RunDirectory(a), RunDirectory(b)])
    keys = distinguishing_keys(rows)
    labels = [label(row, keys) for row in rows]
    assert labels == [
        "training.lr=0.001 training.max_steps=10",
        "training.lr=0.0003 training.max_steps=6",
    ]


@pytest.mark.slow
def test_resuming_a_finished_run_touches_nothing(two_runs, tmp_path):
    a, _ = two_runs
    before = files_of(a)
    done = run_module("gptexp.resume", f"run={a}", cwd=tmp_path)
    assert done.returncode == 0
    assert f"already finished at step 10; extend it with make resume RUN={a}" in done.stderr
    assert files_of(a) == before
    status = json.loads((a / "run.json").read_text())
    launched = [*FAST, "training.lr=1e-3", "training.max_steps=6", f"hydra.run.dir={a}"]
    assert status["argv"][1:] == launched  # the command that made the run, not a resume's
    assert Path(status["argv"][0]).parts[-2:] == ("gptexp", "train.py")
    (resume,) = status["resumes"]  # the one real resume, with its own command line
    assert "training.max_steps=10" in resume["argv"]


# ----------------------------------------------------------------------------- 5: status


def test_one_status_everywhere(finished_run, tmp_path, capsys):
    crashed = tmp_path / "crashed"
    shutil.copytree(finished_run, crashed, ignore=shutil.ignore_patterns("eval", "export"))
    status = json.loads((crashed / "run.json").read_text())
    (crashed / "run.json").write_text(json.dumps(status | {"status": "running"}))  # SIGKILLed
    code, stderr = call_main(gptexp.eval.main, f"run={crashed}", "samples=0", cwd=tmp_path)
    assert code == 0, stderr
    assert f"{crashed} (crashed)" in capsys.readouterr().out
    assert json.loads((crashed / "eval" / "last.json").read_text())["status"] == "crashed"
    table = run_module("gptexp.compare", str(crashed), cwd=tmp_path).stdout
    assert table.splitlines()[2].split()[1] == "crashed"


# ----------------------------------------------------------------------------- 6: sweeps

JOBS = ["training.lr=1e-3,2e-3,3e-3", "training.max_steps=6"]


def sweep_command(sweep_dir: Path) -> list[str]:
    return ["gptexp.train", "-m", *FAST, *JOBS, f"hydra.sweep.dir={sweep_dir}"]


@pytest.mark.slow
def test_a_sweep_killed_during_job_start_up_finishes_in_its_own_directories(tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = str(ROOT / "tests" / "killing_launcher.py")
    for where, job in (("before-claim", "0"), ("before-training", "1"), ("before-claim", "2")):
        killed = subprocess.run(
            [sys.executable, launcher, where, job, *sweep_command(sweep_dir)],
            cwd=tmp_path,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = run_module(*sweep_command(sweep_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()) == [
        "0",
        "1",
        "2",
    ]
    for job in ("0", "1", "2"):
        status = json.loads((sweep_dir / job / "run.json").read_text())
        assert status["status"] == "finished" and status["step"] == 6


@pytest.mark.slow
def test_the_same_sweep_launched_twice_at_once_trains_each_job_once(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", *sweep_command(sweep_dir)]
    first, second = (
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    )
    for process in (first, second):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    names = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert names == ["0", "1", "2"]  # no 0-1/, 1-1/: nothing trained twice
    for job in names:
        status = json.loads((sweep_dir / job / "run.json").read_text())
        assert status["status"] == "finished" and "resumes" not in status


# ----------------------------------------------------------------------------- 7: W&B offline


def test_wandb_credentials_without_a_route_fall_back_to_offline(tmp_path):
    env = subprocess_env(WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    env.pop("WANDB_MODE", None)
    done = train(tmp_path / "run", "logger=wandb", "training.max_steps=4", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "finished" and status["wandb_mode"] == "offline"
    assert "W&B: the server cannot be reached" in done.stderr


def test_a_mirror_that_fails_mid_run_is_switched_off(tmp_path, monkeypatch, caplog):
    import wandb

    from gptexp.core.config import LoggerConfig
    from gptexp.run.wandb_mirror import WandbMirror

    mirror = WandbMirror(
        LoggerConfig(wandb=True, mode="offline"), tmp_path, "abc123", {}, "n", None
    )

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setattr(mirror.run, "log", refuse)
    mirror.log({"step": 1, "train/loss": 1.0})  # does not raise
    mirror.log({"step": 2, "train/loss": 1.0})
    assert mirror.failed
    assert [r.message for r in caplog.records].count(
        "W&B mirror stopped (network is unreachable); metrics.jsonl goes on"
    ) == 1
    monkeypatch.undo()
    mirror.run.finish()
