"""The loss-spike guard: its decisions in-process, then through the real entry points with
spikes forced from the test side (tests/spiking_launcher.py multiplies the loss of chosen
batches in the child process; the product has no hook for it)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptexp.checkpoint.format import nonfinite_tensors
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import (
    CheckpointConfig,
    GuardConfig,
    TrainConfig,
    config_to_dict,
    to_train_config,
)
from gptexp.core.errors import ConfigError, TrainingDiverged
from gptexp.observe.metrics import MetricsFile
from gptexp.observe.rundir import RunDirectory
from gptexp.run.starts import run_corpus
from gptexp.run.wandb_mirror import WandbMirror
from gptexp.training.guard import APPLY, ROLLBACK, SKIP, STOP, SpikeGuard, stop_message
from gptexp.training.runtime import Distributed
from gptexp.training.trainer import Trainer
from tests.conftest import FAST, ROOT, read_metrics, run_module, subprocess_env

SPIKING = str(ROOT / "tests" / "spiking_launcher.py")
# Spike detection from the sixth accepted loss on; checkpoints every 5 steps (FAST: 20 steps).
GUARDED = ["training.guard.warmup=5", "checkpoint.every_steps=5"]


def spiking(
    spec: str, run_dir: Path, *overrides: str, module: str = "gptexp.train", cwd: Path
) -> subprocess.CompletedProcess:
    """A FAST ``gptexp.train`` (or ``gptexp.resume``, or ``tests.crashing_save ...``) whose
    loss is multiplied on the batches of ``spec`` (``"12:100,15:nan"``)."""
    args = [f"run={run_dir}"] if module == "gptexp.resume" else [*FAST, f"hydra.run.dir={run_dir}"]
    if module.startswith("tests.crashing_save"):
        module, *crash = module.split()
        args = [*crash, "gptexp.train", *FAST, f"hydra.run.dir={run_dir}"]
    return subprocess.run(
        [sys.executable, SPIKING, spec, module, *args, *overrides],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def events(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("event") == "spike"]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def manager(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(run_dir / "checkpoints", CheckpointConfig())


# ----------------------------------------------------------------------------- in-process


def test_spikes_are_relative_to_the_average_after_warmup_or_above_atol():
    guard = SpikeGuard(GuardConfig(action="skip", rtol=4.0, warmup=3, ema_decay=0.5))
    # during warm-up only non-finite values and atol count: a 10x loss is averaged in
    assert guard.judge(1.0, 0.5) == (APPLY, None)
    assert guard.judge(10.0, 0.5) == (APPLY, None)
    assert guard.judge(float("nan"), 0.5) == (SKIP, "nonfinite")
    assert guard.judge(1.0, float("inf")) == (SKIP, "nonfinite")
    assert guard.judge(3.5, 0.5) == (APPLY, None)  # average (1 -> 5.5 -> 4.5)
    assert guard.average == pytest.approx(4.5) and guard.accepted == 3
    assert guard.judge(18.1, 0.5) == (SKIP, "rtol")  # > 4 x 4.5
    assert guard.average == pytest.approx(4.5), "a rejected loss never joins the average"
    assert guard.judge(17.9, 0.5) == (APPLY, None)
    with_atol = SpikeGuard(GuardConfig(action="skip", atol=8.0, warmup=100))
    assert with_atol.judge(9.0, 0.5) == (SKIP, "atol")
    assert with_atol.judge(7.0, 0.5) == (APPLY, None)


def test_action_off_looks_for_no_spike_and_stops_on_a_nonfinite_update():
    guard = SpikeGuard(GuardConfig(warmup=0))
    assert GuardConfig().action == "off"
    assert guard.judge(1.0, 0.5) == (APPLY, None)
    assert guard.judge(1000.0, 0.5) == (APPLY, None)
    assert guard.judge(float("nan"), 0.5) == (STOP, "nonfinite")


def test_skips_and_rollbacks_are_bounded():
    guard = SpikeGuard(GuardConfig(action="skip", atol=5.0, max_skips=2))
    for _ in range(2):
        action, _ = guard.judge(9.0, 0.5)
        assert action == SKIP
        guard.record({"step": 1, "action": action})
    assert guard.judge(9.0, 0.5)[0] == STOP
    guard.judge(1.0, 0.5)  # an applied update ends the row
    assert guard.judge(9.0, 0.5)[0] == SKIP

    guard = SpikeGuard(GuardConfig(action="rollback", atol=5.0, max_rollbacks=1, max_skips=1))
    assert guard.judge(9.0, 0.5)[0] == ROLLBACK
    guard.record({"step": 3, "action": ROLLBACK, "to_step": 2})
    assert guard.judge(9.0, 0.5)[0] == STOP
    assert guard.without_checkpoint() == SKIP  # no checkpoint to roll back to: skip instead
    assert [e["n"] for e in guard.events] == [1]


def test_the_stop_message_names_the_steps_and_what_is_left():
    guard = SpikeGuard(GuardConfig(action="skip", atol=5.0, max_skips=2))
    for step in (1, 2, 3):  # no loss was ever accepted: there is no average yet
        action, cause = guard.judge(9.0, 0.5)
        event = guard.record(
            {
                "step": step,
                "batch": step - 1,
                "loss": 9.0,
                "grad_norm": 0.5,
                "average": guard.average,
                "cause": cause,
                "action": action,
            }
        )
    assert action == STOP
    message = stop_message(guard, event, None)
    assert "loss spike (training.guard.atol=5.0): train/loss 9, moving average none yet" in message
    assert (
        "training.guard.max_skips=2 updates in a row were skipped already (steps 1, 2)" in message
    )
    assert message.endswith("no checkpoint was written")


def test_skip_list_merges_ranges_and_next_batch_steps_over_them():
    guard = SpikeGuard(GuardConfig())
    guard.skip_batches(5, 5)
    guard.skip_batches(10, 12)
    guard.skip_batches(6, 8)
    assert guard.skipped == [[5, 8], [10, 12]]
    guard.skip_batches(9, 9)
    assert guard.skipped == [[5, 12]]
    assert [guard.next_batch(i) for i in (0, 4, 5, 9, 12, 13)] == [0, 4, 13, 13, 13, 13]


def test_guard_state_is_plain_data_and_restores_the_same_decisions(tmp_path):
    cfg = GuardConfig(action="skip", warmup=2, max_skips=3)
    guard = SpikeGuard(cfg)
    for loss in (2.0, 1.9, 1.8):
        guard.judge(loss, 0.1)
    guard.record({"step": 4, "batch": 3, "loss": float("nan"), "action": SKIP})
    guard.skip_batches(3, 3)
    torch.save({"guard": guard.state_dict()}, tmp_path / "state.pt")
    restored = SpikeGuard(cfg)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["guard"])
    assert restored.report() == guard.report() and restored.average == guard.average
    for loss in (1.7, 30.0, 1.6, float("inf")):
        assert restored.judge(loss, 0.1) == guard.judge(loss, 0.1)
    report = restored.report()
    assert report["events"][0]["loss"] is None  # run.json is strict JSON: no NaN
    json.dumps(report, allow_nan=False)


def test_guard_config_is_validated_and_old_configs_get_the_defaults():
    for key, value in [
        ("action", "maybe"),
        ("rtol", 1.0),
        ("atol", -1.0),
        ("warmup", -1),
        ("ema_decay", 1.0),
        ("max_rollbacks", -1),
        ("max_skips", 0),
    ]:
        with pytest.raises(ConfigError, match=f"training.guard.{key}"):
            to_train_config({"training": {"guard": {key: value}}})
    with pytest.raises(ConfigError, match="training.guard.nope"):
        to_train_config({"training": {"guard": {"nope": 1}}})
    with pytest.raises(ConfigError, match="training.guard.action='rollback': needs checkpoints"):
        to_train_config(
            {"training": {"guard": {"action": "rollback"}}, "checkpoint": {"enabled": False}}
        )
    stored = config_to_dict(TrainConfig())
    del stored["training"]["guard"]  # a run from before the guard
    assert to_train_config(stored).training.guard == GuardConfig()


def test_a_run_from_before_the_guard_resumes_with_its_batches_in_order(finished_run, tmp_path):
    state = manager(finished_run).load(manager(finished_run).find("last"))
    del state["guard"], state["data_step"], state["config"]["training"]["guard"]
    cfg = to_train_config(state["config"])
    corpus = run_corpus(cfg, RunDirectory(finished_run), state)
    trainer = Trainer(cfg, RunDirectory(tmp_path), Distributed(), corpus, resume_state=state)
    assert trainer.state.data_step == trainer.state.step == 20  # the next update trains on batch 20
    assert trainer.state.guard.state_dict() == SpikeGuard(GuardConfig()).state_dict()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_checkpoint_with_a_nonfinite_tensor_is_never_written(tmp_path, asynchronous):
    checkpoints = CheckpointManager(tmp_path, CheckpointConfig())
    # finite, though its sum overflows (the check's fast path must not refuse it)
    big = torch.full((4,), 3e38)
    good = {"model": {"w": torch.ones(3), "big": big}, "step": 5, "rng": [torch.zeros(4)]}
    checkpoints.save(good, 5, None, ["periodic"], asynchronous=asynchronous)
    checkpoints.wait()
    bad = {
        "model": {"w": torch.tensor([1.0, float("nan"), 2.0])},
        "optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([float("inf")])}}},
        "step": 10,
    }
    assert nonfinite_tensors(bad) == ["model.w", "optimizer.state.0.exp_avg_sq"]
    with pytest.raises(TrainingDiverged, match="step_0000005.pt is the last valid one"):
        checkpoints.save(bad, 10, None, ["periodic"], asynchronous=asynchronous)
        checkpoints.wait()  # an asynchronous save's refusal surfaces here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "step_0000005.pt"]
    entry, state = checkpoints.load_latest_valid()
    assert entry.step == 5 and torch.equal(state["model"]["w"], torch.ones(3))


def test_rewinding_metrics_keeps_the_guard_events_the_checkpoint_knows(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for record in [
        {"step": 10, "train/loss": 2.0},
        {"step": 14, "event": "spike", "n": 1, "action": "rollback", "to_step": 10},
        {"step": 11, "train/loss": 1.9},
        {"step": 12, "train/loss": 1.8},
        {"step": 13, "event": "spike", "n": 2, "action": "skip"},
        {"step": 13, "train/loss": 1.7},
    ]:
        metrics.log(record)
    assert metrics.rewind(11, events=1) == 3
    metrics.log({"step": 12, "train/loss": 1.8})  # appends go to the rewritten file
    metrics.close()
    assert [(r["step"], r.get("n")) for r in read_metrics(tmp_path)] == [
        (10, None),
        (14, 1),
        (11, None),
        (12, None),
    ]


def test_wandb_mirror_raises_an_alert_for_a_guard_event():
    class FakeRun:
        def __init__(self):
            self.alerts, self.logged = [], []

        def alert(self, title, text):
            self.alerts.append((title, text))

        def log(self, values, step):
            self.logged.append(step)

    mirror = WandbMirror.__new__(WandbMirror)  # the mirror's calls, without a W&B process
    mirror.run, mirror.failed, mirror._errors = FakeRun(), False, (OSError,)
    mirror.log({"step": 14, "event": "spike", "loss": 300.0, "average": 3.0, "action": "skip"})
    mirror.log({"step": 14, "train/loss": 3.1})
    assert mirror.run.alerts == [
        ("gptexp: spike at step 14", "step 14, loss 300.0, average 3.0, action skip")
    ]
    assert mirror.run.logged == [14]


# ----------------------------------------------------------------------------- real runs


def test_spikes_and_nonfinite_updates_are_skipped_and_training_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    result = spiking("12:100,15:nan", run_dir, "training.guard.action=skip", *GUARDED, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "loss spike at step 13" in result.stderr and "non-finite update at step 15" in result.stderr
    )
    spike, nonfinite = events(run_dir)
    assert spike["step"] == 13 and spike["batch"] == 12 and spike["action"] == "skip"
    assert spike["cause"] == "rtol" and spike["loss"] > 4 * spike["average"] > 0
    assert nonfinite["step"] == 15 and nonfinite["batch"] == 15  # step 13 trained on batch 13
    assert nonfinite["cause"] == "nonfinite" and nonfinite["loss"] is None
    trained = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in trained] == list(range(1, 21)), "every step is trained once"
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] < 10 for r in trained)
    guard = status(run_dir)["guard"]
    assert guard["skipped_batches"] == [[12, 12], [15, 15]] and len(guard["events"]) == 2
    last = manager(run_dir).load(manager(run_dir).find("last"))
    assert last["step"] == 20 and last["data_step"] == 22
    assert last["tokens_seen"] == 20 * trained[0]["tokens"]  # skipped updates add none
    assert last["guard"]["skipped"] == [[12, 12], [15, 15]]


def test_a_nonfinite_loss_with_the_guard_off_fails_the_run_and_keeps_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = spiking("7:nan", run_dir, *GUARDED, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "NaN or inf" in result.stderr and "at step 8 (batch 7)" in result.stderr
    assert "the last valid checkpoint is step 5" in result.stderr
    assert status(run_dir)["status"] == "failed"
    assert status(run_dir)["guard"]["events"][0]["action"] == "stop"
    (stop,) = events(run_dir)
    assert stop["step"] == 8 and stop["action"] == "stop"
    entry, state = manager(run_dir).load_latest_valid()
    assert entry.step == 5 and nonfinite_tensors(state) == []


@pytest.mark.slow
def test_rollback_continues_and_a_resume_after_it_is_bit_identical(tmp_path):
    # With a weight average, which must come through the rollback and the resume exactly too.
    guard = ["training.guard.action=rollback", "training.ema_decay=0.9", *GUARDED]
    straight = tmp_path / "straight"
    result = spiking("13:100", straight, *guard, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rolled back to checkpoint step_0000010.pt; batches 10..13 are skipped" in result.stderr
    (event,) = events(straight)
    assert (event["step"], event["batch"], event["to_step"]) == (14, 13, 10)
    assert status(straight)["guard"]["skipped_batches"] == [[10, 13]]

    # The same run killed in the middle of writing its last checkpoint (step 20), resumed from
    # step 15, written after the rollback: it must not roll back again, nor lose the event.
    run_dir = tmp_path / "killed"
    result = spiking("13:100", run_dir, *guard, module="tests.crashing_save 20 write", cwd=tmp_path)
    assert result.returncode == -signal.SIGKILL, result.stderr
    result = spiking("13:100", run_dir, module="gptexp.resume", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "resuming from step_0000015.pt" in result.stderr and "rolled back" not in result.stderr

    a, b = (manager(d).load(manager(d).find("last")) for d in (run_dir, straight))
    assert a["step"] == b["step"] == 20 and a["guard"] == b["guard"]
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), f"parameter {key} differs"
    for index, state in b["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(a["optimizer"]["state"][index][name], tensor)
    for name, tensor in b["ema"].items():
        assert torch.equal(a["ema"][name], tensor), f"average of {name} differs"

    def logged(d: Path) -> list[tuple]:
        return [(r["step"], r.get("event"), r.get("train/loss")) for r in read_metrics(d)]

    assert logged(run_dir) == logged(straight)


def test_a_hopeless_run_stops_after_max_rollbacks_with_a_valid_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_module(
        "gptexp.train",
        *FAST,
        "training.lr=100",
        "training.guard.action=rollback",
        "training.guard.max_rollbacks=2",
        "checkpoint.every_steps=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "training.guard.max_rollbacks=2 rollbacks are spent" in result.stderr
    recorded = status(run_dir)
    assert recorded["status"] == "failed" and recorded["guard"]["rollbacks"] == 2
    actions = [e["action"] for e in recorded["guard"]["events"]]
    assert actions == ["rollback", "rollback", "stop"]
    rollbacks = recorded["guard"]["events"][:2]
    for event in rollbacks:  # the message names the steps
        assert f"{event['step']}->{event['to_step']}" in result.stderr
    entry, state = manager(run_dir).load_latest_valid()
    assert entry.step >= rollbacks[-1]["to_step"] and nonfinite_tensors(state) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_guard_skips_on_cuda_with_mixed_precision(tmp_path, precision):
    # fp16: the GradScaler keeps handling overflowing gradients itself; a rejected update
    # must close its iteration so the next unscale_ works.
    run_dir = tmp_path / "run"
    overrides = ["training.device=cuda", f"training.precision={precision}"]
    result = spiking(
        "12:100,15:nan", run_dir, "training.guard.action=skip", *GUARDED, *overrides, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert [(e["step"], e["action"]) for e in events(run_dir)] == [(13, "skip"), (15, "skip")]
    assert status(run_dir)["status"] == "finished"
