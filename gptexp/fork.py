"""``python -m gptexp.fork run=<dir> ckpt=<last|best|STEP> [key=value ...]``: branch a run.

A fork is a new run directory that starts from the full state of one of its parent's
checkpoints (weights, optimizer, scheduler, grad scaler, the RNG of every rank, the data
position, the best metric) with ``key=value`` overrides of any ``training``, ``checkpoint``,
``logger`` or ``data`` key applied. Without overrides it continues bit for bit as its parent
did. The parent's directory is only read. ``-m`` makes one fork per combination of
comma-separated values, under one sweep directory::

    python -m gptexp.fork run=outputs/runs/A ckpt=500 training.lr=3e-4
    python -m gptexp.fork run=outputs/runs/A ckpt=best reset=optimizer,scheduler \\
        data=... data.name=text data.path=finetune.txt
    python -m gptexp.fork -m run=outputs/runs/A ckpt=500 training.lr=1e-4,3e-4

``cooldown=D`` makes a cooldown fork (gptexp.run.forking): the learning rate decays linearly
to ``training.min_lr`` over the D updates after the checkpoint (``lr_schedule=wsd``,
``max_steps=<step>+D``, ``decay_steps=D``). With ``-m``, ``ckpt`` and ``cooldown`` take
comma-separated values too: one fork per budget, drawn by ``compare --frontier``::

    python -m gptexp.fork -m run=outputs/runs/A ckpt=1000,2000,3000 cooldown=200
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from gptexp.checkpoint.stored import (
    check_ckpt,
    check_weights,
    listed_checkpoint,
    load_run_checkpoint,
)
from gptexp.core.cli import command_logging, parse_options, run_command
from gptexp.core.config import CONFIG_KEYS, TrainConfig, parse_overrides
from gptexp.core.errors import USER_ERRORS, ConfigError, JobFailed, RunError, TrainingInterrupted
from gptexp.observe.rundir import (
    FAILED,
    FINISHED,
    RunDirectory,
    discard_unstarted,
    now,
    require_run,
)
from gptexp.observe.runtable import cells, table_columns, write_summary
from gptexp.observe.tables import text_table
from gptexp.run.forking import (
    COOLDOWN_KEYS,
    ForkStart,
    check_cooldown,
    check_trains,
    cooldown_overrides,
    fork_start,
    parse_cooldown,
    parse_reset,
)
from gptexp.run.session import overridden_config, run_training
from gptexp.training.progress import plural
from gptexp.training.speed import prepare_command_process

log = logging.getLogger(__name__)

USAGE = (
    "usage: python -m gptexp.fork [-m] run=<run dir> [ckpt=last|best|<step>] [out=<dir>] "
    "[reset=optimizer,scheduler,rng,step] [cooldown=<updates>] [weights=raw|ema] "
    "[key=value ...]\n"
    "key=value: any key of the parent's training, checkpoint, logger or data config "
    "(e.g. training.lr=3e-4); -m: one fork per comma-separated value (of ckpt and cooldown too)"
)
RUNS_DIR, SWEEPS_DIR = Path("outputs/runs"), Path("outputs/sweeps")


@dataclass
class ForkOptions:
    # ``model=small`` is a config override (refused with a clear message: a fork keeps its
    # parent's model), not an unknown option of this command (gptexp.core.cli.OVERRIDES).
    CONFIG_KEYS: ClassVar[frozenset[str]] = CONFIG_KEYS
    ALIASES: ClassVar[dict[str, str]] = {"m": "multirun"}

    run: str = field(metadata={"help": "the parent run directory"})
    ckpt: str = field(
        default="last", metadata={"help": "last, best or a step number (-m: several, a,b,c)"}
    )
    out: str | None = field(
        default=None,
        metadata={"help": "the fork's directory (default outputs/runs/<date>_<time>)"},
    )
    reset: str = field(
        default="",
        metadata={"help": "restart any of optimizer,scheduler,rng,step (comma-separated)"},
    )
    cooldown: str | None = field(
        default=None,
        metadata={
            "help": "decay the lr to min_lr over this many updates from the checkpoint "
            "(lr_schedule=wsd, max_steps=step+cooldown, decay_steps=cooldown; -m: several)"
        },
    )
    weights: str = field(
        default="raw",
        metadata={
            "help": "raw, or ema: the fork's model starts from the checkpoint's weight average "
            "(optimizer and average carry on)"
        },
    )
    multirun: bool = field(
        default=False, metadata={"help": "one fork per comma-separated value (also --multirun)"}
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "any key of the parent's training, checkpoint, logger or data config"},
    )

    def __post_init__(self) -> None:
        for ckpt in self.listed("ckpt"):
            check_ckpt(ckpt)
        for cooldown in self.listed("cooldown"):
            parse_cooldown(cooldown)
        parse_reset(self.reset)
        check_weights(self.weights)

    def listed(self, name: str) -> list[str]:
        """The values of ``ckpt`` or ``cooldown`` (several, comma-separated, only with -m)."""
        text = getattr(self, name)
        if text is None:
            return []
        values = [value.strip() for value in str(text).split(",")]
        if len(values) > 1 and not self.multirun:
            raise ConfigError(f"{name}={text}: several values make several forks; add -m")
        return values


def prepare(options: ForkOptions, overrides: list[str]) -> tuple[TrainConfig, ForkStart]:
    """Everything a fork checks before it writes anything: the parent, the config, the
    checkpoint (verified) and the text (encoded with the parent's tokenizer)."""
    parent = started_run(options.run)
    reset = parse_reset(options.reset)
    cooldown = parse_cooldown(options.cooldown) if options.cooldown is not None else None
    if cooldown is not None:
        check_cooldown(overrides, reset)
    cfg, changes = overridden_config(parent, overrides, fork=True)  # before any loading
    loaded = load_run_checkpoint(parent, options.ckpt, options.weights)
    if cooldown is not None:  # its schedule is counted from the checkpoint's step
        overrides = [*overrides, *cooldown_overrides(loaded.entry.step, cooldown)]
        cfg, changes = overridden_config(parent, overrides, fork=True)
        warmup = cfg.training.warmup_steps
        if loaded.entry.step < warmup:  # as the planned wsd run: warm-up wins (lr_factor)
            log.warning(
                "cooldown=%d from step %d: inside training.warmup_steps=%d, where the lr still "
                "rises; %s",
                cooldown,
                loaded.entry.step,
                warmup,
                "it never decays (cool down from a later checkpoint)"
                if loaded.entry.step + cooldown <= warmup
                else f"only its last {plural(loaded.entry.step + cooldown - warmup, 'update')} "
                "decay",
            )
    start = fork_start(
        parent, loaded, cfg, changes, overrides, reset, cooldown=cooldown, weights=options.weights
    )
    return cfg, start


def started_run(path: str) -> RunDirectory:
    run = require_run(path)
    if not run.has_started():
        raise RunError(f"{path}: this run never started training; there is nothing to fork")
    return run


def check_destination(path: Path, parent: RunDirectory) -> None:
    """A fork never writes into its parent, nor over anything already there."""
    path = path.resolve()
    if path == parent.path or path.is_relative_to(parent.path):
        raise RunError(f"out={path}: inside the parent run {parent.path}; choose another place")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunError(f"out={path}: already exists and is not empty; choose another place")


def timestamped(base: Path) -> Path:
    """``base/<date>_<time>``, with ``-1``, ``-2``... when that name is taken already."""
    stamp = base / time.strftime("%Y-%m-%d_%H-%M-%S")
    candidate, index = stamp, 0
    while candidate.exists():
        index += 1
        candidate = stamp.with_name(f"{stamp.name}-{index}")
    return candidate


def wandb_names(start: ForkStart) -> tuple[str, str]:
    """(group, name) of the fork's W&B run: in its parent's group (or one named after the
    parent), named ``<parent>@<step>`` and what the fork changed."""
    status = start.parent_status
    parent_name = status.get("wandb_name") or start.parent.path.name
    group = status.get("wandb_group") or parent_name
    name = f"{parent_name}@{start.step}"
    shown = [item for item in start.overrides if item.partition("=")[0] not in COOLDOWN_KEYS]
    if start.cooldown is not None:  # its own keys say less than the cooldown does
        shown.insert(0, f"cooldown={start.cooldown}")
    return group, f"{name} {','.join(shown)}" if shown else name


def train_fork(cfg: TrainConfig, start: ForkStart, run: RunDirectory) -> float | None:
    group, name = wandb_names(start)
    return run_training(cfg, run, start, wandb_group=group, wandb_name=name)


# ----------------------------------------------------------------------------- one fork


def fork_one(options: ForkOptions, overrides: list[str]) -> float | None:
    run = RunDirectory(Path(options.out) if options.out else timestamped(RUNS_DIR))
    check_destination(run.path, started_run(options.run))
    cfg, start = prepare(options, overrides)
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        with command_logging(run.log_file):
            result = run_command(lambda: train_fork(cfg, start, run))
    finally:
        discard_unstarted(run)  # a fork refused before it started leaves nothing behind
    print(f"fork: {run.path}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- -m


def expand(overrides: list[str]) -> list[list[str]]:
    """One list of overrides per combination of the swept values, read as ``train -m`` reads
    them (Hydra's grammar: ``a,b``, ``choice(a,b)``, ``range(1,4)``; a list in brackets or a
    quoted value with commas is one value); each value is written back as Hydra writes a
    job's override."""
    choices = []
    for item, override in zip(overrides, parse_overrides(overrides), strict=True):
        if not override.is_sweep_override():
            choices.append([item])
            continue
        key = item.partition("=")[0]
        choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return [list(combination) for combination in itertools.product(*choices)]


@dataclass
class Job:
    """One fork of a sweep: its checkpoint, its cooldown and its overrides."""

    ckpt: str
    cooldown: str | None
    overrides: list[str]

    def describe(self) -> str:
        cooldown = [f"cooldown={self.cooldown}"] if self.cooldown is not None else []
        return " ".join([f"ckpt={self.ckpt}", *cooldown, *self.overrides])


def sweep_jobs(options: ForkOptions, overrides: list[str]) -> list[Job]:
    """One job per checkpoint x cooldown x combination of swept values."""
    cooldowns: list[str | None] = list(options.listed("cooldown")) or [None]
    return [
        Job(ckpt, cooldown, job)
        for ckpt in options.listed("ckpt")
        for cooldown in cooldowns
        for job in expand(overrides)
    ]


def fork_sweep(options: ForkOptions, overrides: list[str]) -> None:
    """One fork per job, ``<sweep>/0``, ``<sweep>/1``...; every job's config and checkpoint
    (listed in the parent's manifest) are checked before the first fork starts. A fork that
    fails is recorded and the others go on; the command then exits 1."""
    jobs = sweep_jobs(options, overrides)
    parent = started_run(options.run)
    reset = parse_reset(options.reset)
    for job in jobs:  # a missing checkpoint or a fork with nothing to train: before any fork
        cfg, _ = overridden_config(parent, job.overrides, fork=True)
        entry = listed_checkpoint(parent, job.ckpt)
        if job.cooldown is not None:
            check_cooldown(job.overrides, reset)
        else:
            check_trains(cfg, entry, reset)
    sweep_dir = Path(options.out) if options.out else timestamped(SWEEPS_DIR)
    check_destination(sweep_dir, parent)
    failed = []
    for number, job in enumerate(jobs):
        run = RunDirectory(sweep_dir / str(number))
        run.path.mkdir(parents=True, exist_ok=True)
        try:
            with command_logging(run.log_file):
                log.info("fork %d of %d: %s", number + 1, len(jobs), job.describe())
                one = replace(options, ckpt=job.ckpt, cooldown=job.cooldown, multirun=False)
                cfg, start = prepare(one, job.overrides)
                train_fork(cfg, start, run)
        except (*USER_ERRORS, FloatingPointError) as error:
            log.error("fork %s failed: %s", run.path, error)
            failed.append(run.path.name)
            run.update_status(
                status=FAILED, error=str(error), ended=now(), fork_overrides=job.overrides
            )
        except TrainingInterrupted as stop:
            log.warning("%s; the sweep of forks stops here", stop)
            write_summary(sweep_dir)
            raise
        finally:
            discard_unstarted(run)
    rows = write_summary(sweep_dir)
    columns = table_columns(rows)
    print(text_table(columns, cells(rows, columns)), file=sys.stderr)
    print(f"sweep of forks: {sweep_dir.resolve()}", file=sys.stderr)
    if failed:
        finished = sum(row["status"] == FINISHED for row in rows)
        raise JobFailed(
            f"{len(failed)} of {len(jobs)} forks failed ({', '.join(failed)}); "
            f"{finished} finished; see their run.json and train.log"
        )


# ----------------------------------------------------------------------------- entry


def fork(argv: list[str]) -> float | None:
    options = parse_options(argv, ForkOptions, USAGE)
    if options.multirun:
        fork_sweep(options, options.overrides)
        return None
    return fork_one(options, options.overrides)


def main() -> None:
    prepare_command_process()  # gptexp.training.speed: reproducible matmuls, a quiet collector
    with command_logging(None):  # a fork's own log (train.log) takes over once its directory exists
        run_command(lambda: fork(sys.argv[1:]))


if __name__ == "__main__":
    main()
