"""``python -m gptexp.train [overrides]``: compose the config with Hydra, then train.

A thin entry: Hydra composes ``gptexp/conf/train.yaml`` (shipped inside the package) over the
typed schema, the config becomes typed dataclasses once, here, and
:func:`gptexp.session.run_training` does the rest. The
return value is the final validation loss, which Hydra's sweepers (Optuna) minimise.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gptexp.cli import command_logging, run_command
from gptexp.config import CONF_DIR, register_configs, to_train_config
from gptexp.errors import JobFailed, RunError
from gptexp.hf import resolve_init_from
from gptexp.process_tuning import freeze_imported_objects, reproducible_blas
from gptexp.requeue import prefer_sigusr1
from gptexp.rundir import RunDirectory, discard_unstarted
from gptexp.runtime import Distributed, init_distributed
from gptexp.session import run_training
from gptexp.sweep import BASIC_SWEEPER, share_cores_between_jobs, sweep_job

log = logging.getLogger(__name__)


def task_config(config: DictConfig) -> DictConfig:
    """The composed config without Hydra's own node."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


class ValidateBeforeRun(Callback):
    """Checks a single run before Hydra creates its directory or writes any file there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_command(lambda: self.validate(config))

    @staticmethod
    def validate(config: DictConfig) -> None:
        to_train_config(task_config(config))
        run = RunDirectory(config.hydra.run.dir)
        # run.json, not Hydra's files: under torchrun every rank's Hydra writes .hydra/ there.
        if run.has_started():
            raise RunError(
                f"{run.path} already holds a run; continue it with "
                f"make resume RUN={run.path} (or choose another hydra.run.dir)"
            )


def _shared_run_dir(own: Path, dist_ctx: Distributed) -> Path:
    """Under torchrun every rank composes its own config; all use rank 0's directory."""
    shared = Path(dist_ctx.broadcast(str(own)))
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
        result = run_command(
            lambda: sweep_job(cfg, run, overrides, wandb_group, wandb_name, dist_ctx)
        )
        if raise_failures and not math.isfinite(result):
            raise JobFailed(f"{run.path}: failed (see its run.json and train.log)")
        return result

    def body() -> float | None:
        # model.init_from: the source's shape goes into the config the run stores.
        typed = resolve_init_from(to_train_config(cfg), overrides)
        return run_training(
            typed, run, resume=False, wandb_group=wandb_group, wandb_name=wandb_name
        )

    try:
        with command_logging(run.log_file if dist_ctx.is_main else None):
            return run_command(body)
    finally:
        if dist_ctx.is_main:
            if run.has_started():  # what the launch changed, for compare and sweeps
                run.update_status(overrides=overrides)
            discard_unstarted(run)  # bad input leaves no half-made run directory behind


def main() -> None:
    reproducible_blas()  # gptexp.process_tuning: before the first matmul, which reads it
    freeze_imported_objects()  # gptexp.process_tuning: no collection walks torch's modules
    prefer_sigusr1()  # SLURM's pre-timeout signal for submitit jobs (gptexp.requeue)
    register_configs()
    hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)(train)()


if __name__ == "__main__":
    main()
