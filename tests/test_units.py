"""Pure logic, in-process and in milliseconds: the LR schedule, retention and best-k, run
ordering and discovery, status, what sets runs apart, sorting, the one argument parser."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from gptexp.checkpoint.format import CheckpointEntry
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.compare import sort_rows
from gptexp.core.cli import parse_options
from gptexp.core.config import CheckpointConfig, TrainingConfig
from gptexp.core.errors import ConfigError, RunError
from gptexp.observe.metrics import median_throughput
from gptexp.observe.rundir import RunDirectory, find_runs, job_order, runs_under
from gptexp.observe.runtable import distinguishing_keys
from gptexp.training.optim import lr_factor

# ----------------------------------------------------------------------------- LR schedule


def test_lr_schedule_at_known_steps():
    cfg = TrainingConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lr = lambda step: cfg.lr * lr_factor(step, cfg)  # noqa: E731 (lr of update step + 1)
    assert lr(0) == pytest.approx(1e-4)  # warm-up: 1/10 of the peak on the first update
    assert lr(4) == pytest.approx(5e-4)
    assert lr(9) == pytest.approx(1e-3)  # the last warm-up update reaches the peak
    assert lr(10) == pytest.approx(1e-3)  # cosine starts at the peak ...
    assert lr(60) == pytest.approx((1e-3 + 1e-4) / 2)  # ... is half way at mid-span ...
    assert lr(110) == pytest.approx(1e-4)  # ... and ends at min_lr
    assert lr(500) == pytest.approx(1e-4)  # past max_steps (an extended run) it stays there


def test_lr_schedule_without_warmup_starts_at_the_peak():
    cfg = TrainingConfig(lr=3e-4, min_lr=0.0, warmup_steps=0, max_steps=100)
    assert lr_factor(0, cfg) == 1.0 and lr_factor(100, cfg) == pytest.approx(0.0)


def test_wsd_is_constant_then_decays_linearly_over_the_last_decay_steps_updates():
    wsd = TrainingConfig(
        lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, lr_schedule="wsd", decay_steps=4
    )
    constant = dataclasses.replace(wsd, lr_schedule="constant", decay_steps=0)
    lr = lambda step, cfg=wsd: cfg.lr * lr_factor(step, cfg)  # noqa: E731 (update step + 1)
    assert [lr(s) for s in (0, 9)] == [lr(s, constant) for s in (0, 9)] == [1e-4, 1e-3]
    # Updates 1..106 are the constant schedule's, bit for bit (a cooldown fork's premise) ...
    assert all(lr_factor(s, wsd) == lr_factor(s, constant) for s in range(106))
    assert lr_factor(105, wsd) == 1.0 and lr_factor(500, constant) == 1.0
    # ... then updates 107..110 step down by (lr - min_lr) / 4, the last at min_lr ...
    assert [lr(s) for s in range(106, 110)] == pytest.approx([7.75e-4, 5.5e-4, 3.25e-4, 1e-4])
    assert lr(500) == pytest.approx(1e-4)  # ... and past max_steps it stays there
    whole = dataclasses.replace(wsd, warmup_steps=0, decay_steps=110)
    assert lr_factor(0, whole) == pytest.approx(1 - 0.9 / 110)  # decay_steps=max_steps: no plateau


# ----------------------------------------------------------------------------- retention


def entry(step, metric=None, *reasons) -> CheckpointEntry:
    return CheckpointEntry(f"step_{step:07d}.pt", step, "0" * 64, 1, metric, list(reasons))


def test_retention_keeps_last_k_best_k_milestones_and_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2, keep_best=1, keep_every=40))
    entries = [
        entry(10, None, "periodic"),
        entry(20, 2.0, "periodic", "best"),
        entry(30, None, "periodic"),
        entry(40, 2.5, "periodic"),
        entry(50, None, "periodic"),
        entry(55, None, "signal"),
    ]
    kept = [e.step for e in manager.retained(entries)]
    assert kept == [20, 40, 50, 55]  # best (20), milestone + periodic (40), periodic (50), newest


def test_best_depends_on_the_mode(tmp_path):
    entries = [entry(10, 3.0), entry(20, 1.0), entry(30, 2.0)]
    low = CheckpointManager(tmp_path, CheckpointConfig(mode="min", keep_best=2))
    high = CheckpointManager(tmp_path, CheckpointConfig(mode="max", keep_best=2))
    assert [e.step for e in low.best_first(entries)] == [20, 30, 10]
    assert [e.step for e in high.best_first(entries)] == [10, 30, 20]
    assert low.ranks_among_best(1.5, entries) and not low.ranks_among_best(2.5, entries)
    assert high.ranks_among_best(2.5, entries) and not high.ranks_among_best(1.5, entries)


def test_wants_names_every_reason(tmp_path):
    policy = CheckpointConfig(every_steps=10, keep_every=20, keep_best=1)
    manager = CheckpointManager(tmp_path, policy)
    assert manager.wants(20, None, final=False) == ["periodic", "milestone"]
    assert manager.wants(25, None, final=True) == ["final"]
    assert manager.wants(25, 1.0, final=False) == ["best"]  # no checkpoint yet: best so far
    assert CheckpointManager(tmp_path, CheckpointConfig(enabled=False)).wants(20, 1.0, True) == []


# ----------------------------------------------------------------------------- runs


def test_job_order_is_numeric_with_claimed_directories_after_their_number():
    names = ["10", "2", "0-1", "b", "0", "2-10", "2-2", "a"]
    assert sorted(names, key=job_order) == ["0", "0-1", "2", "2-2", "2-10", "10", "a", "b"]


def make_run(path, **status):
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps(status))
    return RunDirectory(path)


def test_run_discovery_and_status(tmp_path):
    make_run(tmp_path / "1", status="finished")
    make_run(tmp_path / "0-1", status="running")  # no process holds its lock: crashed
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text("{}")  # never started: pending
    (tmp_path / "not-a-run").mkdir()
    runs = runs_under(tmp_path)
    assert [run.path.name for run in runs] == ["0", "0-1", "1"]
    assert [run.status() for run in runs] == ["pending", "crashed", "finished"]
    assert find_runs(tmp_path / "1")[0].path.name == "1"
    with pytest.raises(RunError, match="neither a gptexp run directory"):
        find_runs(tmp_path / "not-a-run")


def test_a_locked_running_run_is_running(tmp_path):
    run = make_run(tmp_path / "r", status="running")
    fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run.status() == "running"
    finally:
        os.close(fd)
    assert run.status() == "crashed"


def test_distinguishing_keys_and_sorting():
    rows = [
        {
            "run": "0",
            "status": "finished",
            "settings": ["training.lr", "model"],
            "training.lr": 1e-3,
            "model": "nano",
            "final/val_loss": 2.0,
        },
        {
            "run": "1",
            "status": "finished",
            "settings": ["training.lr", "model"],
            "training.lr": 3e-4,
            "model": "nano",
            "final/val_loss": None,
        },
        {
            "run": "2",
            "status": "failed",
            "settings": ["training.lr", "model"],
            "training.lr": "3e-3",
            "model": "nano",
            "final/val_loss": 1.5,
        },
    ]
    assert distinguishing_keys(rows) == ["training.lr"]  # model is the same everywhere
    assert [r["run"] for r in sort_rows(rows, "final/val_loss")] == ["2", "0", "1"]
    assert [r["run"] for r in sort_rows(rows, "-training.lr")] == ["2", "0", "1"]  # "3e-3" too
    with pytest.raises(ConfigError, match="not a column"):
        sort_rows(rows, "nope")


def test_median_throughput_leaves_out_the_first_window():
    assert median_throughput([1.0, 10.0, 20.0, 30.0]) == 20.0
    assert median_throughput([1.0, 10.0, 20.0]) == 15.0  # the true median, not the upper one
    assert median_throughput([5.0]) == 5.0 and median_throughput([]) is None
    assert median_throughput([math.nan, 4.0, 6.0]) == 5.0


# ----------------------------------------------------------------------------- the parser


@dataclass
class Options:
    paths: list[str] = field(default_factory=list)
    run: str = "x"
    count: int = 1
    rate: float | None = None
    flag: bool = False
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"count={self.count}: must be >= 0")


def test_parser_reads_key_values_flags_and_paths():
    got = parse_options(
        ["a", "count=3", "--rate=0.5", "--flag", "tags=x", "tags=y=z", "b"], Options, "usage"
    )
    assert got == Options(paths=["a", "b"], count=3, rate=0.5, flag=True, tags=["x", "y=z"])
    assert parse_options(["rate=none"], Options, "usage").rate is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cuont=3"], "unknown key 'cuont'"),
        (["count=abc"], "count='abc'"),
        (["count=-1"], "must be >= 0"),
    ],
)
def test_parser_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_options(argv, Options, "usage")


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_options(["--help"], Options, "usage: x")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: x") and all(k in out for k in ("run", "count", "rate", "tags"))


@dataclass
class ContinueOptions:
    """A command that continues a stored config (as resume and fork do)."""

    CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset({"model", "training"})
    ALIASES: ClassVar[dict[str, str]] = {"m": "multirun"}

    run: str
    multirun: bool = False
    overrides: list[str] = field(default_factory=list)


def test_config_overrides_are_collected_as_written():
    argv = ["-m", "training.lr=1,2", "run=r", "+training.x=1", "~model.a", "model=small"]
    got = parse_options([*argv, "data.path=${oc.env:HOME}/a"], ContinueOptions, "usage")
    assert (got.run, got.multirun) == ("r", True)
    assert got.overrides == [
        "training.lr=1,2",
        "+training.x=1",
        "~model.a",
        "model=small",
        "data.path=${oc.env:HOME}/a",
    ]
    assert parse_options(["run=r", "--multirun"], ContinueOptions, "usage").multirun
    with pytest.raises(
        ConfigError, match=r"unknown key 'max_steps' \(known keys: m, multirun, run\)"
    ):
        parse_options(["run=r", "max_steps=3"], ContinueOptions, "usage")
    with pytest.raises(ConfigError, match="unknown key 'overrides'"):
        parse_options(["run=r", "overrides=x"], ContinueOptions, "usage")
    with pytest.raises(ConfigError, match="unknown key 'training.lr'"):
        parse_options(["training.lr=3"], Options, "usage")  # a command without overrides


# ----------------------------------------------------------------------------- progress


def test_counts_read_as_english():
    from gptexp.training.progress import plural

    assert plural(1, "thread") == "1 thread" and plural(2, "thread") == "2 threads"
    assert plural(1, "process", "processes") == "1 process"
    assert plural(4, "process", "processes") == "4 processes"


def test_the_progress_line_shows_the_loss_metrics_jsonl_holds(tmp_path, monkeypatch, caplog):
    """Under torchrun metrics.jsonl holds the mean loss across ranks; the progress line and
    train.log must show that value, not this rank's own. The other ranks are stood in for by
    a mean that differs from the local loss."""
    import logging
    import re

    import torch

    from gptexp.training import mfu as hardware
    from tests.conftest import FAST, compose_config, make_trainer

    monkeypatch.setattr(hardware, "measure_cpu_peak_flops", lambda dtype: 1e9)
    (tmp_path / "run").mkdir()
    cfg = compose_config([*FAST, "training.max_steps=3", "checkpoint.enabled=false"])
    records: list[dict] = []
    sink = type("Sink", (), {"log": lambda self, record: records.append(record)})()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.INFO, logger="gptexp"):
            trainer = make_trainer(cfg, tmp_path / "run", sinks=[sink])
            monkeypatch.setattr(trainer, "_mean_across_ranks", lambda value: value + 1.0)
            trainer.fit()
    finally:
        torch.set_num_threads(threads)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    shown = [float(m.group(1)) for line in lines if (m := re.search(r"\| loss (\S+)", line))]
    logged = [round(r["train/loss"], 4) for r in records if "train/loss" in r]
    assert len(logged) == 3 and shown == logged
    assert ", 1 thread" in caplog.text and "1 threads" not in caplog.text


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_eval_refuses_a_seed_its_generators_cannot_take(seed):
    from gptexp.eval import USAGE, EvalOptions

    with pytest.raises(ConfigError, match=rf"^seed={seed}: must be in \[0, 2\*\*63\)"):
        parse_options(["run=somewhere", f"seed={seed}"], EvalOptions, USAGE)
    assert parse_options(["run=somewhere", "seed=0"], EvalOptions, USAGE).seed == 0


# ----------------------------------------------------------------------------- hints


def test_hints_with_a_path_can_be_pasted_into_a_shell():
    import shlex

    from gptexp.core.errors import TrainingInterrupted, resume_hint, shell_command

    plain = TrainingInterrupted("SIGTERM", 7, "outputs/runs/a")
    assert str(plain).endswith("resume with: make resume RUN=outputs/runs/a")
    awkward = "/tmp/my runs/bob's run"
    stopped = str(TrainingInterrupted("SIGTERM", 7, awkward))
    command = stopped.partition("resume with: ")[2]
    assert shlex.split(command) == ["python", "-m", "gptexp.resume", f"run={awkward}"]
    extend = resume_hint(awkward, "training.max_steps=N")
    assert shlex.split(extend)[-2:] == [f"run={awkward}", "training.max_steps=N"]
    assert resume_hint("runs/a", "training.max_steps=N") == (
        'make resume RUN=runs/a ARGS="training.max_steps=N"'
    )
    assert shlex.split(shell_command("python", "-m", "gptexp.eval", f"run={awkward}"))[-1] == (
        f"run={awkward}"
    )
