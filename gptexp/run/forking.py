"""The start of a fork: a new run that begins from the full state of another run's checkpoint.

The parent is only read (its run.json, metrics.jsonl and one verified checkpoint); nothing in
its directory is ever written, not even its lock file. With no override and no reset the fork's
first update is exactly the parent's update ``step + 1`` (same weights, optimizer and scheduler
state, batches and random numbers), so it continues bit for bit as the parent did.

``reset`` restarts pieces of the state for fine-tuning:

- ``optimizer``: a fresh AdamW (no moments, step count 0);
- ``scheduler``: the learning-rate schedule starts again at its step 0 (warm-up included)
  while the step counter goes on;
- ``rng``: every random generator is seeded again from ``training.seed`` (+ rank);
- ``step``: the step counter, ``tokens_seen``, the data position, the schedule and the spike
  guard start again at 0 (the fork then inherits no records: its steps would repeat its
  parent's).

``weights=ema`` starts the fork's model from the checkpoint's weight average (a run with
``training.ema_decay > 0``) instead of its weights; the rest of the state is the checkpoint's
as always: AdamW's moments (of the weights' path) and, where the fork keeps an average, the
average itself, which then equals the fork's starting weights.

The parent's best metric is kept, except where the fork cannot compare with it: after
``reset=step``, on another text, or with another ``checkpoint.monitor`` / ``mode``.

A cooldown fork (``cooldown=D``) decays the learning rate from its checkpoint's step ``s`` over
``D`` updates: ``training.lr_schedule=wsd``, ``max_steps=s+D``, ``decay_steps=D``. Forked from
a run trained with ``lr_schedule=constant`` (same warm-up), it is bit for bit the run planned as
that wsd schedule from the start (gptexp.training.optim.lr_factor); run.json records
``cooldown``, so compare can draw the loss of every budget (gptexp.observe.frontier).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from gptexp.checkpoint.format import CheckpointEntry
from gptexp.checkpoint.manager import FORK_START
from gptexp.checkpoint.stored import LoadedCheckpoint
from gptexp.core.config import GuardConfig, TrainConfig
from gptexp.core.errors import ConfigError, DataError
from gptexp.core.fsio import atomic_write_text
from gptexp.data.corpus import Corpus, prepare_corpus
from gptexp.data.tokenizers import tokenizer_from_json
from gptexp.observe.lineage import fork_parent
from gptexp.observe.metrics import INHERITED, STEP, read_metrics
from gptexp.observe.rundir import RunDirectory
from gptexp.observe.runtable import launch_overrides
from gptexp.run.starts import Beginning, Start
from gptexp.training.ema import copy_average_into
from gptexp.training.state import TrainState, new_wandb_id
from gptexp.training.trainer import Trainer

log = logging.getLogger(__name__)

RESETS = ("optimizer", "scheduler", "rng", "step")
# What a cooldown sets itself (cooldown_overrides): the user may not set them too.
COOLDOWN_KEYS = ("training.lr_schedule", "training.max_steps", "training.decay_steps")
# A resume keeps its run's global batch; a fork that sets these trains with the batch it asks for.
BATCH_KEYS = ("training.batch_size", "training.grad_accum")


def parse_reset(text: str) -> tuple[str, ...]:
    """``optimizer,scheduler`` -> ("optimizer", "scheduler"); unknown names are refused."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in RESETS]
    if unknown:
        raise ConfigError(
            f"reset={text!r}: {', '.join(unknown)} cannot be reset (choose any of "
            f"{', '.join(RESETS)}, comma-separated)"
        )
    return tuple(name for name in RESETS if name in names)


def parse_cooldown(text: str) -> int:
    """``cooldown=D``: a number of updates >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(
            f"cooldown={text!r}: must be a number of updates >= 1 (the length of the decay "
            "to training.min_lr, e.g. cooldown=200)"
        )
    return int(text)


def check_cooldown(overrides: list[str], reset: tuple[str, ...]) -> None:
    """A cooldown sets the schedule's keys itself and counts from the checkpoint's step: an
    override of those keys, or a reset of the step or schedule, would contradict it."""
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if key in COOLDOWN_KEYS:
            raise ConfigError(
                f"{item}: cooldown=... sets {', '.join(COOLDOWN_KEYS)} itself (wsd to the "
                "checkpoint's step + the cooldown); drop the override or the cooldown"
            )
    clash = [name for name in ("scheduler", "step") if name in reset]
    if clash:
        raise ConfigError(
            f"reset={','.join(reset)}: a cooldown decays from the checkpoint's step and "
            f"schedule; reset={clash[0]} would start them again (drop it or the cooldown)"
        )


def cooldown_overrides(step: int, updates: int) -> list[str]:
    """The overrides of a cooldown of ``updates`` updates from a checkpoint of ``step``."""
    return [
        "training.lr_schedule=wsd",
        f"training.max_steps={step + updates}",
        f"training.decay_steps={updates}",
    ]


def data_changed(changes: dict[str, Any]) -> bool:
    """Whether the overrides may give the fork another text: then its text need not be the
    parent's (``data.path`` alone may also just say where the same file is now)."""
    return any(key.startswith("data.") for key in changes)


def fork_corpus(cfg: TrainConfig, state: dict[str, Any], new_data: bool) -> Corpus:
    """The fork's corpus, encoded with its parent's tokenizer. Without a change of ``data.*``
    the text must be the parent's (its fingerprint); with one, any text the tokenizer can
    encode."""
    tokenizer = tokenizer_from_json(state["tokenizer"])
    expected = None if new_data else state["data_fingerprint"]
    try:
        return prepare_corpus(cfg.data, cfg.model.block_size, tokenizer, expected)
    except DataError as error:
        if not new_data:
            raise
        raise DataError(f"{error}; a fork keeps its parent's tokenizer") from None


@dataclass
class ForkStart(Start):
    """Everything a fork starts from: its parent's checkpoint, what changes, what restarts
    (a kind of start: gptexp.run.starts)."""

    parent: RunDirectory
    entry: CheckpointEntry
    state: dict[str, Any]
    corpus: Corpus
    overrides: list[str]
    changes: dict[str, tuple[Any, Any]]
    reset: tuple[str, ...] = ()
    parent_status: dict[str, Any] = field(default_factory=dict)
    cooldown: int | None = None  # a cooldown fork's decay (its overrides are in ``overrides``)
    weights: str = "raw"  # ema: the model starts from the checkpoint's weight average

    @property
    def step(self) -> int:
        return self.entry.step

    @property
    def parent_wandb_id(self) -> str | None:
        return self.state.get("wandb_id")

    # ------------------------------------------------------------------------- the trainer

    def begin(self, cfg: TrainConfig, run: RunDirectory) -> Beginning:
        """The fork command has checked the parent's state and text already (fork.prepare)."""
        return Beginning(self.corpus, checkpoint=self.trainer_state())

    def trainer_state(self) -> dict[str, Any]:
        """The checkpoint as the fork's trainer loads it. The trainer keeps the global batch
        of the checkpoint's config (right for a resume on another world size); a fork that
        changes the batch gets its own, so its config stands in for the checkpoint's there."""
        changed = {k.split(".")[1]: new for k, (_, new) in self.changes.items() if k in BATCH_KEYS}
        if not changed:
            return self.state
        config = self.state["config"]
        return {**self.state, "config": {**config, "training": config["training"] | changed}}

    def adopt(self, trainer: Trainer) -> None:
        """Turn a trainer loaded with the parent's state (and, by Trainer.load_state, with the
        config's hyperparameters) into the fork's: the resets, a W&B run of its own."""
        trainer.restart(self.reset, self.fork_state(trainer.state, trainer.cfg.training.guard))
        if self.weights == "ema":
            copy_average_into(trainer.model, self.state["ema"])
        log.info(
            "fork of %s at step %d (%s)%s%s",
            self.parent.path,
            self.step,
            self.entry.file,
            "; weights: the average" if self.weights == "ema" else "",
            f"; reset: {', '.join(self.reset)}" if self.reset else "",
        )

    def fork_state(self, loaded: TrainState, guard: GuardConfig) -> TrainState:
        """The fork's TrainState from its parent's: after ``reset=step`` a new run's (its own
        step 0 is evaluated, the guard's skip list no longer counts its parent's batches) in
        its parent's data order; the best metric where the fork can compare with it; a W&B
        run of its own."""
        state = TrainState.fresh(guard) if "step" in self.reset else loaded
        return replace(
            state,
            data_order=loaded.data_order,
            best_metric=loaded.best_metric if self.keeps_best_metric() else None,
            wandb_id=new_wandb_id(),
        )

    def keeps_best_metric(self) -> bool:
        rescored = {"checkpoint.monitor", "checkpoint.mode"} & self.changes.keys()
        same_text = self.corpus.fingerprint == self.state["data_fingerprint"]
        return "step" not in self.reset and same_text and not rescored

    def after_record(self, trainer: Trainer) -> None:
        """The fork's first checkpoint holds its start state, so resume, eval and export work
        on the fork from its first moment, whatever becomes of its parent; listed as the fork's
        start, retention keeps it (the lineage's anchor). Every rank takes part (the RNG states
        are gathered); the main process writes."""
        if not trainer.cfg.checkpoint.enabled:
            return
        state = trainer.state_dict(None)
        if trainer.dist.is_main:
            trainer.checkpoints.save(
                state, trainer.state.step, None, [FORK_START], asynchronous=False
            )

    def wandb_fork_from(self) -> str | None:
        """W&B's ``fork_from`` moment: the parent's W&B run at the fork step (none after
        reset=step, whose steps start again below it)."""
        if self.parent_wandb_id is None or "step" in self.reset:
            return None
        return f"{self.parent_wandb_id}?_step={self.step}"

    # ------------------------------------------------------------------------- the record

    def record(self, run: RunDirectory, trainer: Trainer) -> dict[str, Any]:
        """The fork's metrics.jsonl begins with its parent's curve; run.json's lineage."""
        self.write_inherited(run)
        return self.lineage()

    def lineage(self) -> dict[str, Any]:
        """run.json's fields of a fork."""
        return {
            "parent": {
                "run": str(self.parent.path),
                "step": self.step,
                "checkpoint": self.entry.file,
                "sha256": self.entry.sha256,
                "wandb_id": self.parent_wandb_id,
            },
            "fork_overrides": list(self.overrides),
            "reset": list(self.reset),
            **({"cooldown": self.cooldown} if self.cooldown is not None else {}),
            **({"weights": self.weights} if self.weights != "raw" else {}),
            # What sets the fork apart in compare: its parent's launch choices and its own.
            "overrides": self.settings(),
        }

    def settings(self) -> list[str]:
        """The parent's launch overrides, with the fork's overrides replacing any of the same
        key, followed by the fork's."""
        own = {item.partition("=")[0] for item in self.overrides}
        inherited = launch_overrides(self.parent, self.parent_status)
        kept = [item for item in inherited if item.partition("=")[0].lstrip("+~") not in own]
        return kept + list(self.overrides)

    def inherited_records(self) -> list[dict[str, Any]]:
        """The parent's records up to the fork step, marked inherited (none after
        ``reset=step``: the fork's own steps start again at 0)."""
        if "step" in self.reset:
            return []
        return [
            record | {INHERITED: True}
            for record in read_metrics(self.parent.metrics)
            if record[STEP] <= self.step
        ]

    def write_inherited(self, run: RunDirectory) -> None:
        """Begin the fork's metrics.jsonl with its parent's curve (one atomic write)."""
        records = self.inherited_records()
        atomic_write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in records))


def check_trains(cfg: TrainConfig, entry: CheckpointEntry, reset: tuple[str, ...]) -> None:
    """A fork from ``entry`` with ``cfg`` has updates to make (else a ConfigError)."""
    if "step" not in reset and cfg.training.max_steps <= entry.step:
        raise ConfigError(
            f"training.max_steps={cfg.training.max_steps}: the fork starts at step "
            f"{entry.step} ({entry.file}), so it would not train; raise "
            "training.max_steps, or add reset=step to count from 0 again"
        )


def fork_start(
    parent: RunDirectory,
    loaded: LoadedCheckpoint,
    cfg: TrainConfig,
    changes: dict[str, tuple[Any, Any]],
    overrides: list[str],
    reset: tuple[str, ...] = (),
    *,
    cooldown: int | None = None,
    weights: str = "raw",
) -> ForkStart:
    """The start of a fork of ``parent`` at its ``loaded`` checkpoint (verified) with ``cfg``,
    the parent's config with ``changes`` (what ``overrides`` made of it, a cooldown's
    included): everything a fork checks before it writes anything, the text encoded with the
    parent's tokenizer included."""
    check_trains(cfg, loaded.entry, reset)
    corpus = fork_corpus(cfg, loaded.state, data_changed(changes))
    return ForkStart(
        parent=parent,
        entry=loaded.entry,
        state=loaded.state,
        corpus=corpus,
        overrides=overrides,
        changes=changes,
        reset=reset,
        parent_status=parent.read_status(),
        cooldown=cooldown,
        weights=weights,
    )


def wandb_lineage(status: dict[str, Any]) -> dict[str, Any]:
    """The W&B config entries of a fork (from its run.json), so that every start of the fork,
    resumes included, names its parent; {} for a run that is not a fork."""
    parent = fork_parent(status)
    if parent is None:
        return {}
    return {"parent_run_id": parent.get("wandb_id"), "fork_step": parent["step"]}
