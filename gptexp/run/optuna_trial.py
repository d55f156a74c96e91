"""The trial side of gptexp's Optuna search: a job reports ``val/loss`` at every evaluation to
its Optuna trial, and stops as ``pruned`` when the study's pruner says so.

The sweeper (gptexp.run.optuna_sweeper) launches trial ``n`` as Hydra job ``n`` and hands every
job the study's storage URL and name as Hydra overrides; the job opens the same trial there,
so reports reach it from any launcher process (joblib, SLURM) and a trial resumed after a crash
reports to the trial number it had. What is shared by both sides lives here: the storage and
the pruner. Optuna is imported only when a trial starts (a plain run never loads it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gptexp.core.errors import ConfigError
from gptexp.observe.metrics import STEP, VAL_LOSS, is_number
from gptexp.training.runtime import StopRequest

log = logging.getLogger(__name__)

# Hydra instantiates sweepers from the hydra_plugins package only: there, a thin subclass of
# gptexp.run.optuna_sweeper.OptunaSearch.
SWEEPER_TARGET = "hydra_plugins.gptexp_optuna_sweeper.optuna_sweeper.OptunaSweeper"
PRUNERS = ("median", "hyperband", "none")
SQLITE = "sqlite:///"
STUDY_FILE = "optuna.db"  # the study's default storage, in the sweep directory
SQLITE_TIMEOUT_S = 60  # parallel trials write to one sqlite file: wait for its lock


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage URL: ``<sweep dir>/optuna.db`` by default; a relative sqlite path
    made absolute, so that jobs started elsewhere (SLURM) open the same file."""
    if storage is None:
        return SQLITE + str((sweep_dir / STUDY_FILE).absolute())
    if storage.startswith(SQLITE):
        path = storage[len(SQLITE) :]
        if path in ("", ":memory:"):
            raise ConfigError(
                f"hydra.sweeper.storage={storage!r}: a search's trials run in other processes "
                "and need a database file; leave it null (<sweep dir>/optuna.db) or give "
                "sqlite:///path/to/optuna.db"
            )
        return SQLITE + str(Path(path).absolute())
    return storage


def rdb_storage(url: str):
    import optuna

    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith(SQLITE) else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_pruner(name: str, startup_trials: int, warmup_steps: int):
    """``median``: a trial stops at an evaluation where its best val/loss so far is worse than
    the median of the finished trials' at that step (once ``startup_trials`` have finished, and
    not before training step ``warmup_steps``); ``hyperband``: Optuna's HyperbandPruner over
    training steps; ``none``: trials report, nothing stops them."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=startup_trials, n_warmup_steps=warmup_steps
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_steps))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hydra.sweeper.pruner={name!r}: must be one of {', '.join(PRUNERS)}")


class TrialReporter:
    """A metrics sink: each evaluation's ``val/loss`` goes to the trial as an intermediate
    value at its training step; when the pruner says so, the run is asked to stop after this
    step (it saves a checkpoint and ends ``pruned``, as on a signal)."""

    def __init__(self, trial, stop: StopRequest, reported: set[int]) -> None:
        """``reported``: the steps the trial holds already. A trial resumed after a crash may
        have reported some (the same values: the run resumes exactly); Optuna would warn
        about each, so they are not reported again."""
        self.trial = trial
        self.stop = stop
        self.reported = reported

    def log(self, record: dict[str, Any]) -> None:
        step, value = record[STEP], record.get(VAL_LOSS)
        if step == 0 or not is_number(value):  # step 0: untrained, the same for every trial
            return
        if step not in self.reported:
            self.trial.report(value, step)
            self.reported.add(step)
        if self.trial.should_prune():
            log.warning(
                "trial %d: val/loss %.4f at step %d is weak; the pruner stops it here",
                self.trial.number,
                value,
                step,
            )
            self.stop.request(StopRequest.PRUNER)


def trial_reporter(hydra_cfg: DictConfig) -> Callable[[StopRequest], TrialReporter] | None:
    """For a job of gptexp's Optuna sweeper: what makes its trial's reporter once training
    starts (trial number = job number); None for any other multirun job."""
    sweeper = hydra_cfg.sweeper
    if sweeper.get("_target_") != SWEEPER_TARGET:
        return None
    number = int(hydra_cfg.job.num)
    url, name = str(sweeper.storage), str(sweeper.study_name)
    pruner = (str(sweeper.pruner), sweeper.pruner_startup_trials, sweeper.pruner_warmup_steps)

    def attach(stop: StopRequest) -> TrialReporter:
        import optuna

        storage = rdb_storage(url)
        study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(*pruner))
        study_id = storage.get_study_id_from_name(name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        reported = set(storage.get_trial(trial_id).intermediate_values)
        return TrialReporter(optuna.trial.Trial(study, trial_id), stop, reported)

    return attach
