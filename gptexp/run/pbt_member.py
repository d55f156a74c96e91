"""The member side of gptexp's population-based training (gptexp.run.pbt_sweeper): one Hydra
job trains one member of the population through one round.

The sweeper launches member ``i`` of round ``r`` with its hyperparameters and
``training.max_steps=(r + 1) * steps_per_round`` as the job's overrides, the member's run
directory as ``hydra.sweep.subdir`` and ``hydra.sweeper.job={member: i, parent: <run>, step:
<s>}`` (``parent``: the run, in the sweep directory, that the member's run was forked from at
step ``s``; null for a run of round 0). The job then:

- continues a run that has a checkpoint: an exact resume, ``max_steps`` raised;
- starts a run that has none: a new run in round 0, else the fork of ``parent`` at step ``s``
  (the round's exploit; exact as every fork, its config the member's with the parent's
  checkpoint).

A run killed at any instant is found in the same place by the relaunched sweep and goes on the
same way. Before it trains in a run that is there already, the job checks that the run is the
member's: its fork link and its config (all but ``max_steps``) are the ones the sweep gives.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from gptexp.checkpoint.stored import load_run_checkpoint
from gptexp.core.cli import command_logging
from gptexp.core.config import TrainConfig, config_to_dict, to_train_config
from gptexp.core.errors import USER_ERRORS, ConfigError, RunError, RunFailed
from gptexp.model.hf import resolve_init_from
from gptexp.observe.lineage import fork_parent
from gptexp.observe.metrics import config_diff
from gptexp.observe.rundir import FAILED, RunDirectory, now, stored_config
from gptexp.run.forking import fork_start
from gptexp.run.optuna_sweeper import hydra_value
from gptexp.run.session import overridden_config, reached_step, run_training
from gptexp.run.starts import Resume, Start, new_run
from gptexp.training.runtime import Distributed

log = logging.getLogger(__name__)

# Hydra instantiates sweepers from the hydra_plugins package only: there, a thin subclass of
# gptexp.run.pbt_sweeper.PBTSearch.
SWEEPER_TARGET = "hydra_plugins.gptexp_pbt_sweeper.pbt_sweeper.PBTSweeper"
MAX_STEPS = "training.max_steps"  # each round's, set by the sweeper


@dataclass(frozen=True)
class MemberJob:
    """What the sweeper tells a job besides its overrides (``hydra.sweeper.job``)."""

    member: int
    parent: str | None  # the name of the run in the sweep directory this run was forked from
    step: int  # the parent's step the fork starts from (0 for a run of round 0)

    def override(self) -> str:
        """The job's ``hydra.sweeper.job=...`` override."""
        parent = "null" if self.parent is None else "'" + self.parent.replace("'", "\\'") + "'"
        return f"hydra.sweeper.job={{member:{self.member},parent:{parent},step:{self.step}}}"


def member_job(hydra_cfg: DictConfig) -> MemberJob | None:
    """For a job of gptexp's PBT sweeper: the member it trains; None for any other job."""
    sweeper = hydra_cfg.sweeper
    if sweeper.get("_target_") != SWEEPER_TARGET or sweeper.job.member is None:
        return None
    return MemberJob(int(sweeper.job.member), sweeper.job.parent, int(sweeper.job.step))


def pbt_member_job(
    cfg: DictConfig,
    own: RunDirectory,
    overrides: list[str],
    job: MemberJob,
    wandb_group: str | None,
    dist_ctx: Distributed,
) -> float:
    """Train member ``job.member`` for its round in ``own`` (see the module docstring).

    A member that fails (bad config, NaN loss, a run in its place that is not its own) returns
    NaN: the sweeper ranks it last. What went wrong is in the job's log, and in its run.json
    when the run had started (a run that is not the member's is not written to). A stop on a
    signal ends the sweep (exit 130); the same command continues it.
    """
    with contextlib.ExitStack() as claim:
        if dist_ctx.is_main:
            try:
                claim.enter_context(own.lock())
            except RunError as error:
                print(f"error: {error}", file=sys.stderr)
                return math.nan
        with command_logging(own.log_file if dist_ctx.is_main else None):
            try:
                typed = resolve_init_from(to_train_config(cfg), overrides)
                start = member_start(typed, own, job)
            except USER_ERRORS as error:
                log.error("member %d cannot train: %s", job.member, error)
                return math.nan
            try:
                result = run_training(
                    typed,
                    own,
                    start,
                    wandb_group=wandb_group,
                    wandb_name=own.path.name,
                    locked=True,
                )
            except (*USER_ERRORS, FloatingPointError, RunFailed) as error:
                log.error("member %d failed: %s", job.member, error)
                if dist_ctx.is_main and own.has_started():
                    own.update_status(status=FAILED, error=str(error), ended=now())
                return math.nan
    return math.nan if result is None else result


def member_start(cfg: TrainConfig, own: RunDirectory, job: MemberJob) -> Start:
    """How the member's run goes on this round: a resume when it has a checkpoint; else its
    first start, a new run (round 0) or the fork of its parent."""
    parent = None if job.parent is None else RunDirectory(own.path.parent / job.parent)
    first = new_run if parent is None else lambda _: exploit(parent, job.step, cfg)
    status = own.read_status()
    recorded = status.get("config")
    if not isinstance(recorded, dict):  # it never trained: the member's first start
        return first(cfg)
    check_own_run(own, status, recorded, cfg, parent, job)
    return Resume({"pbt_member": job.member}, instead=first)


def exploit(parent: RunDirectory, step: int, cfg: TrainConfig) -> Start:
    """The start of a fork member's run: the fork of ``parent`` at ``step`` whose config is the
    member's, as Hydra composed it; its overrides are the keys in which that differs from the
    parent's (the hyperparameters, ``max_steps``, and whatever else follows from them)."""
    wanted = config_to_dict(cfg)
    differ = config_diff(stored_config(parent), wanted)
    changed = [f"{key}={hydra_value(new)}" for key, (_, new) in differ.items() if key != MAX_STEPS]
    changed.append(f"{MAX_STEPS}={cfg.training.max_steps}")
    fork_cfg, changes = overridden_config(parent, changed, fork=True)
    mismatch = sorted(config_diff(config_to_dict(fork_cfg), wanted))
    if mismatch:
        raise ConfigError(
            f"{parent.path}: a fork of it cannot have this member's config "
            f"({', '.join(mismatch)} differ); it is not a run of this sweep"
        )
    return fork_start(parent, load_run_checkpoint(parent, str(step)), fork_cfg, changes, changed)


def check_own_run(
    own: RunDirectory,
    status: dict[str, Any],
    recorded: dict[str, Any],
    cfg: TrainConfig,
    parent: RunDirectory | None,
    job: MemberJob,
) -> None:
    """A RunError unless the run in the member's place is the member's: forked from the parent
    the sweep names at its step (or from none), of the member's config but for max_steps, and
    not past this round's end."""
    link = fork_parent(status)
    found = None if link is None else (link["run"], link["step"])
    expected = None if parent is None else (str(parent.path), job.step)
    if found != expected:
        said = "no fork" if found is None else f"a fork of {found[0]} at step {found[1]}"
        wanted = "no fork" if expected is None else f"a fork of {expected[0]} at step {job.step}"
        raise RunError(
            f"{own.path}: holds {said}, where this sweep's member {job.member} is {wanted}; "
            "launch the sweep into another hydra.sweep.dir"
        )
    differ = sorted(set(config_diff(recorded, config_to_dict(cfg))) - {MAX_STEPS})
    if differ:
        raise RunError(
            f"{own.path}: holds a run of another config than member {job.member}'s "
            f"({', '.join(differ)}); launch the sweep into another hydra.sweep.dir"
        )
    step = reached_step(own, cfg)
    if step is not None and step > cfg.training.max_steps:
        raise RunError(
            f"{own.path}: at step {step}, past this round's end ({cfg.training.max_steps}); "
            "launch the sweep into another hydra.sweep.dir"
        )
