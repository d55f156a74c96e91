"""gptexp's exact population-based training as a Hydra sweeper: ``hydra/sweeper=pbt``
(``experiment=pbt``).

A population of ``population`` members trains in ``rounds`` rounds of ``steps_per_round``
steps. Round 0 samples each member's hyperparameters from ``params`` with a generator seeded
by ``seed``. After each round the members are ranked by the round's final ``val/loss`` (lower
is better; a failed or diverged member is last; ties go to the lower member number): the worst
quarter (at least one) become forks of the best member's checkpoint at the round's end, with
its hyperparameters perturbed (numbers times one of ``perturb``'s factors, 0.8 or 1.25 by
default, kept in their range; a choice moves to a neighbour), and the others continue their
own runs. Each round is one launch of the configured launcher (serial, joblib, SLURM); every
member trains as a Hydra job (gptexp.run.pbt_member) in its run directory ``r<round>-m<member>``
(the round in which the run began).

**Exact.** The generator of round ``r`` is seeded with ``(seed, r)``, resumes and forks are
bit-exact, so a launch with the same seed gives the same population, scores and weights.
**A sweep that survives any crash.** ``<sweep dir>/pbt.json`` is written atomically after
every round; but a relaunch trusts nothing in it: it plans every round again from the seed and
the runs, finds each member's run (checked: its fork link and hyperparameters are the plan's,
its config, but for ``max_steps``, the one this launch gives the member's job),
takes the result of a member that holds it (a checkpoint and a ``val/loss`` at the round's end)
and launches the others, which resume where they stopped. A pbt.json that is damaged or tells
another story than the runs is named in one line and left as it is (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from gptexp.checkpoint.manager import run_checkpoints
from gptexp.core.cli import report, run_command
from gptexp.core.config import check_key, config_to_dict, to_train_config
from gptexp.core.errors import CheckpointError, ConfigError, JobFailed, RunError
from gptexp.core.fsio import atomic_write_json
from gptexp.model.hf import resolve_init_from
from gptexp.observe.lineage import fork_parent
from gptexp.observe.metrics import (
    INHERITED,
    STEP,
    VAL_LOSS,
    config_diff,
    is_number,
    read_metrics,
)
from gptexp.observe.rundir import RunDirectory, read_json_object
from gptexp.run.optuna_sweeper import hydra_value
from gptexp.run.pbt_member import MAX_STEPS, SWEEPER_TARGET, MemberJob

log = logging.getLogger(__name__)

RECORD = "pbt.json"
DEFAULT_FACTORS = (0.8, 1.25)
KEEP_EVERY = "checkpoint.keep_every"  # every round's end stays: forks start there


# ----------------------------------------------------------------------------- config schema


@dataclass
class MemberJobConf:
    """gptexp.run.pbt_member.MemberJob in the job's config (none outside a member's job)."""

    member: int | None = None
    parent: str | None = None
    step: int = 0


@dataclass
class PBTSweeperConf:
    _target_: str = SWEEPER_TARGET
    population: int = 4  # members (at least 2)
    rounds: int = 3  # rounds of steps_per_round training steps each
    steps_per_round: int = 100
    seed: int = 0  # seeds the sampling and the perturbations
    # key: tag(log, interval(low, high)) | interval(low, high) | choice(a, b, ...)
    params: dict[str, str] | None = None
    perturb: dict[str, list[float]] | None = None  # key: factors (default 0.8, 1.25)
    job: MemberJobConf = field(default_factory=MemberJobConf)  # each member's, set by the sweeper


def register_sweeper_configs() -> None:
    ConfigStore.instance().store(
        group="hydra/sweeper", name="pbt", node=PBTSweeperConf, provider="gptexp"
    )


# ----------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Space:
    """One hyperparameter: a number in ``[low, high]`` (uniform, or log-uniform when ``log``;
    an integer when both ends are) or one of ``choices``; ``factors``: its perturbation."""

    key: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    choices: tuple = ()
    factors: tuple[float, ...] = DEFAULT_FACTORS

    def sample(self, rng: random.Random) -> Any:
        if self.choices:
            return self.choices[rng.randrange(len(self.choices))]
        if self.integer:
            return rng.randint(int(self.low), int(self.high))
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def perturb(self, value: Any, rng: random.Random) -> Any:
        """A choice moves to a neighbour; a number is multiplied by one of the factors and
        kept in its range."""
        if self.choices:
            index = self.choices.index(value) + rng.choice((-1, 1))
            return self.choices[min(max(index, 0), len(self.choices) - 1)]
        moved = min(max(value * rng.choice(self.factors), self.low), self.high)
        return round(moved) if self.integer else moved


def search_space(
    params: dict[str, str], perturb: dict[str, list[float]], arguments: list[str]
) -> tuple[list[Space], list[str]]:
    """The spaces of ``params`` and of the sweeps among the command line's ``arguments``
    (Hydra's grammar, as the Optuna sweeper reads them), and the other arguments (fixed for
    every member; a key given a value there is not searched). ConfigError names a key that is
    not a ``training`` key a fork may change, a bad range, a perturbation of no parameter."""
    listed = [f"{key}={value}" for key, value in params.items()]
    spaces: dict[str, Space] = {}
    fixed: list[str] = []
    parser = OverridesParser.create()
    for item in [*listed, *arguments]:
        try:
            override = parser.parse_override(item)
        except HydraException as error:
            raise ConfigError(f"{item!r}: not an override ({str(error).splitlines()[0]})") from None
        key = override.key_or_group
        if key in (MAX_STEPS, KEEP_EVERY):
            raise ConfigError(
                f"{item}: the PBT sweeper sets {key} (rounds x steps_per_round; every round's "
                "end is kept); set hydra.sweeper.rounds and hydra.sweeper.steps_per_round"
            )
        if not override.is_sweep_override():
            if item in listed:
                raise ConfigError(
                    f"hydra.sweeper.params.{key}={override.get_value_element_as_str()}: not a "
                    "search space; give interval(low, high), tag(log, interval(low, high)) or "
                    "choice(a, b, ...)"
                )
            fixed.append(item)
            spaces.pop(key, None)  # a value given on the command line is not searched
            continue
        check_key(key)
        if key.split(".")[0] != "training":
            raise ConfigError(
                f"hydra.sweeper.params: {key}: PBT searches training.* keys (a fork keeps its "
                "parent's model and data)"
            )
        spaces[key] = _space(item, key, override)
    if not spaces:
        raise ConfigError(
            "hydra.sweeper.params: no hyperparameter to search; e.g. "
            "hydra.sweeper.params={training.lr:'tag(log, interval(1e-4, 3e-2))'} "
            "(experiment=pbt has it)"
        )
    fixed_keys = {item.partition("=")[0] for item in fixed}
    for key, factors in perturb.items():
        if key in fixed_keys:
            continue
        if key not in spaces:
            raise ConfigError(
                f"hydra.sweeper.perturb.{key}: not a searched parameter ({', '.join(spaces)})"
            )
        if not factors or not all(is_number(f) and f > 0 and math.isfinite(f) for f in factors):
            raise ConfigError(
                f"hydra.sweeper.perturb.{key}={list(factors)}: give positive factors, "
                "e.g. [0.8, 1.25]"
            )
        spaces[key] = dataclasses.replace(spaces[key], factors=tuple(factors))
    return list(spaces.values()), fixed


def _space(item: str, key: str, override: Any) -> Space:
    if override.is_choice_sweep() or override.is_range_sweep():
        choices = tuple(override.sweep_iterator())
        if not choices or not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise ConfigError(f"{item}: choices must be numbers or strings")
        return Space(key, choices=choices)
    value = override.value()
    if not isinstance(value, IntervalSweep):
        raise ConfigError(f"{item}: not a search space the PBT sweeper knows")
    low, high, log_scale = value.start, value.end, "log" in value.tags
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{item}: a range needs low < high")
    if log_scale and low <= 0:
        raise ConfigError(f"{item}: a log range needs low > 0")
    integer = isinstance(low, int) and isinstance(high, int)
    return Space(key, float(low), float(high), log_scale, integer)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Member:
    """One member in one round: the run it trains in, the run that run was forked from and
    the step it was forked at (none for a run of round 0), its hyperparameters, its score."""

    member: int
    run: str
    parent: str | None
    step: int
    params: dict[str, Any]
    score: float | None = None

    def record(self) -> dict[str, Any]:
        """The member's entry in pbt.json."""
        return {
            "member": self.member,
            "run": self.run,
            "parent": self.parent,
            "params": self.params,
            "score": self.score,
        }


def run_name(round_: int, member: int) -> str:
    return f"r{round_}-m{member}"


def ranking(members: list[Member]) -> list[Member]:
    """Best first: lower score, a member without one last, ties by member number."""
    return sorted(members, key=lambda m: (m.score is None, m.score or 0.0, m.member))


def plan_round(
    round_: int, previous: list[Member], spaces: list[Space], seed: int, steps: int
) -> list[Member]:
    """Round ``round_``'s members: sampled in round 0; after it, the worst quarter forks the
    best of ``previous`` at the round's first step with perturbed hyperparameters."""
    rng = random.Random(f"gptexp-pbt:{seed}:{round_}")  # str seeds hash with sha512: stable
    if round_ == 0:
        return [
            Member(i, run_name(0, i), None, 0, {s.key: s.sample(rng) for s in spaces})
            for i in range(len(previous))
        ]
    ranked = ranking(previous)
    best, worst = ranked[0], ranked[-max(1, len(ranked) // 4) :]
    replaced = {m.member for m in worst}
    members = []
    for old in previous:
        if old.member in replaced:
            params = {s.key: s.perturb(best.params[s.key], rng) for s in spaces}
            members.append(
                Member(old.member, run_name(round_, old.member), best.run, round_ * steps, params)
            )
        else:
            members.append(Member(old.member, old.run, old.parent, old.step, dict(old.params)))
    return members


# ----------------------------------------------------------------------------- the runs


PENDING = object()  # a member whose run does not hold the round's result yet


def round_result(sweep_dir: Path, member: Member, target: int, steps: int) -> float | None | object:
    """The member's score at step ``target`` from its run (the ``val/loss`` of that step, with
    the checkpoint the next round continues or forks from), or PENDING. A run in the member's
    place that is not the member's (another fork link, other hyperparameters, rounds of another
    length than this launch's ``steps``) is a RunError: the sweep directory holds another
    sweep."""
    run = RunDirectory(sweep_dir / member.run)
    status = run.read_status()
    config = status.get("config")
    if not isinstance(config, dict):
        return PENDING
    link = fork_parent(status)
    found = None if link is None else (Path(link["run"]), link["step"])
    expected = None if member.parent is None else ((sweep_dir / member.parent), member.step)
    recorded = {key: _select(config, key) for key in member.params}
    if found != expected or recorded != member.params:
        differ = (
            f"it is {_link(found)}, the member {_link(expected)}"
            if found != expected
            else f"its hyperparameters are {recorded}, the member's {member.params}"
        )
        raise RunError(
            f"{run.path}: not the run of this sweep's member {member.member} ({differ}); "
            "launch into another hydra.sweep.dir"
        )
    trained = _select(config, KEEP_EVERY)  # the sweeper sets it to steps_per_round
    if trained != steps:
        raise RunError(
            f"{run.path}: trained in rounds of {trained} steps (its {KEEP_EVERY}), this launch "
            f"has hydra.sweeper.steps_per_round={steps}; relaunch with steps_per_round="
            f"{trained}, or launch into another hydra.sweep.dir"
        )
    try:
        files = {entry.step: entry.file for entry in run_checkpoints(run).entries()}
    except CheckpointError:
        return PENDING  # the member's job resumes it or says what is wrong
    if target not in files or not (run.checkpoints / files[target]).exists():
        return PENDING
    scores = [
        r[VAL_LOSS]
        for r in read_metrics(run.metrics)
        if r[STEP] == target and VAL_LOSS in r and not r.get(INHERITED)
    ]
    if not scores:
        return PENDING
    return float(scores[-1]) if math.isfinite(scores[-1]) else None


def _link(link: tuple[Path, int] | None) -> str:
    return "no fork" if link is None else f"a fork of {link[0]} at step {link[1]}"


def _select(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# ----------------------------------------------------------------------------- pbt.json


def read_record(path: Path) -> dict[str, Any] | None:
    """The pbt.json a launch of the sweep wrote (None: there is none); a RunError naming it when
    it is not one this sweeper writes."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise RunError(f"{path}: not a file; move it away to continue the sweep")
    try:
        record = read_json_object(path)
    except RunError as error:
        raise RunError(
            f"{error}; it is left as it is: move it away to continue the sweep"
        ) from None
    rounds = record.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise RunError(f"{path}: damaged (no list of rounds); move it away to continue the sweep")
    return record


def without_scores(entry: dict[str, Any]) -> dict[str, Any]:
    """A round of pbt.json as its plan decides it, before training: without the scores."""
    members = entry.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        return entry
    return {**entry, "members": [{k: v for k, v in m.items() if k != "score"} for m in members]}


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------- the sweeper


class PBTSearch(Sweeper):
    """Plans each round, launches its members as Hydra jobs, ranks them, writes pbt.json."""

    def __init__(
        self,
        population: int,
        rounds: int,
        steps_per_round: int,
        seed: int,
        params: DictConfig | None,
        perturb: DictConfig | None,
        job: Any = None,
    ) -> None:
        self.population = population
        self.rounds = rounds
        self.steps = steps_per_round
        self.seed = seed
        self.params = dict(params or {})
        self.perturb = {k: list(v) for k, v in (perturb or {}).items()}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()
        self.config_loader = hydra_context.config_loader  # each member's config, as its job's

    def sweep(self, arguments: list[str]) -> None:
        run_command(lambda: self.search(arguments))

    def check(self) -> None:
        for key, least in (("population", 2), ("rounds", 1), ("steps_per_round", 1)):
            value = getattr(self, "steps" if key == "steps_per_round" else key)
            if not isinstance(value, int) or value < least:
                why = " (the worst quarter copies the best)" if key == "population" else ""
                raise ConfigError(f"hydra.sweeper.{key}={value}: must be >= {least}{why}")
        if not OmegaConf.select(self.config, "checkpoint.enabled", default=True):
            raise ConfigError(
                "checkpoint.enabled=false: PBT members continue and fork from checkpoints"
            )

    def search(self, arguments: list[str]) -> None:
        self.check()
        spaces, fixed = search_space(self.params, self.perturb, arguments)
        # One launch at a time: a second one of the same sweep is refused, naming the first.
        with RunDirectory(self.sweep_dir).lock():
            self.train_population(spaces, fixed)

    def train_population(self, spaces: list[Space], fixed: list[str]) -> None:
        """Every round: plan, check against pbt.json's record of it (if any), train, record."""
        path = self.sweep_dir / RECORD
        recorded = read_record(path)
        told = recorded["rounds"] if recorded is not None else []
        if len(told) > self.rounds:
            raise RunError(
                f"{path}: records {len(told)} rounds, more than hydra.sweeper.rounds="
                f"{self.rounds}; it is left as it is (give rounds >= {len(told)})"
            )
        members = [Member(i, "", None, 0, {}) for i in range(self.population)]
        rounds: list[dict[str, Any]] = []
        for round_ in range(self.rounds):
            members = plan_round(round_, members, spaces, self.seed, self.steps)
            entry = {"round": round_, "members": [m.record() for m in members]}
            if round_ < len(told) and without_scores(told[round_]) != as_json(
                without_scores(entry)
            ):
                raise self.other_story(path, round_, "its members, runs or hyperparameters")
            self.train_round(round_, members, fixed)
            rounds.append({"round": round_, "members": [m.record() for m in members]})
            best = ranking(members)[0]
            document = as_json({"rounds": rounds, "best": {"round": round_, **best.record()}})
            if round_ < len(told) - 1:
                if told[round_] != document["rounds"][-1]:
                    raise self.other_story(path, round_, "its scores")
            elif round_ == len(told) - 1 and recorded != document:
                raise self.other_story(path, round_, "its scores or its best member")
            elif not (path.is_file() and path.read_text() == json.dumps(document, indent=2) + "\n"):
                atomic_write_json(path, document)
            if best.score is None:
                raise JobFailed(f"every member of round {round_} failed; see their run.json")
            report(
                logging.INFO,
                f"round {round_}: best member {best.member} ({best.run}), val/loss "
                f"{best.score:.4f} with {_params(best.params)}",
            )
        report(logging.INFO, f"population-based training: {path}")

    @staticmethod
    def other_story(path: Path, round_: int, what: str) -> RunError:
        return RunError(
            f"{path}: {what} in round {round_} are not what the seed and the runs give; it is "
            "left as it is: move it away, or launch into another hydra.sweep.dir"
        )

    def train_round(self, round_: int, members: list[Member], fixed: list[str]) -> None:
        """Take the result of every member whose run holds it; launch the others (one launch)
        and take theirs; a member that did not reach the round's end scores None."""
        target = (round_ + 1) * self.steps
        todo = []
        for member in members:
            result = round_result(self.sweep_dir, member, target, self.steps)
            self.check_settings(member, target, fixed)
            if result is PENDING:
                todo.append(member)
            else:
                member.score = result
        if todo:
            overrides = [self.overrides(m, target, fixed) for m in todo]
            returns = self.launcher.launch(overrides, initial_job_idx=round_ * self.population)
            for member, ret in zip(todo, returns, strict=True):
                result = round_result(self.sweep_dir, member, target, self.steps)
                member.score = None if result is PENDING else result
                if member.score is None:
                    report(
                        logging.WARNING,
                        f"round {round_}: member {member.member} ({member.run}) failed: "
                        f"{ret._return_value}",
                    )

    def check_settings(self, member: Member, target: int, fixed: list[str]) -> None:
        """A RunError unless the member's run (where it has started) trained with the config
        this launch gives the member's job, all but ``max_steps``: a relaunch with other
        settings neither takes a result trained otherwise nor launches jobs that refuse."""
        run = RunDirectory(self.sweep_dir / member.run)
        recorded = run.read_status().get("config")
        if not isinstance(recorded, dict):
            return  # its job starts it with this launch's settings
        overrides = self.overrides(member, target, fixed)
        composed = self.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(composed):
            del composed["hydra"]
        wanted = config_to_dict(resolve_init_from(to_train_config(composed), overrides))
        differ = {k: v for k, v in config_diff(recorded, wanted).items() if k != MAX_STEPS}
        if differ:
            first = sorted(differ)[:3]
            shown = ", ".join(
                f"{key}={before!r} where this launch gives {after!r}"
                for key, (before, after) in differ.items()
                if key in first
            )
            raise RunError(
                f"{run.path}: trained with other settings than this launch's ({shown}); "
                "relaunch with the command that made the sweep, or launch into another "
                "hydra.sweep.dir"
            )

    def overrides(self, member: Member, target: int, fixed: list[str]) -> list[str]:
        params = [f"{key}={hydra_value(value)}" for key, value in member.params.items()]
        job = MemberJob(member.member, member.parent, member.step)
        return [
            *fixed,
            *params,
            f"{MAX_STEPS}={target}",
            f"{KEEP_EVERY}={self.steps}",
            f"hydra.sweep.subdir={hydra_value(member.run)}",
            job.override(),
        ]


def _params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in params.items()
    )
