"""Sweeps: which run directory a multirun job trains in, and the summary of a sweep directory.

A sweep directory holds one run directory per job (``<sweep>/<job num>/``). Launching the same
sweep into the same directory again continues it: a job whose config equals the stored config
(run.json ``config``) of a run already there skips that run when it finished (or a search
pruned it) and resumes it when it did not. Matching goes by config, not by job number, because
job numbers shift when the sweep's value lists change.

After each job and at the end of the sweep, :class:`SweepSummary` writes ``<sweep>/sweep.json``
and ``<sweep>/summary.md``: one row per run with its overrides, status and losses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gptexp.core.cli import command_logging, run_command
from gptexp.core.config import TrainConfig, config_to_dict, to_train_config
from gptexp.core.errors import (
    USER_ERRORS,
    ConfigError,
    JobFailed,
    RunError,
    RunFailed,
    TrainingInterrupted,
    TrainingPruned,
)
from gptexp.core.fsio import atomic_write_bytes, atomic_write_text
from gptexp.model.hf import resolve_init_from
from gptexp.observe.metrics import FINAL_VAL_LOSS
from gptexp.observe.rundir import (
    FAILED,
    FINISHED,
    PRUNED,
    RUNNING,
    RunDirectory,
    discard_unstarted,
    now,
    runs_under,
)
from gptexp.observe.runtable import cells, table_columns, write_summary
from gptexp.observe.tables import text_table
from gptexp.run.requeue import requeue_if_preempted
from gptexp.run.session import run_training
from gptexp.run.starts import Resume, new_run
from gptexp.training.runtime import Distributed

log = logging.getLogger(__name__)

START, RESUME, SKIP = "start", "resume", "skip"
BUSY = "busy"  # the run is being trained by another live process
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class JobPlan:
    """Where a multirun job trains and what it does there."""

    run: RunDirectory
    action: str  # START a new run | RESUME an unfinished one | SKIP a finished one | BUSY


def as_stored(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as run.json holds it (JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(config))


def plan_job(own: RunDirectory, config: dict[str, Any], overrides: list[str]) -> JobPlan:
    """Decide where the job whose Hydra directory is ``own`` trains.

    ``config`` is the job's typed config as a dict. A run in the sweep directory with the same
    config is the job's run (``own`` is preferred, then a finished one); otherwise the job
    starts in ``own``, or, when ``own`` already holds a run of another config (the sweep's
    value lists changed since the first launch), in a new directory next to it.
    """
    wanted = as_stored(config)
    matches = [run for run in runs_under(own.path.parent) if _recorded_config(run) == wanted]
    if matches:
        done = (FINISHED, PRUNED)  # a pruned trial's result stands (make resume continues it)
        matches.sort(key=lambda run: (run != own, run.read_status().get("status") not in done))
        chosen = matches[0]
        if chosen != own:
            _hand_back(own, overrides)
        finished = chosen.read_status().get("status") in done
        return JobPlan(chosen, SKIP if finished else RESUME)
    if not own.has_started() or _unstarted_claim_of(own, overrides):
        return JobPlan(own, START)
    fresh = _claim_directory_next_to(own)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        source = own.hydra_dir / name
        if source.is_file():
            atomic_write_bytes(fresh.hydra_dir / name, source.read_bytes())
    _hand_back(own, overrides)
    log.info("%s holds a run of another config; this job starts in %s", own.path, fresh.path)
    return JobPlan(fresh, START)


def _recorded_config(run: RunDirectory) -> Any:
    """The config a run of the sweep recorded; None for a damaged run.json (that run is no
    job's: the summary lists it as damaged)."""
    try:
        return run.read_status().get("config")
    except RunError:
        return None


def _unstarted_claim_of(own: RunDirectory, overrides: list[str]) -> bool:
    """A directory this job claimed before it could record its config (a gptexp older than
    the config-first claim): its run.json holds the same overrides and nothing trained."""
    status = own.read_status()
    return (
        "config" not in status
        and "status" not in status
        and status.get("overrides") == overrides
        and not own.checkpoints.exists()
    )


def _claim_directory_next_to(own: RunDirectory) -> RunDirectory:
    """``<own>-1``, ``<own>-2``, ...: the first that does not exist, created atomically.

    The suffix keeps these names apart from Hydra's job numbers, which a later job of the same
    launch may still be about to use.
    """
    for index in range(1, 10_000):
        candidate = own.path.with_name(f"{own.path.name}-{index}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        (candidate / ".hydra").mkdir()
        return RunDirectory(candidate)
    raise RuntimeError(f"no free directory name next to {own.path}")


def _hand_back(own: RunDirectory, overrides: list[str]) -> None:
    """Undo what Hydra wrote into ``own`` for a job that trains elsewhere.

    A directory that held nothing else disappears; a run that was already there (whose
    ``.hydra`` files Hydra has just overwritten with this job's) gets its own composed config
    and overrides back from its run.json. Its hydra.yaml keeps describing this launch.
    """
    if not own.has_started():
        discard_unstarted(own)
        return
    status = own.read_status()
    if isinstance(status.get("config"), dict):
        atomic_write_text(own.config_yaml, OmegaConf.to_yaml(OmegaConf.create(status["config"])))
    if isinstance(status.get("overrides"), list):
        atomic_write_text(
            own.overrides_yaml, OmegaConf.to_yaml(OmegaConf.create(status["overrides"]))
        )
    elif own.overrides() == overrides:
        log.warning("%s: its original overrides.yaml could not be restored", own.path)


# ----------------------------------------------------------------------------- one job


def share_cores_between_jobs(hydra_cfg: DictConfig, num_threads: int) -> None:
    """Under a launcher that runs n jobs at once on this machine (joblib's ``n_jobs``), a job
    that leaves ``training.num_threads`` at 0 gets cores / n torch threads instead of PyTorch's
    default of every core, which would make the jobs fight over them."""
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=None)
    if num_threads or not isinstance(n_jobs, int) or n_jobs == 1:
        return
    import torch

    cores = os.cpu_count() or 1
    parallel = cores if n_jobs < 1 else min(n_jobs, cores)
    torch.set_num_threads(max(1, cores // parallel))


def sweep_job(
    cfg: DictConfig,
    own: RunDirectory,
    overrides: list[str],
    wandb_group: str | None,
    wandb_name: str | None,
    dist_ctx: Distributed,
    report_to: Any = None,
) -> float:
    """One job of a multirun: start, resume or skip its run; never stop the other jobs.

    A job that fails (bad config, bad data, NaN loss) is recorded as failed in its run.json
    and returns NaN; the sweep goes on. A stop on a signal ends the whole sweep (exit 130):
    launching the same command into the same sweep directory continues it. ``report_to``:
    a search trial's reporter (see session.run_training); a trial its pruner stops, or one
    whose run was pruned already, raises TrainingPruned to the sweeper.
    """
    try:
        typed = resolve_init_from(to_train_config(cfg), overrides)  # model.init_from's shape
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        if dist_ctx.is_main:
            own.update_status(status=FAILED, error=str(error), overrides=overrides, ended=now())
        return math.nan
    with contextlib.ExitStack() as claim:
        plan = None
        if dist_ctx.is_main:
            plan = plan_job(own, config_to_dict(typed), overrides)
            if plan.action != SKIP:
                plan = claim_run(plan, claim, typed, overrides, wandb_group, wandb_name)
        plan = dist_ctx.broadcast(plan)  # every rank trains in rank 0's choice
        if plan.action == SKIP:
            stored = plan.run.read_status()
            if stored.get("status") == PRUNED:
                print(f"{plan.run.path}: pruned already (same config); skipped", file=sys.stderr)
                raise TrainingPruned(stored.get("step", 0), str(plan.run.path))
            print(f"{plan.run.path}: finished already (same config); skipped", file=sys.stderr)
            final = stored.get(FINAL_VAL_LOSS)
            return math.nan if final is None else final
        if plan.action == BUSY:
            print(f"{plan.run.path}: running in another process; left to it", file=sys.stderr)
            return math.nan
        return _train_job(plan, typed, own, wandb_group, wandb_name, dist_ctx, report_to)


def claim_run(
    plan: JobPlan,
    claim: contextlib.ExitStack,
    typed: TrainConfig,
    overrides: list[str],
    wandb_group: str | None,
    wandb_name: str | None,
) -> JobPlan:
    """Take the run's lock for the rest of the job, then record its config, so that a sweep
    killed at any instant (or launched twice at once) finds the run again by its config and
    never trains it twice. A run whose lock a live process holds is left to that process."""
    try:
        claim.enter_context(plan.run.lock())
    except RunError:
        return JobPlan(plan.run, BUSY)
    fields: dict[str, Any] = dict(overrides=overrides, wandb_group=wandb_group)
    fields["wandb_name"] = wandb_name
    if plan.action == START:
        fields["config"] = config_to_dict(typed)  # from now on the job's run is found by it
    plan.run.update_status(**fields)
    return plan


def _train_job(plan, typed, own, wandb_group, wandb_name, dist_ctx, report_to) -> float:
    with command_logging(plan.run.log_file if dist_ctx.is_main else None):
        if plan.action == RESUME:
            log.info("%s: unfinished run of the same config; resuming it", plan.run.path)
        try:
            start = (
                Resume({"sweep_job": own.path.name}) if plan.action == RESUME else new_run(typed)
            )
            result = run_training(
                typed,
                plan.run,
                start,
                wandb_group=wandb_group,
                wandb_name=wandb_name,
                locked=True,
                report_to=report_to,
            )
        except (*USER_ERRORS, FloatingPointError, RunFailed) as error:
            log.error("job failed: %s", error)
            if dist_ctx.is_main:
                plan.run.update_status(status=FAILED, error=str(error), ended=now())
            return math.nan
        except TrainingInterrupted as stop:
            log.warning("the sweep stops here; launch the same command again to continue it")
            if dist_ctx.is_main:
                write_summary(own.path.parent)
            requeue_if_preempted(stop.signame)  # SLURM pre-timeout: submitit resubmits the job
            raise
    return math.nan if result is None else result


# ----------------------------------------------------------------------------- the summary


class SweepSummary(Callback):
    """Keeps ``sweep.json`` / ``summary.md`` up to date and reports the sweep at its end.

    ``fail_on_failed_jobs``: the command exits with status 1 when a job failed (the others
    still ran). An Optuna search turns it off: a failed trial is part of the search.
    """

    def __init__(self, fail_on_failed_jobs: bool = True) -> None:
        self.fail_on_failed_jobs = fail_on_failed_jobs

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_command(lambda: self.report(Path(config.hydra.sweep.dir)))

    def report(self, sweep_dir: Path) -> None:
        rows = write_summary(sweep_dir)
        columns = table_columns(rows)
        print(text_table(columns, cells(rows, columns)), file=sys.stderr)
        running = [row["run"] for row in rows if row["status"] == RUNNING]
        ended = (FINISHED, PRUNED, RUNNING)  # pruned: a search's result, not a failure
        failed = [row["run"] for row in rows if row["status"] not in ended]
        print(f"sweep summary: {sweep_dir / 'summary.md'}", file=sys.stderr)
        if running:
            print(
                f"{len(running)} of {len(rows)} runs are being trained by another process: "
                f"{', '.join(running)}",
                file=sys.stderr,
            )
        if failed:
            message = (
                f"{len(failed)} of {len(rows)} runs did not finish: {', '.join(failed)}; "
                f"launch the same command with hydra.sweep.dir={sweep_dir} to continue them"
            )
            if self.fail_on_failed_jobs:
                raise JobFailed(message)
            print(message, file=sys.stderr)
