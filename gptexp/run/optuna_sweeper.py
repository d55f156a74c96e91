"""gptexp's Hydra sweeper over Optuna (>= 4): ``hydra/sweeper=optuna``.

It keeps the interface of hydra-optuna-sweeper 1.3 (``hydra.sweeper.params`` in its
search-space syntax, ``direction``, ``n_trials``, ``n_jobs``, ``storage``, ``study_name``,
``sampler`` with its seed, ``max_failure_rate``) and adds what a search of runs that checkpoint
needs:

- **Pruning** (``pruner=median|hyperband|none``): each trial reports ``val/loss`` at every
  evaluation (gptexp.run.optuna_trial); a weak one stops there, saves its checkpoint and ends
  ``pruned``.
- **A study that survives any crash.** The study lives in a database (by default
  ``<sweep dir>/optuna.db``) and trial ``n`` trains as job ``n`` (``<sweep dir>/<n>/``). Relaunched
  with the same command, the sweeper first launches again the trials the database still has
  as running (each job resumes its run from its checkpoint, gptexp.run.sweep, and reports to the
  same trial), then asks for new ones until the study holds ``n_trials``. With a sampler seed,
  trial ``n`` is proposed by a sampler seeded with ``seed + n``: a relaunched search proposes
  what an uninterrupted one would have.

Hydra takes sweepers from the ``hydra_plugins`` namespace package only: the package
``hydra_plugins/gptexp_optuna_sweeper`` (shipped with gptexp) registers the config schema
below and subclasses :class:`OptunaSearch` there.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from gptexp.core.cli import report
from gptexp.core.errors import ConfigError, JobFailed, TrainingPruned
from gptexp.observe.rundir import RunDirectory
from gptexp.run.optuna_trial import (
    PRUNERS,
    SWEEPER_TARGET,
    make_pruner,
    rdb_storage,
    storage_url,
)

log = logging.getLogger(__name__)

GRID_SAMPLER = "optuna.samplers.GridSampler"


# ----------------------------------------------------------------------------- config schema


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"  # needs the cmaes package
    seed: int | None = None
    sigma0: float | None = None
    n_startup_trials: int = 1


@dataclass
class NSGAIISamplerConf:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50


@dataclass
class GridSamplerConf:
    _target_: str = GRID_SAMPLER  # its grid: the choice/range values of the params
    _partial_: bool = True  # the grid is known when the search starts
    seed: int | None = None


SAMPLERS = {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "cmaes": CmaEsSamplerConf,
    "nsgaii": NSGAIISamplerConf,
    "grid": GridSamplerConf,
}


@dataclass
class OptunaSweeperConf:
    _target_: str = SWEEPER_TARGET
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler: tpe, random, cmaes, nsgaii, grid
    direction: str = "minimize"  # or maximize: what the task returns (the final val/loss)
    storage: str | None = None  # a database URL; null: sqlite:///<sweep dir>/optuna.db
    study_name: str | None = None  # null: the sweep directory's name
    n_trials: int = 20  # trials in the study at the end (a relaunch completes them)
    n_jobs: int = 2  # trials launched at once (a parallel launcher runs them side by side)
    max_failure_rate: float = 0.0  # failed trials of a batch beyond this fraction stop the search
    params: dict[str, str] | None = None  # key: search space (choice, range, interval, tag(log))
    pruner: str = "none"  # median, hyperband or none
    pruner_startup_trials: int = 3  # median: finished trials before any is pruned
    pruner_warmup_steps: int = 0  # no pruning before this training step (hyperband: min resource)
    # A function (config, optuna.trial.Trial) -> None that suggests more parameters.
    custom_search_space: str | None = None


def register_sweeper_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="gptexp")
    for name, node in SAMPLERS.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="gptexp")


# ----------------------------------------------------------------------------- search space


def search_space(arguments: list[str]) -> tuple[dict[str, Any], dict[str, str], dict[str, list]]:
    """Hydra overrides -> (Optuna distributions, fixed values, grid values).

    ``choice(a, b)``: categorical; ``range(start, stop, step)``: int or float steps from start
    to stop (both ends, as hydra-optuna-sweeper read it); ``interval(low, high)``: uniform,
    ``tag(log, interval(...))`` log-uniform; anything else is a fixed value for every trial.
    The grid values (for sampler=grid) are Hydra's own sweep values of choice and range.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    grid: dict[str, list] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        name = override.get_key_element()
        if not override.is_sweep_override():
            fixed[name] = override.get_value_element_as_str()
            continue
        value = override.value()
        if override.is_choice_sweep() or (
            override.is_range_sweep() and isinstance(value, RangeSweep) and value.shuffle
        ):
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            distributions[name] = CategoricalDistribution(choices)
            grid[name] = choices
        elif override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            start, stop, step = value.start, value.stop, value.step
            if any(isinstance(x, float) for x in (start, stop, step)):
                distributions[name] = FloatDistribution(start, stop, step=step)
            else:
                distributions[name] = IntDistribution(int(start), int(stop), step=int(step))
            grid[name] = list(override.sweep_iterator(transformer=Transformer.encode))
        elif override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                distributions[name] = IntDistribution(value.start, value.end, log=log_scale)
            else:
                distributions[name] = FloatDistribution(value.start, value.end, log=log_scale)
        else:
            raise ConfigError(f"{_text(override)}: not a search space the Optuna sweeper knows")
    for name in fixed:
        distributions.pop(name, None)
    return distributions, fixed, grid


def _text(override: Override) -> str:
    return override.input_line or override.get_key_element()


def hydra_value(value: Any) -> str:
    """A value as a Hydra override writes it (strings quoted when they need it, None as null)."""
    if value is None:
        return "null"
    if isinstance(value, str) and not value.replace("_", "").replace(".", "").isalnum():
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


# ----------------------------------------------------------------------------- the sweeper


class OptunaSearch(Sweeper):
    """Asks Optuna for trials, launches each as a Hydra job, tells Optuna how it ended."""

    def __init__(
        self,
        sampler: Any,
        direction: str,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        pruner: str,
        pruner_startup_trials: int,
        pruner_warmup_steps: int,
        custom_search_space: str | None,
    ) -> None:
        # ``sampler`` arrives instantiated; each trial gets its own from the config (setup).
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"hydra.sweeper.direction={direction!r}: minimize or maximize")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: 0.0 to 1.0")
        if pruner not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner={pruner!r}: one of {', '.join(PRUNERS)}")
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = max(1, n_jobs)
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.pruner = (pruner, pruner_startup_trials, pruner_warmup_steps)
        self.custom_search_space = custom_search_space

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.sampler_config = config.hydra.sweeper.sampler

    # ------------------------------------------------------------------------- the study

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        listed = [f"{key}={value}" for key, value in (self.params or {}).items()]
        distributions, fixed, grid = search_space([*listed, *arguments])
        self.distributions, self.fixed = distributions, fixed
        self.grid = None
        n_trials = self.n_trials
        if self.sampler_config._target_ == GRID_SAMPLER:
            self.grid = {name: grid[name] for name in distributions if name in grid}
            if len(self.grid) < len(distributions):
                raise ConfigError("sampler=grid takes choice(...) and range(...) params only")
            n_trials = min(n_trials, math.prod(len(v) for v in self.grid.values()))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.url = storage_url(self.storage, self.sweep_dir)
        self.name = self.study_name or self.sweep_dir.name
        self.custom = (
            instantiate({"_target_": self.custom_search_space, "_partial_": True})
            if self.custom_search_space
            else None
        )
        study = optuna.create_study(
            study_name=self.name,
            storage=rdb_storage(self.url),
            sampler=self._sampler(0),
            pruner=make_pruner(*self.pruner),
            direction=self.direction,
            load_if_exists=True,
        )
        report(logging.INFO, f"Optuna study {self.name!r} in {self.url}")
        self.left: set[int] = set()  # running trials another live process trains
        while True:
            batch = self._next_batch(study, n_trials)
            if not batch:
                break
            self._run_batch(study, batch)
        self._report(study)

    def _sampler(self, number: int):
        """Trial ``number``'s sampler: with a seed, seeded ``seed + number`` (a relaunched
        search proposes what an uninterrupted one would have)."""
        kwargs: dict[str, Any] = {}
        if self.sampler_config.get("seed") is not None:
            kwargs["seed"] = int(self.sampler_config.seed) + number
        if self.sampler_config._target_ == GRID_SAMPLER:
            kwargs["search_space"] = self.grid
        sampler = instantiate(self.sampler_config, _convert_="all", **kwargs)
        return sampler() if isinstance(sampler, functools.partial) else sampler

    def _next_batch(self, study, n_trials: int) -> list:
        """Up to n_jobs trials: first those a killed launch left running (they resume), then
        new ones, while the study holds fewer than ``n_trials``. A running trial whose run a
        live process trains (the same search launched twice) is left to that process."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        batch = [t for t in running if t.number not in self.left][: self.n_jobs]
        for trial in batch:
            if RunDirectory(self.sweep_dir / str(trial.number)).is_locked():
                report(logging.INFO, f"trial {trial.number}: another process trains it")
                self.left.add(trial.number)
            else:
                report(logging.INFO, f"trial {trial.number} was running: continuing it")
        batch = [t for t in batch if t.number not in self.left]
        count = len(trials)
        while len(batch) < self.n_jobs and count < n_trials:
            study.sampler = self._sampler(count)
            trial = study.ask(self.distributions)
            if self.custom is not None:
                self.custom(self.config, trial)
            batch.append(trial)
            count += 1
        return batch

    def _overrides(self, trial) -> tuple[str, ...]:
        params = dict(trial.params)
        names = [*self.distributions, *(k for k in params if k not in self.distributions)]
        chosen = [f"{name}={hydra_value(params[name])}" for name in names]
        fixed = [f"{name}={value}" for name, value in self.fixed.items()]
        # The job opens its trial with these (gptexp.run.optuna_trial); Hydra's own node only,
        # so the run's config and overrides are the trial's alone.
        study = [
            f"hydra.sweeper.storage={hydra_value(self.url)}",
            f"hydra.sweeper.study_name={hydra_value(self.name)}",
        ]
        return (*chosen, *fixed, *study)

    def _run_batch(self, study, batch: Sequence) -> None:
        """Launch the batch (trial n as job n, so contiguous numbers go in one launch) and
        tell Optuna each result."""
        from optuna.trial import TrialState

        batch = sorted(batch, key=lambda t: t.number)
        groups: list[list] = []
        for trial in batch:
            if groups and groups[-1][-1].number + 1 == trial.number:
                groups[-1].append(trial)
            else:
                groups.append([trial])
        failures = []
        for group in groups:
            overrides = [self._overrides(trial) for trial in group]
            returns = self.launcher.launch(overrides, initial_job_idx=group[0].number)
            for trial, ret in zip(group, returns, strict=True):
                outcome = ret._return_value  # the value, or the job's exception
                if isinstance(outcome, TrainingPruned):
                    self._tell(study, trial.number, state=TrialState.PRUNED)
                    report(logging.INFO, f"trial {trial.number}: {outcome}")
                elif isinstance(outcome, BaseException) or not _finite(outcome):
                    self._tell(study, trial.number, state=TrialState.FAIL)
                    report(logging.WARNING, f"trial {trial.number} failed: {outcome}")
                    failures.append(trial.number)
                else:
                    self._tell(study, trial.number, float(outcome))
        if failures and len(failures) / len(batch) > self.max_failure_rate:
            raise JobFailed(
                f"trials {', '.join(map(str, failures))} failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate} of their batch"
            )

    def _tell(self, study, number: int, *args: Any, **kwargs: Any) -> None:
        try:
            study.tell(number, *args, **kwargs)
        except RuntimeError as error:
            # GridSampler asks the study to stop once its grid is covered, which only
            # study.optimize can do; the result is stored by then, and n_trials ends the search.
            if self.grid is None or "Study.stop" not in str(error):
                raise

    def _report(self, study) -> None:
        """optimization_results.yaml (as hydra-optuna-sweeper wrote it) and one line each:
        the trials, where the pruned ones stopped, the best."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {
            state.name.lower(): sum(t.state == state for t in trials)
            for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        line = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        report(logging.INFO, f"study {self.name!r}: {len(trials)} trials ({line})")
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        if pruned:
            where = ", ".join(f"{t.number} at step {t.last_step}" for t in pruned)
            report(logging.INFO, f"pruned: {where}")
        results: dict[str, Any] = {"name": "optuna"}
        if counts["complete"]:
            best = study.best_trial
            results |= {"best_params": best.params, "best_value": best.value}
            params = ", ".join(f"{k}={v}" for k, v in best.params.items())
            report(logging.INFO, f"best: trial {best.number}, {best.value:.4f} with {params}")
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        report(logging.INFO, f"dashboard: optuna-dashboard {self.url}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
