"""No host read of a tensor in a step that neither logs, evaluates, samples nor saves, and the
spike guard decided on the device (issue 20): reads are counted from the test side
(tests/host_reads.py patches torch.Tensor's read methods and counts the calls made from
gptexp's files), spikes are forced from the test side too."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import gptexp.training.trainer as trainer_module
from gptexp.core.config import GuardConfig
from gptexp.core.errors import TrainingDiverged, TrainingInterrupted
from gptexp.data.batches import sample_batch
from gptexp.training.device_guard import DeviceGuard, masked_step
from gptexp.training.guard import APPLY, SKIP, STOP, SpikeGuard
from gptexp.training.optim import AdamW, lr_factor
from gptexp.training.scoring import evaluate_loss
from tests import spiking_launcher
from tests.conftest import (
    FAST,
    ROOT,
    compose_config,
    make_trainer,
    read_metrics,
    subprocess_env,
)
from tests.host_reads import ReadCounter
from tests.test_guard import events, manager, spiking, status

# Logs every 5 steps, evaluates (and saves the best) every 10, the last checkpoint at 20: the
# trainer reads back after steps 5, 10, 15 and 20 only.
WINDOWED = ["training.log_every=5", "training.eval_every=10"]
SYNC_STEPS = [5, 10, 15, 20]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def counted_fit(tmp_path, monkeypatch, *overrides: str):
    """A FAST run in this process, windowed, with its host reads counted."""
    cfg = compose_config([*FAST, *WINDOWED, *overrides])
    (tmp_path / "run").mkdir()
    trainer = make_trainer(cfg, tmp_path / "run")
    counter = ReadCounter()
    counter.install(monkeypatch.setattr)
    trainer.fit()
    return counter, trainer


def force_losses(monkeypatch, factors: dict[int, float]) -> None:
    """Multiply the training loss of the batches of index ``factors`` in this process."""
    spiking_launcher.install(factors, monkeypatch.setattr)


class Records:
    """A metrics sink that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(dict(record))


def test_a_forced_spike_hits_every_micro_batch_of_its_update_and_no_evaluation(
    tmp_path, monkeypatch, one_thread
):
    """The test side's spike (force_losses, tests/spiking_launcher.py) on batch 10, the update
    after step 10's evaluation: the trainer builds that batch ahead, before the evaluation,
    and both micro-batches at once; the factor still lands on both micro-batches of update 11
    and on nothing the evaluation computes."""
    overrides = [*FAST, "training.grad_accum=2", "training.max_steps=11"]
    logged = {}
    for name, factors in (("plain", {}), ("forced", {10: 100.0})):
        if factors:
            force_losses(monkeypatch, factors)
        (tmp_path / name).mkdir()
        sink = Records()
        make_trainer(compose_config(overrides), tmp_path / name, sinks=[sink]).fit()
        logged[name] = {r["step"]: r for r in sink.records}
    assert logged["forced"][10]["val/loss"] == logged["plain"][10]["val/loss"]
    assert logged["forced"][11]["train/loss"] == pytest.approx(
        100 * logged["plain"][11]["train/loss"], rel=1e-5
    )


# ----------------------------------------------------------------------------- host reads


@pytest.mark.parametrize(
    ("action", "grad_accum", "precision"),
    [("off", 1, "fp32"), ("skip", 1, "fp32"), ("off", 2, "fp32"), ("skip", 2, "fp32")]
    + [("skip", 2, "bf16")],  # (fp16 needs CUDA: its GradScaler path is tested below)
)
def test_an_unlogged_step_reads_nothing_back(
    tmp_path, monkeypatch, one_thread, action, grad_accum, precision
):
    overrides = [f"training.guard.action={action}", f"training.grad_accum={grad_accum}"]
    overrides.append(f"training.precision={precision}")
    counter, trainer = counted_fit(tmp_path, monkeypatch, *overrides)
    assert counter.attempts == 20 and trainer.state.step == 20
    assert counter.synced == SYNC_STEPS
    assert counter.unsynced_reads() == []
    # A sync step reads its window back once (the rest: logging, evaluation, the checkpoint).
    for step in SYNC_STEPS:
        drains = [
            r
            for r in counter.reads_after(step)
            if r["where"].startswith("training/trainer.py") and r["method"] == "tolist"
        ]
        assert len(drains) == 1, counter.reads_after(step)


def test_an_evaluation_reads_its_losses_back_once(tmp_path, monkeypatch):
    cfg = compose_config(FAST)
    (tmp_path / "run").mkdir()
    trainer = make_trainer(cfg, tmp_path / "run")
    counter = ReadCounter()
    counter.install(monkeypatch.setattr)
    model, tokens, block_size = trainer.model, trainer.corpus.val, cfg.model.block_size
    loss = evaluate_loss(
        model, tokens, block_size=block_size, batch_size=2, seed=0, split="val", batches=3,
        device=trainer.device,
    )  # fmt: skip
    assert [r["method"] for r in counter.reads] == ["tolist"]
    # the same number as a read per batch, summed in batch order
    batches = [sample_batch(tokens, block_size, 2, seed=0, split="val", step=i) for i in range(3)]
    model.eval()
    with torch.no_grad():
        each = [model(x, y)[1].item() for x, y in batches]
    assert loss == sum(each) / 3


# ----------------------------------------------------------------------------- the guard


def test_the_device_guard_decides_as_the_host_guard_bit_for_bit():
    nan, inf = math.nan, math.inf
    losses = [3.0, 2.9, 30.0, 2.8, nan, 2.7, 2.75, 11.5, 12.0, 13.0, 14.0, 2.6, 9.5, 2.5, inf]
    norms = [0.5, 0.4, 0.6, 0.5, 0.5, inf, 0.3, 0.2, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1]
    for cfg in (
        GuardConfig(action="skip", warmup=2, ema_decay=0.7, max_skips=3),
        GuardConfig(action="skip", warmup=0, atol=10.0, max_skips=1),
        GuardConfig(action="off", warmup=0),
    ):
        host, device = SpikeGuard(cfg), DeviceGuard(cfg, torch.device("cpu"))
        device.load(host, epoch=7)
        for n, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
            masked, _ = device.judge(
                torch.tensor(loss, dtype=torch.float64),
                torch.tensor(norm, dtype=torch.float64),
                False,
            )
            action, cause = host.judge(loss, norm)
            if action == SKIP:
                host.record({"action": SKIP})
            assert bool(masked) == (action != APPLY), (cfg, n)
            if action == STOP:
                assert bool(device.halted) and cfg.action in ("off", "skip")
                break
            assert not bool(device.halted)
            assert bool(device.has_average) == (host.average is not None)
            if host.average is not None:
                assert device.average.item() == host.average  # bit for bit
            assert int(device.accepted) == host.accepted
            assert int(device.skips_in_a_row) == host.skips_in_a_row
        else:
            pytest.fail(f"{cfg} never stopped")
        assert int(device.epoch) == 7 + host.accepted
        # once halted, nothing changes and every later update is masked
        before = (device.average.item(), int(device.accepted), int(device.epoch))
        masked, _ = device.judge(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.1), False)
        assert bool(masked) and before == (
            device.average.item(),
            int(device.accepted),
            int(device.epoch),
        )


def test_skip_masks_on_the_device_and_the_host_records_the_exact_steps(
    tmp_path, monkeypatch, one_thread
):
    # batch 7 NaN (the update of step 8), batch 12 a spike (step 12: one skip before it),
    # both inside windows that are read back only at steps 10 and 15
    force_losses(monkeypatch, {7: math.nan, 12: 100.0})
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    unchanged: list[bool] = []
    step, original = trainer_module.Trainer.train_step, trainer_module.masked_step

    def keep(trainer):
        seen.append(step(trainer))
        return seen[-1]

    def watched(optimizer, scaler, masked, lrs):
        before = [p.detach().clone() for p in optimizer_tensors(optimizer)]
        original(optimizer, scaler, masked, lrs)
        after = optimizer_tensors(optimizer)
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))

    monkeypatch.setattr(trainer_module.Trainer, "train_step", keep)
    monkeypatch.setattr(trainer_module, "masked_step", watched)
    guard = ["training.guard.action=skip", "training.guard.warmup=5"]
    counter, trainer = counted_fit(tmp_path, monkeypatch, *guard)
    assert counter.unsynced_reads() == []
    assert counter.attempts == 22 and trainer.state.step == 20 and trainer.state.data_step == 22
    # The host counts every attempt as applied and reads back where its count is due: after
    # attempts 5, 10 (truly step 9: read again at the next), 11, 16 (truly 14), 17, 22.
    assert counter.synced == [5, 10, 11, 16, 17, 22]
    recorded = [(e["step"], e["batch"], e["cause"]) for e in trainer.state.guard.events]
    assert recorded == [(8, 7, "nonfinite"), (12, 12, "rtol")]
    assert trainer.state.guard.skipped == [[7, 7], [12, 12]]
    # The masked updates changed no parameter, moment or step count; every other one did.
    assert [n for n, same in enumerate(unchanged, start=1) if same] == [8, 13]
    assert trainer.scheduler.last_epoch == 20
    # The pure-Python guard on the same losses makes the same decisions.
    replay = SpikeGuard(trainer.cfg.training.guard)
    for n, (loss, norm) in enumerate(seen, start=1):
        action, cause = replay.judge(float(loss), float(norm))
        if action == SKIP:
            replay.record({"action": SKIP})
        assert (action == SKIP) == (n in (8, 13)), n
    assert replay.average == trainer.state.guard.average
    assert replay.accepted == trainer.state.guard.accepted == 20


def flat(value, key: str = ""):
    """(dotted key, leaf) of every value in nested dicts and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flat(v, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from flat(v, f"{key}[{i}]")
    else:
        yield key, value


def same_leaf(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b or (a != a and b != b)  # NaN (an event's loss) equals NaN here


def test_a_windowed_run_logs_and_saves_what_a_run_that_reads_every_step_does(
    tmp_path, monkeypatch, one_thread
):
    """Skips where the windows make it hardest, read back every 5 steps and every step: a skip
    on the update of a logged and saved step (batch 4, step 5), three in one window (batches
    6..8, the update of step 6), one on the attempt at the last step (batch 23, step 20).
    The records the sinks get (with the events, in order), every checkpoint, the weights and
    their average are the same numbers; the time taken aside."""
    force_losses(monkeypatch, {4: math.nan, 6: math.nan, 7: 100.0, 8: math.inf, 23: math.nan})
    common = ["training.guard.action=skip", "training.guard.warmup=5", "training.ema_decay=0.9"]
    common += [
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=4",
        "checkpoint.monitor=train/loss",
    ]
    runs = {}
    for every in (1, 5):
        run_dir = tmp_path / f"every{every}"
        run_dir.mkdir()
        sink = Records()
        cfg = compose_config([*FAST, *common, f"training.log_every={every}"])
        trainer = make_trainer(cfg, run_dir, sinks=[sink])
        trainer.fit()
        timed = ("throughput/", "time/")
        records = [{k: v for k, v in r.items() if not k.startswith(timed)} for r in sink.records]
        runs[every] = (trainer, records, run_dir)
    (each, each_records, each_dir), (windowed, windowed_records, windowed_dir) = runs[1], runs[5]
    assert [(e["step"], e["batch"]) for e in windowed.state.guard.events] == [
        (5, 4), (6, 6), (6, 7), (6, 8), (20, 23),
    ]  # fmt: skip
    logged = {r["step"] for r in windowed_records if "event" not in r}
    expected = [r for r in each_records if "event" in r or r["step"] in logged]
    assert json.dumps(windowed_records) == json.dumps(expected)
    for step in (5, 10, 15, 20):
        saved = [
            dict(flat(manager(d).load(manager(d).find(step)))) for d in (each_dir, windowed_dir)
        ]
        ignored = {".wandb_id", ".scheduler._step_count"}  # (the calls of step(): no number)
        keys = {k for k in saved[0] if k not in ignored and not k.startswith(".config.")}
        assert keys == {k for k in saved[1] if k not in ignored and not k.startswith(".config.")}
        assert [k for k in sorted(keys) if not same_leaf(saved[0][k], saved[1][k])] == [], step
    for a, b in zip(each.ema.average, windowed.ema.average, strict=True):
        assert torch.equal(a, b)
    for key, tensor in each.model.state_dict().items():
        assert torch.equal(windowed.model.state_dict()[key], tensor), key


@pytest.mark.parametrize("case", ["rejected", "overflow", "applied"])
def test_the_masked_step_keeps_the_grad_scaler_as_the_host_did(case):
    """fp16 (a GradScaler on the CPU here): a guard rejection leaves the parameters, the
    optimizer state, the scale and the growth tracker as they were; the scaler's own overflow
    masks the update and backs its scale off; an applied update grows it (interval 1)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for _ in range(2):  # a first update: the moments exist
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.unscale_(optimizer)
        masked_step(optimizer, scaler, torch.tensor(False), None)
        optimizer.zero_grad()
    scale, tracker = scaler._scale.clone(), scaler._growth_tracker.clone()
    before = [t.clone() for t in optimizer_tensors(optimizer)]
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    if case == "overflow":
        model.weight.grad[0, 0] = math.inf
    scaler.unscale_(optimizer)
    masked_step(optimizer, scaler, torch.tensor(case == "rejected"), None)
    after = optimizer_tensors(optimizer)
    same = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert same == (case != "applied")
    expected_scale = {"rejected": scale, "overflow": scale / 2, "applied": scale * 2}[case]
    assert torch.equal(scaler._scale, expected_scale)
    if case == "rejected":
        assert torch.equal(scaler._growth_tracker, tracker)
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")


def test_a_stop_inside_a_window_saves_the_true_step_and_resumes_bit_identical(
    tmp_path, monkeypatch, one_thread
):
    """A signal while three updates are unread (after step 10's sync), the second of them
    skipped (NaN): the checkpoint is of the true step (12, next batch 13) with the event
    recorded, and the resumed run ends where the uninterrupted one does."""
    force_losses(monkeypatch, {11: math.nan})
    overrides = [*FAST, *WINDOWED, "training.guard.action=skip", "training.guard.warmup=5"]
    cfg = compose_config(overrides)
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    straight_dir.mkdir(), stopped_dir.mkdir()
    straight = make_trainer(cfg, straight_dir)
    straight.fit()

    stopped = make_trainer(cfg, stopped_dir)
    check = stopped._stop_if_requested

    def signal_before_the_14th_attempt():
        if stopped.state.data_step == 13:  # batches 10, 11 (skipped) and 12 unread
            assert len(stopped.pending) == 3
            stopped.stop.signame = "SIGTERM"
        check()

    monkeypatch.setattr(stopped, "_stop_if_requested", signal_before_the_14th_attempt)
    with pytest.raises(TrainingInterrupted, match="at step 12"):
        stopped.fit()
    saved = manager(stopped_dir).load(manager(stopped_dir).find("last"))
    assert (saved["step"], saved["data_step"]) == (12, 13)
    assert [(e["step"], e["batch"]) for e in saved["guard"]["events"]] == [(12, 11)]
    schedule = cfg.training  # the lr of update 13, the one after the true step
    assert saved["optimizer"]["param_groups"][0]["lr"] == schedule.lr * lr_factor(12, schedule)

    resumed = make_trainer(cfg, stopped_dir, state=saved)
    resumed.fit()
    ends = [
        t.state.to_dict() | {"wandb_id": None, "guard": t.state.guard.report()}
        for t in (resumed, straight)
    ]
    assert ends[0] == ends[1]  # (report: an event's NaN loss is None there)
    assert resumed.state.guard.average == straight.state.guard.average
    for key, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], tensor), key


def test_a_failure_inside_a_window_leaves_the_true_step_and_the_skips_on_record(
    tmp_path, monkeypatch, one_thread
):
    """A crash (here a RuntimeError before the 9th attempt) while three attempts are unread,
    the second of them skipped (NaN on batch 6): what the run reports (run.json's summary,
    the guard's events in metrics.jsonl) is the true step 7 and the skip of step 7, as when
    every step was read, not the host's count of 8 attempts."""
    force_losses(monkeypatch, {6: math.nan})
    cfg = compose_config(
        [*FAST, *WINDOWED, "training.guard.action=skip", "training.guard.warmup=5"]
    )
    (tmp_path / "run").mkdir()
    sink = Records()
    trainer = make_trainer(cfg, tmp_path / "run", sinks=[sink])
    attempt = trainer.train_step

    def crash_before_the_ninth():
        if trainer.state.data_step == 8:
            assert len(trainer.pending) == 3
            raise RuntimeError("the device fell off the bus")
        return attempt()

    monkeypatch.setattr(trainer, "train_step", crash_before_the_ninth)
    with pytest.raises(RuntimeError, match="fell off the bus"):
        trainer.fit()
    summary = trainer.summary()
    assert (summary["step"], summary["tokens_seen"]) == (7, 7 * trainer.tokens_per_step)
    assert [(e["step"], e["batch"]) for e in summary["guard"]["events"]] == [(7, 6)]
    assert [(r["step"], r["batch"]) for r in sink.records if "event" in r] == [(7, 6)]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    for state in optimizer.state.values():
        tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
    return tensors


def test_skip_trains_the_schedule_of_the_true_step(tmp_path, monkeypatch, one_thread):
    """After a skipped update the lr of the next one is the schedule's at the true step
    (read from the device's table), as a run that logs every step gets it."""
    force_losses(monkeypatch, {3: math.nan})
    lrs: list[float] = []
    original = trainer_module.masked_step

    def watched(optimizer, scaler, masked, rates):
        lrs.append(rates[0].item())
        original(optimizer, scaler, masked, rates)

    monkeypatch.setattr(trainer_module, "masked_step", watched)
    _, windowed = counted_fit(tmp_path, monkeypatch, "training.guard.action=skip")
    cfg = windowed.cfg.training
    expected = [cfg.lr * lr_factor(s, cfg) for s in range(4)]
    expected += [cfg.lr * lr_factor(s, cfg) for s in range(3, 20)]
    assert lrs == expected
    stored = windowed.optimizer.state_dict()["param_groups"][0]["lr"]
    assert type(stored) is float and stored == cfg.lr * lr_factor(20, cfg)  # on disk as ever


def test_skip_without_a_spike_trains_what_off_trains(tmp_path, one_thread):
    """skip's lr is a tensor from the device's table, off's the scheduler's float: the same
    updates, bit for bit."""
    trained = []
    for action in ("off", "skip"):
        cfg = compose_config([*FAST, *WINDOWED, f"training.guard.action={action}"])
        (tmp_path / action).mkdir()
        trainer = make_trainer(cfg, tmp_path / action)
        trainer.fit()
        trained.append(trainer.model.state_dict())
    for key, tensor in trained[0].items():
        assert torch.equal(trained[1][key], tensor), key


def test_with_the_guard_off_a_nonfinite_update_fails_the_run_at_its_step(tmp_path):
    # Read back every 3 steps: the NaN of step 8 is found at step 9, nothing is saved after 5.
    run_dir = tmp_path / "run"
    overrides = ["training.log_every=3", "checkpoint.every_steps=5"]
    result = spiking("7:nan", run_dir, *overrides, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "NaN or inf" in result.stderr and "at step 8 (batch 7)" in result.stderr
    assert "the last valid checkpoint is step 5" in result.stderr
    assert status(run_dir)["status"] == "failed"
    (stop,) = events(run_dir)
    assert (stop["step"], stop["batch"], stop["action"]) == (8, 7, "stop")
    assert [e.step for e in manager(run_dir).entries()] == [5]
    logged = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert logged == [3, 6]


def test_rollback_reads_back_every_step_though_it_logs_every_fifth(tmp_path):
    run_dir = tmp_path / "run"
    guard = ["training.guard.action=rollback", "training.guard.warmup=5"]
    overrides = [*guard, "checkpoint.every_steps=5", "training.log_every=5"]
    result = spiking("13:100", run_dir, *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rolled back to checkpoint step_0000010.pt; batches 10..13 are skipped" in result.stderr
    (event,) = events(run_dir)
    assert (event["step"], event["batch"], event["to_step"]) == (14, 13, 10)
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == SYNC_STEPS


def test_the_host_stops_when_the_device_halted_under_off(tmp_path, monkeypatch, one_thread):
    force_losses(monkeypatch, {2: math.inf})
    with pytest.raises(TrainingDiverged, match=r"at step 3 \(batch 2\)"):
        counted_fit(tmp_path, monkeypatch, "checkpoint.enabled=false")


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_read_nothing_back_in_an_unlogged_step(tmp_path, parallel):
    out = tmp_path / "reads"
    run_dir = tmp_path / "run"
    launcher = [str(ROOT / "tests" / "host_reads.py"), str(out), "gptexp.train"]
    # rank 0 alone writes samples: the ranks still read back (and agree on a stop) alike
    overrides = [*FAST, *WINDOWED, "training.grad_accum=2", "training.guard.action=skip"]
    overrides.append("training.sample_every=4")
    if parallel == "fsdp":
        overrides.append("training.parallel=fsdp")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + [*launcher, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished", result.stderr
    for rank in (0, 1):
        counter = ReadCounter()
        recorded = json.loads((tmp_path / f"reads.{rank}.json").read_text())
        counter.attempts, counter.synced, counter.reads = (
            recorded["attempts"],
            recorded["synced"],
            recorded["reads"],
        )
        assert counter.attempts == 20 and counter.synced == [4, 5, 8, 10, 12, 15, 16, 20]
        assert counter.unsynced_reads() == [], rank
    logged = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert logged == SYNC_STEPS
