"""How a run starts: the one protocol every kind of start follows, and the kinds that need no
other run (a new run, a model imported from Hugging Face, a resume).

:func:`gptexp.run.session.run_training` calls the steps of a :class:`Start` in one order, the same
for every kind:

1. ``begin(cfg, run)``: what the Trainer is built from (the corpus, the checkpoint it carries
   on from, imported weights). Everything that can fail on bad input fails here, before the
   first write into the run directory.
2. ``adopt(trainer)``: once the Trainer is built, on every rank, still before any write.
3. ``record(run, trainer)``: the main process writes what this start writes before run.json
   (a resume rewinds metrics.jsonl, a fork copies its parent's curve) and returns run.json's
   fields of this kind of start; ``resume_note`` is the entry it adds to run.json's
   ``resumes`` (None: a start that is not a resume).
4. ``after_record(trainer)``: every rank, once run.json says the run is running.
5. ``wandb_fork_from()``: W&B's ``fork_from`` for the run's mirror.

Each step has a default that does nothing, so a kind says only what sets it apart. A new kind
of start (a cooldown fork, a population-based training exploit) is a new subclass, never a
branch in the session. A fork is :class:`gptexp.run.forking.ForkStart`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptexp.checkpoint.format import CheckpointEntry
from gptexp.checkpoint.manager import run_checkpoints
from gptexp.core.config import TrainConfig
from gptexp.data.corpus import Corpus, prepare_corpus
from gptexp.data.tokenizers import Tokenizer, read_tokenizer, tokenizer_from_json
from gptexp.model.hf import ImportedModel, import_source
from gptexp.observe.metrics import MetricsFile
from gptexp.observe.rundir import RunDirectory
from gptexp.run.tensorboard_sink import rewind_run

if TYPE_CHECKING:
    import torch

    from gptexp.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class Beginning:
    """What a start gives the Trainer: the corpus; the checkpoint it carries on from (None:
    step 0); the weights of an imported model."""

    corpus: Corpus
    checkpoint: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None


class Start:
    """One way a run starts (see the module docstring for the order of the steps)."""

    resume_note: dict[str, Any] | None = None

    def begin(self, cfg: TrainConfig, run: RunDirectory) -> Beginning:
        raise NotImplementedError

    def adopt(self, trainer: Trainer) -> None:
        """Every rank, once the Trainer is built (nothing is written yet)."""

    def record(self, run: RunDirectory, trainer: Trainer) -> dict[str, Any]:
        """The main process: write what this start writes before run.json; run.json's fields."""
        return {}

    def after_record(self, trainer: Trainer) -> None:
        """Every rank, once run.json records the start."""

    def wandb_fork_from(self) -> str | None:
        return None


class Fresh(Start):
    """A new run from step 0 (its tokenizer trained on its text, or its own if it has one)."""

    def begin(self, cfg: TrainConfig, run: RunDirectory) -> Beginning:
        return Beginning(run_corpus(cfg, run, None))


class Import(Start):
    """A new run from a Hugging Face model (``model.init_from``): its tokenizer and weights;
    the entry point set the model's shape. run.json records the source and its sha256."""

    imported: ImportedModel

    def begin(self, cfg: TrainConfig, run: RunDirectory) -> Beginning:
        self.imported = import_source(cfg.model)
        corpus = run_corpus(cfg, run, None, self.imported.tokenizer)
        return Beginning(corpus, weights=self.imported.state_dict)

    def record(self, run: RunDirectory, trainer: Trainer) -> dict[str, Any]:
        return {"init_from": self.imported.record}


def new_run(cfg: TrainConfig) -> Start:
    """The start of a run that has no checkpoint of its own."""
    return Import() if cfg.model.init_from else Fresh()


class Resume(Start):
    """A run continued from its newest valid checkpoint, in its own directory. A run that has
    none starts as ``instead`` makes it start: by default again as a new run would (its records
    after step 0 dropped); a member of a population-based training as the fork it began as
    (gptexp.run.pbt_member). ``note``: the entry of run.json's ``resumes`` (the overrides, a
    sweep job's name)."""

    def __init__(
        self,
        note: dict[str, Any] | None = None,
        instead: Callable[[TrainConfig], Start] = new_run,
    ) -> None:
        self.resume_note = note
        self.make_instead = instead
        self.found: tuple[CheckpointEntry, dict[str, Any]] | None = None
        self.instead: Start | None = None

    def begin(self, cfg: TrainConfig, run: RunDirectory) -> Beginning:
        self.found = latest_checkpoint(run, cfg)
        if self.found is None:
            self.instead = self.make_instead(cfg)
            return self.instead.begin(cfg, run)
        state = self.found[1]
        return Beginning(run_corpus(cfg, run, state), checkpoint=state)

    def adopt(self, trainer: Trainer) -> None:
        if self.instead is not None:
            self.instead.adopt(trainer)

    def record(self, run: RunDirectory, trainer: Trainer) -> dict[str, Any]:
        step = self.found[0].step if self.found else None
        rewind_metrics(run, step, len(trainer.state.guard.events))
        return self.instead.record(run, trainer) if self.instead else {}

    def after_record(self, trainer: Trainer) -> None:
        if self.instead is not None:
            self.instead.after_record(trainer)

    def wandb_fork_from(self) -> str | None:
        return self.instead.wandb_fork_from() if self.instead else None


# ----------------------------------------------------------------------------- the pieces


def latest_checkpoint(
    run: RunDirectory, cfg: TrainConfig
) -> tuple[CheckpointEntry, dict[str, Any]] | None:
    """(entry, state) of the newest valid checkpoint, or None (training restarts at 0)."""
    found = run_checkpoints(run, cfg.checkpoint).load_latest_valid()
    if found is None:
        log.warning("%s has no valid checkpoint: training restarts from step 0", run.path)
    else:
        log.info("resuming from %s (step %d)", found[0].file, found[0].step)
    return found


def run_corpus(
    cfg: TrainConfig,
    run: RunDirectory,
    state: dict[str, Any] | None,
    tokenizer: Tokenizer | None = None,
) -> Corpus:
    """The run's corpus. A resumed run reuses its own tokenizer (never a retrained one), and
    its text must be the one it trained on, wherever the file is now; an imported model brings
    its ``tokenizer``."""
    if state is not None:
        tokenizer = tokenizer_from_json(state["tokenizer"])
    elif tokenizer is None and run.tokenizer.is_file():
        tokenizer = read_tokenizer(run.tokenizer)
    expected = state["data_fingerprint"] if state is not None else None
    return prepare_corpus(cfg.data, cfg.model.block_size, tokenizer, expected)


def rewind_metrics(run: RunDirectory, step: int | None, guard_events: int = 0) -> None:
    """Drop the records logged after the checkpoint (metrics.jsonl and the TensorBoard event
    files): they will be logged again, identically. ``guard_events``: how many spike-guard
    events the checkpoint knows (those stay)."""
    dropped = MetricsFile(run.metrics).rewind(-1 if step is None else step, guard_events)
    if dropped:
        why = (
            "all of them: no checkpoint, training starts again from step 0"
            if step is None
            else f"logged after step {step}"
        )
        log.info("metrics.jsonl: dropped %d records (%s)", dropped, why)
    rewind_run(run.path, -1 if step is None else step)  # TensorBoard's view of the same
