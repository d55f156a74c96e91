"""``python -m gptexp.train [overrides]``: compose the config with Hydra, then train.

A thin entry: Hydra composes ``conf/train.yaml`` over the typed schema, the config becomes
typed dataclasses once, here, and :func:`gptexp.trainer.run_training` does the rest. The
return value is the final validation loss, which Hydra's sweepers (Optuna) minimise.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gptexp.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, report_errors
from gptexp.config import ConfigError, config_to_dict, register_configs, to_train_config
from gptexp.run import FAILED, RunDirectory, RunError, discard_unstarted, now, run_logging
from gptexp.sweep import RESUME, SKIP, plan_job
from gptexp.trainer import (
    USER_ERRORS,
    Distributed,
    TrainingInterrupted,
    init_distributed,
    run_training,
)

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def task_config(config: DictConfig) -> DictConfig:
    """The composed config without Hydra's own node."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


class ValidateBeforeRun(Callback):
    """Checks a single run before Hydra creates its directory or writes any file there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            to_train_config(task_config(config))
            run = RunDirectory(config.hydra.run.dir)
            if run.is_run():
                raise RunError(
                    f"{run.path} already holds a run; continue it with "
                    f"make resume RUN={run.path} (or choose another hydra.run.dir)"
                )
        except (ConfigError, RunError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)


def _shared_run_dir(own: Path, dist_ctx: Distributed) -> Path:
    """Under torchrun every rank composes its own config; all use rank 0's directory."""
    if not dist_ctx.enabled:
        return own
    import torch.distributed as dist

    box = [str(own)]
    dist.broadcast_object_list(box, src=0)
    shared = Path(box[0])
    if shared != own:
        discard_unstarted(RunDirectory(own))
    return shared


def train(cfg: DictConfig) -> float | None:
    """Hydra's task function: one run (one job of a multirun)."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    dist_ctx = Distributed.from_env()
    init_distributed(dist_ctx, str(cfg.training.device))
    run = RunDirectory(_shared_run_dir(Path(hydra_cfg.runtime.output_dir), dist_ctx))
    # W&B: the runs of one sweep form a group; a run is named after what its command changed.
    wandb_group = Path(hydra_cfg.sweep.dir).name if multirun else None
    wandb_name = ",".join(overrides) or None
    if multirun:
        share_cores_between_jobs(hydra_cfg, int(cfg.training.num_threads))
        # Hydra's basic sweeper stops after a batch with a failed job and skips the summary,
        # so there a failed job returns NaN; other sweepers (Optuna) need the exception to
        # record a failed trial (a returned NaN crashes hydra-optuna-sweeper 1.3).
        raise_failures = hydra_cfg.sweeper._target_ != BASIC_SWEEPER
        result = sweep_job(cfg, run, overrides, wandb_group, wandb_name, dist_ctx)
        if raise_failures and not math.isfinite(result):
            raise JobFailed(f"{run.path}: failed (see its run.json and train.log)")
        return result

    def body() -> float | None:
        return run_training(
            to_train_config(cfg), run, resume=False, wandb_group=wandb_group, wandb_name=wandb_name
        )

    try:
        with run_logging(run if dist_ctx.is_main else None):
            return report_errors(body)
    finally:
        if dist_ctx.is_main:
            if run.is_run():  # for make resume: the same W&B run name again
                run.update_status(overrides=overrides, wandb_group=None, wandb_name=wandb_name)
            discard_unstarted(run)  # bad input leaves no half-made run directory behind


class JobFailed(RuntimeError):
    """A multirun job that failed; its run.json says why."""


def share_cores_between_jobs(hydra_cfg: DictConfig, num_threads: int) -> None:
    """Under a launcher that runs n jobs at once on this machine (joblib's ``n_jobs``), a job
    that leaves ``training.num_threads`` at 0 gets cores / n torch threads instead of PyTorch's
    default of every core, which would make the jobs fight over them."""
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=None)
    if num_threads or not isinstance(n_jobs, int) or n_jobs == 1:
        return
    import os

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
) -> float:
    """One job of a multirun: start, resume or skip its run; never stop the other jobs.

    A job that fails (bad config, bad data, NaN loss) is recorded as failed in its run.json
    and returns NaN; the sweep goes on. A stop on a signal ends the whole sweep (exit 130):
    launching the same command into the same sweep directory continues it.
    """
    try:
        typed = to_train_config(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        if dist_ctx.is_main:
            own.update_status(status=FAILED, error=str(error), overrides=overrides, ended=now())
        return math.nan
    plan = plan_job(own, config_to_dict(typed), overrides) if dist_ctx.is_main else None
    if dist_ctx.enabled:  # every rank trains in rank 0's choice
        import torch.distributed as dist

        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    assert plan is not None
    if plan.action == SKIP:
        print(f"{plan.run.path}: finished already (same config); skipped", file=sys.stderr)
        final = plan.run.read_status().get("final/val_loss")
        return math.nan if final is None else final
    if dist_ctx.is_main:
        plan.run.update_status(
            overrides=overrides, wandb_group=wandb_group, wandb_name=wandb_name
        )
    with run_logging(plan.run if dist_ctx.is_main else None):
        if plan.action == RESUME:
            log.info("%s: unfinished run of the same config; resuming it", plan.run.path)
        try:
            result = run_training(
                typed,
                plan.run,
                resume=plan.action == RESUME,
                resume_note={"sweep_job": own.path.name},
                wandb_group=wandb_group,
                wandb_name=wandb_name,
            )
        except (*USER_ERRORS, FloatingPointError) as error:
            log.error("job failed: %s", error)
            if dist_ctx.is_main:
                plan.run.update_status(status=FAILED, error=str(error), ended=now())
            return math.nan
        except TrainingInterrupted as stop:
            log.warning("%s; the sweep stops here", stop)
            sys.exit(EXIT_INTERRUPTED)
    return math.nan if result is None else result


def main() -> None:
    register_configs()
    hydra.main(config_path=CONF_DIR, config_name="train", version_base=None)(train)()


if __name__ == "__main__":
    main()
