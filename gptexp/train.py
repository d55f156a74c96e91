"""``python -m gptexp.train [overrides]``: compose the config with Hydra, then train.

A thin entry: Hydra composes ``gptexp/conf/train.yaml`` (shipped inside the package) over the
typed schema, the config becomes typed dataclasses once, here, and
:func:`gptexp.run.session.run_training` does the rest. The
return value is the final validation loss, which Hydra's sweepers (Optuna) minimise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gptexp.core.cli import command_logging, run_command
from gptexp.core.config import CONF_DIR, parse_overrides, register_configs, to_train_config
from gptexp.core.errors import JobFailed, RunError, resume_hint
from gptexp.core.fsio import TMP_SUFFIX
from gptexp.model.hf import resolve_init_from
from gptexp.observe.rundir import RunDirectory, discard_unstarted
from gptexp.run.optuna_trial import trial_reporter
from gptexp.run.pbt_member import member_job, pbt_member_job
from gptexp.run.requeue import prefer_sigusr1
from gptexp.run.session import run_training
from gptexp.run.starts import new_run
from gptexp.run.sweep import BASIC_SWEEPER, share_cores_between_jobs, sweep_job
from gptexp.training.runtime import Distributed, init_distributed
from gptexp.training.speed import prepare_command_process

log = logging.getLogger(__name__)


def task_config(config: DictConfig) -> DictConfig:
    """The composed config without Hydra's own node."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


class ValidateBeforeRun(Callback):
    """Checks a single run before Hydra creates its directory or writes any file there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_command(lambda: self.validate(config))
        run_command(lambda: self.check_writable(config))

    @staticmethod
    def check_writable(config: DictConfig) -> None:
        """Write a file of the composed config's size where Hydra is about to write its own, and
        remove it: a full disk or a read-only directory is then one line (exit 1) here, not
        Hydra's traceback. Folders this made stay only when the check passed."""
        directory = Path(config.hydra.run.dir)
        if config.hydra.output_subdir is not None:
            directory = directory / str(config.hydra.output_subdir)
        missing = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
        probe = directory / f".write-check-{os.getpid()}{TMP_SUFFIX}"
        made: list[Path] = []  # by this process: under torchrun every rank checks at once
        try:
            for folder in missing:
                with contextlib.suppress(FileExistsError):  # another rank's: not ours to remove
                    folder.mkdir()
                    made.append(folder)
            with open(probe, "x", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(task_config(config)))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            probe.unlink(missing_ok=True)
            for folder in reversed(made):  # only the folders made here, each if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        probe.unlink()

    @staticmethod
    def validate(config: DictConfig) -> None:
        to_train_config(task_config(config))
        run = RunDirectory(config.hydra.run.dir)
        # run.json, not Hydra's files: under torchrun every rank's Hydra writes .hydra/ there.
        if run.has_started() or run.is_locked():
            raise RunError(
                f"{run.path} already holds a run; continue it with "
                f"{resume_hint(run.path)} (or choose another hydra.run.dir)"
            )


def _shared_run_dir(own: Path, dist_ctx: Distributed) -> Path:
    """Under torchrun every rank composes its own config; all use rank 0's directory."""
    shared = Path(dist_ctx.broadcast(str(own)))
    if shared != own:
        # This rank's Hydra made ``own``; another launch may have chosen it too: under its
        # lock, or not at all.
        with contextlib.suppress(RunError), RunDirectory(own).lock():
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
        # so there a failed job returns NaN; other sweepers (Optuna) record the exception as
        # a failed trial, with the job's message.
        raise_failures = hydra_cfg.sweeper._target_ != BASIC_SWEEPER
        report_to = trial_reporter(hydra_cfg)  # a trial of gptexp's Optuna sweeper, or None
        member = member_job(hydra_cfg)  # a member of gptexp's PBT sweeper, or None
        if member is not None:
            result = run_command(
                lambda: pbt_member_job(cfg, run, overrides, member, wandb_group, dist_ctx)
            )
        else:
            result = run_command(
                lambda: sweep_job(cfg, run, overrides, wandb_group, wandb_name, dist_ctx, report_to)
            )
        if raise_failures and not math.isfinite(result):
            raise JobFailed(f"{run.path}: failed (see its run.json and train.log)")
        return result

    def body() -> float | None:
        # Two launches into one new directory: the one that does not get the lock leaves with
        # a RunError and touches nothing (the files there are the winner's). The one that
        # holds it cleans up after bad input while it still holds it, so that no other launch
        # can be between its files.
        with run.lock() if dist_ctx.is_main else contextlib.nullcontext():
            try:
                # model.init_from: the source's shape goes into the config the run stores.
                typed = resolve_init_from(to_train_config(cfg), overrides)
                return run_training(
                    typed,
                    run,
                    new_run(typed),
                    wandb_group=wandb_group,
                    wandb_name=wandb_name,
                    locked=True,
                )
            finally:
                if dist_ctx.is_main:
                    if run.has_started():  # what the launch changed, for compare and sweeps
                        run.update_status(overrides=overrides)
                    discard_unstarted(run)  # bad input leaves no half-made run directory

    with command_logging(run.log_file if dist_ctx.is_main else None):
        return run_command(body)


def check_command_line(argv: list[str]) -> None:
    """The overrides' keys and group options, before Hydra composes (see
    gptexp.core.config.parse_overrides): a typo is bad input with one line, not Hydra's failure."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    parse_overrides(
        args.overrides,
        tuple(filter(None, [args.config_dir])),
        options_known=not (args.config_path or args.config_name),  # another primary config
    )


def main() -> None:
    prepare_command_process()  # gptexp.training.speed: reproducible matmuls, a quiet collector
    prefer_sigusr1()  # SLURM's pre-timeout signal for submitit jobs (gptexp.run.requeue)
    run_command(lambda: check_command_line(sys.argv[1:]))
    register_configs()
    hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)(train)()


if __name__ == "__main__":
    main()
