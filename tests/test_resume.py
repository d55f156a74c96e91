"""Exact resume through the real entry points: however a run is stopped, it ends bit-identical.

Each test compares against one uninterrupted run: final parameters and optimizer state must be
bit-identical and metrics.jsonl must hold the same train/val losses with no step twice.
Threads are pinned to one (conftest), since 1 vs 2 threads give different floating point sums.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gptexp.resume
import gptexp.training.trainer
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig
from tests.conftest import (
    FAST,
    ROOT,
    call_main,
    read_metrics,
    run_module,
    subprocess_env,
    train,
    wait_until,
)

pytestmark = pytest.mark.slow

# Dropout and gradient accumulation on, so the RNG state and micro-batches are exercised.
EXACT = [
    "model.dropout=0.1",
    "training.max_steps=60",
    "training.grad_accum=2",
    "training.eval_every=20",
    "training.log_every=5",
    "checkpoint.every_steps=10",
    "checkpoint.keep_last=2",
]


CRASHING_SAVE = str(ROOT / "tests" / "crashing_save.py")
# The SIGKILL test's instant: None draws a fresh one each run; a failure names its seed, and
# setting it here repeats that instant (as a fraction of this machine's step time).
KILL_SEED: int | None = None


def start(
    run_dir: Path, *overrides: str, cwd: Path, env=None, crash: tuple[int, str] | None = None
) -> subprocess.Popen:
    """``python -m gptexp.train`` (``crash``: (step, phase), killed mid-save there)."""
    launcher = (
        [CRASHING_SAVE, str(crash[0]), crash[1], "gptexp.train"]
        if crash
        else ["-m", "gptexp.train"]
    )
    return subprocess.Popen(
        [
            sys.executable,
            *launcher,
            *FAST,
            *EXACT,
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=cwd,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def resume(
    run_dir: Path, *overrides: str, env=None, crash: tuple[int, str] | None = None
) -> subprocess.CompletedProcess:
    if crash is None:
        return run_module("gptexp.resume", f"run={run_dir}", *overrides, cwd=ROOT, env=env)
    return subprocess.run(
        [
            sys.executable,
            CRASHING_SAVE,
            str(crash[0]),
            crash[1],
            "gptexp.resume",
            f"run={run_dir}",
            *overrides,
        ],
        cwd=ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    wait_until(
        lambda: any(r["step"] >= step for r in read_metrics(run_dir)),
        timeout=timeout,
        process=proc,
        what=f"step {step}",
    )


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in read_metrics(run_dir)]


def last_checkpoint(run_dir: Path) -> dict:
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    return manager.load(manager.find("last"))


def assert_same_end_state(run_dir: Path, reference: Path) -> None:
    a, b = last_checkpoint(run_dir), last_checkpoint(reference)
    assert a["step"] == b["step"] == 60
    assert a["tokens_seen"] == b["tokens_seen"]
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), f"parameter {key} differs"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_b:
        for name, tensor in state_b[index].items():
            assert torch.equal(state_a[index][name], tensor), f"optimizer {index}.{name} differs"
    assert losses(run_dir) == losses(reference)
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == sorted(set(steps)), "metrics.jsonl holds a step twice or out of order"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("straight")
    result = train(base / "run", *EXACT, cwd=base)
    assert result.returncode == 0, result.stderr
    return base / "run"


def test_sigterm_then_make_resume_is_bit_identical(tmp_path, straight_run):
    run_dir = tmp_path / "run"
    proc = start(run_dir, cwd=tmp_path)
    wait_for_step(run_dir, 15, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "interrupted"
    assert (
        "signal"
        in CheckpointManager(run_dir / "checkpoints", CheckpointConfig()).entries()[-1].reasons
    )
    overrides_before = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    config_before = (run_dir / ".hydra" / "config.yaml").read_bytes()

    result = subprocess.run(
        ["make", "resume", f"RUN={run_dir}", f"PYTHON={sys.executable}", "INSTALLED="],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_same_end_state(run_dir, straight_run)
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == overrides_before
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished"
    assert [r["from_step"] for r in status["resumes"]] == [status["resumes"][0]["from_step"]]


def test_sigkill_at_any_instant_even_mid_save_resumes_bit_identical(tmp_path, straight_run):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"

    # 1. killed while the checkpoint of step 20 is half written
    proc = start(run_dir, cwd=tmp_path, crash=(20, "write"))
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (checkpoints / "step_0000020.pt.tmp").exists(), "the hook fired mid-write"
    assert [e.step for e in CheckpointManager(checkpoints, CheckpointConfig()).entries()] == [10]

    # 2. resumed from step 10, killed once the manifest lists step 30, before its complete
    #    temporary file is renamed into place
    result = resume(run_dir, crash=(30, "rename"))
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "resuming from step_0000010.pt" in result.stderr
    assert (checkpoints / "step_0000030.pt.tmp").exists()
    assert not (checkpoints / "step_0000030.pt").exists()
    assert 30 in [e.step for e in CheckpointManager(checkpoints, CheckpointConfig()).entries()]
    assert not (checkpoints / "step_0000020.pt.tmp").exists(), "stale temporaries are cleaned"

    # 3. resumed from step 20 (30 is missing), killed at a random instant around step 40's
    #    save (it follows step 40's line in metrics.jsonl): up to two step times after that
    #    line, a step timed on this machine over steps 35-40
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptexp.resume", f"run={run_dir}"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run_dir, 35, proc)
    at_35 = time.monotonic()
    wait_for_step(run_dir, 40, proc)
    step_time = (time.monotonic() - at_35) / 5
    seed = random.randrange(2**32) if KILL_SEED is None else KILL_SEED
    delay = random.Random(seed).uniform(0.0, 2 * step_time)
    time.sleep(delay)
    proc.kill()
    _, stderr = proc.communicate(timeout=60)
    instant = f"killed {delay:.3f} s after step 40 (a step: {step_time:.3f} s; KILL_SEED = {seed})"
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill: {instant}\n{stderr}"
    assert "step_0000030.pt: missing; falling back" in stderr
    assert "resuming from step_0000020.pt" in stderr

    # 4. resumed to the end
    result = resume(run_dir)
    assert result.returncode == 0, f"{instant}\n{result.stderr}"
    resumed_from = re.search(r"resuming from step_00000([34]0)\.pt", result.stderr)
    assert resumed_from, f"{instant}: not resumed from step 30 or 40\n{result.stderr}"
    try:
        assert_same_end_state(run_dir, straight_run)
    except AssertionError as error:
        raise AssertionError(f"{instant}: {error}") from error


def test_live_run_cannot_be_resumed_twice_and_second_ctrl_c_damages_nothing(tmp_path):
    run_dir = tmp_path / "run"
    # compile=false: auto would compile a run this long (seconds of waiting, nothing tested)
    proc = start(
        run_dir,
        "training.max_steps=100000",
        "training.compile=false",
        "checkpoint.every_steps=5",
        cwd=tmp_path,
    )
    wait_for_step(run_dir, 12, proc)

    code, stderr = call_main(gptexp.resume.main, f"run={run_dir}", cwd=ROOT)
    assert code == 2
    assert f"pid {proc.pid}" in stderr and "live process" in stderr

    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # the impatient second Ctrl-C aborts at once
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]  # one line, not a traceback
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    assert manager.entries(), "the periodic checkpoints are still listed"
    for entry in manager.entries():
        assert manager.verify(entry) is None, f"{entry.file} damaged"
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] in ("interrupted", "running")  # running: aborted before the write


def test_extend_a_finished_run_and_refuse_what_cannot_apply(tmp_path, straight_run):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()

    refused = [
        (["model.n_layer=3"], "model.n_layer: 2 -> 3"),
        (["data.tokenizer=bpe"], "data.tokenizer: 'char' -> 'bpe'"),
        (["model=small"], "group choices"),
        (["training.lr=-1"], "training.lr"),
    ]
    # The refusals call gptexp.resume's main() in this process; the real processes of the
    # other tests (and the extension below) cover its start as a command.
    for overrides, message in refused:
        code, stderr = call_main(gptexp.resume.main, f"run={run_dir}", *overrides, cwd=ROOT)
        assert code == 2, (overrides, stderr)
        assert message in stderr, stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before, "refusals change nothing"

    code, stderr = call_main(gptexp.resume.main, f"run={tmp_path / 'nowhere'}", cwd=ROOT)
    assert code == 2 and "no such directory" in stderr
    (tmp_path / "empty").mkdir()
    code, stderr = call_main(gptexp.resume.main, f"run={tmp_path / 'empty'}", cwd=ROOT)
    assert code == 2 and "not a gptexp run directory" in stderr

    result = resume(run_dir, "training.max_steps=70")
    assert result.returncode == 0, result.stderr
    records = read_metrics(run_dir)
    assert records[-1]["step"] == 70 and "val/loss" in records[-1]
    assert records[: len(losses(straight_run))] == read_metrics(straight_run)
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 70
    assert status["resumes"][-1]["overrides"] == ["training.max_steps=70"]
    assert status["config"]["training"]["max_steps"] == 70


def test_a_truncated_newest_checkpoint_costs_no_valid_one(tmp_path, monkeypatch):
    """keep_last=1, resumed from step 10 past a truncated step 20, stopped at step 13: the
    save of step 13 and the checkpoint resumed from both stay (the damaged 20 is neither newest
    nor kept in the manifest), and the next resume continues from 13."""
    run_dir = tmp_path / "run"
    done = train(
        run_dir,
        "training.max_steps=20",
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=2",
        "checkpoint.keep_best=0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    newest = run_dir / "checkpoints" / "step_0000020.pt"
    damaged = newest.read_bytes()[:100_000]
    newest.write_bytes(damaged)

    stop_if_requested = gptexp.training.trainer.Trainer._stop_if_requested

    def sigterm_at_step_13(self) -> None:  # as if SIGTERM arrived during step 13
        if self.state.step == 13:
            self.stop.signame = "SIGTERM"
        stop_if_requested(self)

    monkeypatch.setattr(gptexp.training.trainer.Trainer, "_stop_if_requested", sigterm_at_step_13)
    overrides = ["training.max_steps=40", "checkpoint.keep_last=1"]
    code, stderr = call_main(gptexp.resume.main, f"run={run_dir}", *overrides, cwd=ROOT)
    assert code == 130, stderr
    assert "resuming from step_0000010.pt" in stderr and "saved checkpoint at step 13" in stderr
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    assert [e.step for e in manager.entries()] == [10, 13]
    for entry in manager.entries():
        assert manager.load(entry)["step"] == entry.step
    assert (run_dir / "checkpoints" / "step_0000020.pt.damaged").read_bytes() == damaged
    assert stderr.count("kept as step_0000020.pt.damaged") == 1

    monkeypatch.undo()
    code, stderr = call_main(gptexp.resume.main, f"run={run_dir}", *overrides, cwd=ROOT)
    assert code == 0, stderr
    assert "resuming from step_0000013.pt" in stderr
    assert [e.step for e in manager.entries()] == [40]


def test_a_sigkilled_run_with_a_weight_average_resumes_with_it_bit_identical(tmp_path):
    """training.ema_decay: the average is exact state, checkpointed and resumed like the
    weights (issue 21 item 3)."""
    ema = ["training.ema_decay=0.9", "training.max_steps=30"]
    straight_dir = tmp_path / "straight"
    straight = train(straight_dir, *EXACT, *ema, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "run"
    proc = start(run_dir, *ema, cwd=tmp_path)
    wait_for_step(run_dir, 23, proc)  # past the checkpoint of step 20
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    result = resume(run_dir)
    assert result.returncode == 0, result.stderr
    assert "resuming from step_0000020.pt" in result.stderr
    a, b = last_checkpoint(run_dir), last_checkpoint(straight_dir)
    assert a["step"] == b["step"] == 30
    assert a["ema"].keys() == b["ema"].keys() == dict(b["model"]).keys() - {"lm_head.weight"}
    for name, tensor in b["ema"].items():
        assert tensor.dtype == torch.float32
        assert torch.equal(a["ema"][name], tensor), f"average of {name} differs"
        assert not torch.equal(a["model"][name], tensor)  # an average, not the weights
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), f"parameter {key} differs"
    ema_losses = [(r["step"], r.get("val/loss_ema")) for r in read_metrics(run_dir)]
    straight_losses = [(r["step"], r.get("val/loss_ema")) for r in read_metrics(straight_dir)]
    assert ema_losses == straight_losses
    assert [step for step, loss in ema_losses if loss is not None] == [0, 20, 30]
