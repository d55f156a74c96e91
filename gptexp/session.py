"""The life of a run around its trainer: lock, resume point, corpus, run.json, the metric
sinks (metrics.jsonl and the W&B mirror), and what the run records when it ends.

``train`` and ``resume`` (and each job of a sweep) come here. Everything that can fail on bad
input fails before the first write into the run directory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptexp.checkpoint import CheckpointEntry, CheckpointManager
from gptexp.config import TrainConfig, config_to_dict, to_train_config
from gptexp.data import Corpus, Tokenizer, prepare_corpus, tokenizer_from_json
from gptexp.errors import ConfigError, TrainingInterrupted, TrainingPruned
from gptexp.forking import ForkStart, wandb_lineage
from gptexp.fsio import atomic_write_text
from gptexp.hf import import_source
from gptexp.metrics import MetricsFile, config_diff
from gptexp.rundir import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    PRUNED,
    RUNNING,
    PendingGitCommit,
    RunDirectory,
    environment,
    now,
    stored_config,
)
from gptexp.runtime import (
    Distributed,
    StopRequest,
    apply_process_settings,
    init_distributed,
    shutdown_distributed,
)
from gptexp.trainer import MetricsSink, Trainer
from gptexp.wandb_mirror import WandbMirror

log = logging.getLogger(__name__)

# Keys baked into the checkpoints: the weights' shapes, the vocabulary, the data. data.path may
# change (a moved corpus): the text is checked by its fingerprint instead.
FROZEN_GROUPS = ("model", "data")
MOVABLE_KEYS = ("data.path",)
# A fork may train on another text, encoded with its parent's tokenizer; the model and the
# tokenizer are the checkpoint's.
FORK_FROZEN_KEYS = ("data.tokenizer", "data.vocab_size")


# ----------------------------------------------------------------------------- resume config


def parse_resume_overrides(overrides: list[str]) -> list[str]:
    """Only ``key.path=value`` applies to a stored run; a group choice would recompose."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key.startswith(("+", "~")) or "." not in key:
            raise ConfigError(
                f"{item!r}: a resumed or forked run takes key=value overrides of its stored "
                "config (e.g. training.max_steps=6000); group choices such as model=small "
                "would start a different run"
            )
    return overrides


def overridden_config(
    run: RunDirectory, overrides: list[str], *, fork: bool = False
) -> tuple[TrainConfig, dict]:
    """The run's stored config with ``overrides`` applied, and the changes they make.

    What may change is the one rule shared by resume and fork: never the model (its weights
    are the checkpoint's); for a resume not the data either (except where the file now is);
    for a fork the data may change but not the tokenizer (the fork keeps its parent's).
    Refused changes are listed as a diff.
    """
    old = to_train_config(stored_config(run))
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(old), OmegaConf.from_dotlist(parse_resume_overrides(overrides))
        )
    except OmegaConfBaseException as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    new = to_train_config(merged)
    changes = config_diff(config_to_dict(old), config_to_dict(new))
    frozen_groups = ("model",) if fork else FROZEN_GROUPS
    allowed = () if fork else MOVABLE_KEYS
    frozen = {
        k: v
        for k, v in changes.items()
        if (k.split(".")[0] in frozen_groups and k not in allowed)
        or (fork and k in FORK_FROZEN_KEYS)
    }
    if frozen:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in frozen.items())
        what = (
            "a fork (it keeps its parent's model and tokenizer; start a new run instead)"
            if fork
            else "the run's checkpoints (start a new run instead)"
        )
        raise ConfigError(f"these changes cannot apply to {what}:\n{lines}")
    return new, changes


def resume_config(run: RunDirectory, overrides: list[str]) -> tuple[TrainConfig, dict]:
    """The typed config to resume with, and the changes the overrides make."""
    return overridden_config(run, overrides)


# ----------------------------------------------------------------------------- the pieces


def latest_checkpoint(
    run: RunDirectory, cfg: TrainConfig
) -> tuple[CheckpointEntry, dict[str, Any]] | None:
    """(entry, state) of the newest valid checkpoint, or None (training restarts at 0)."""
    found = CheckpointManager(run.checkpoints, cfg.checkpoint).load_latest_valid()
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
        tokenizer = tokenizer_from_json(run.tokenizer.read_text(encoding="utf-8"))
    expected = state["data_fingerprint"] if state is not None else None
    return prepare_corpus(cfg.data, cfg.model.block_size, tokenizer, expected)


def rewind_metrics(run: RunDirectory, step: int | None, guard_events: int = 0) -> None:
    """Drop the records logged after the checkpoint: they will be logged again, identically.
    ``guard_events``: how many spike-guard events the checkpoint knows (those stay)."""
    dropped = MetricsFile(run.metrics).rewind(-1 if step is None else step, guard_events)
    if dropped:
        log.info("metrics.jsonl: dropped %d records logged after step %s", dropped, step)


def record_start(
    run: RunDirectory,
    cfg: TrainConfig,
    trainer: Trainer,
    dist_ctx: Distributed,
    resume_note: dict[str, Any] | None,
    extra: dict[str, Any],
    git: PendingGitCommit | None = None,
) -> None:
    """run.json at the start: status, the effective config, provenance, and the caller's
    ``extra`` fields (W&B group and name; a fork's lineage). A resume adds an entry (with its
    own command line) to ``resumes``; the first start's fields stay. ``git``: the commit asked
    for when the run started."""
    previous = run.read_status()
    env = environment(git)
    argv = env.pop("argv")
    fields: dict[str, Any] = {
        "status": RUNNING,
        "experiment": cfg.experiment,
        "seed": cfg.training.seed,
        "world_size": dist_ctx.world_size,
        "data_fingerprint": trainer.corpus.fingerprint,
        "wandb_id": trainer.wandb_id,
        **extra,
        "max_steps": cfg.training.max_steps,
        "parameters": trainer.model.num_parameters(),
        "vocab_size": trainer.corpus.tokenizer.vocab_size,
        "config": config_to_dict(cfg),
        "ended": None,
        **env,
    }
    if not previous.get("started"):
        fields["started"] = now()
    if "argv" not in previous:
        fields["argv"] = argv
    if resume_note is not None:
        resumes = previous.get("resumes", [])
        resumes.append({"at": now(), "from_step": trainer.step, "argv": argv, **resume_note})
        fields["resumes"] = resumes
    run.update_status(**fields)
    atomic_write_text(run.tokenizer, trainer.corpus.tokenizer.to_json())
    if cfg.checkpoint.enabled:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        trainer.checkpoints.remove_stale_temporaries()


def already_finished(run: RunDirectory, cfg: TrainConfig) -> bool:
    """A finished run that the overrides do not extend: resuming it would change nothing."""
    status = run.read_status()
    step = status.get("step")
    return (
        status.get("status") == FINISHED
        and isinstance(step, int)
        and step >= cfg.training.max_steps
    )


# ----------------------------------------------------------------------------- one run


def run_training(
    cfg: TrainConfig,
    run: RunDirectory,
    *,
    resume: bool,
    resume_note: dict[str, Any] | None = None,
    wandb_group: str | None = None,
    wandb_name: str | None = None,
    locked: bool = False,
    start: ForkStart | None = None,
    report_to: Callable[[StopRequest], MetricsSink] | None = None,
) -> float | None:
    """Train (or resume) the run in ``run``: lock, status, checkpoints, logs. ``locked``: the
    caller already holds the run's lock (a sweep job claims its run before it records it).
    ``start``: a new run that starts from another run's checkpoint (a fork), not from step 0.
    ``report_to``: given the trainer's stop request, a sink that also receives the records (a
    search trial's reporter, gptexp.optuna_trial, which may ask the run to stop as pruned).

    Raises a user error (gptexp.errors.USER_ERRORS) before any write when the input is bad,
    TrainingInterrupted after a clean stop on a signal.
    """
    dist_ctx = Distributed.from_env()
    init_distributed(dist_ctx, cfg.training.device)
    # In the background: run.json collects it, the first step does not wait for git.
    git = PendingGitCommit() if dist_ctx.is_main else None
    lock = run.lock() if dist_ctx.is_main and not locked else contextlib.nullcontext()
    try:
        with lock:
            apply_process_settings(cfg.training)
            found = latest_checkpoint(run, cfg) if resume else None
            state = found[1] if found else None
            imported = None
            if start is not None:  # the fork command has checked the parent's state and text
                state, corpus = start.trainer_state(), start.corpus
            else:
                # A run started from a Hugging Face model (not resumed from its own checkpoint)
                # takes that model's tokenizer and weights; the entry point set its shape.
                if cfg.model.init_from and state is None:
                    imported = import_source(cfg.model)
                corpus = run_corpus(cfg, run, state, imported.tokenizer if imported else None)
            metrics = MetricsFile(run.metrics) if dist_ctx.is_main else None
            trainer = Trainer(
                cfg,
                run,
                dist_ctx,
                corpus,
                state,
                sinks=[metrics] if metrics else [],
                init_weights=imported.state_dict if imported else None,
            )
            if start is not None:
                start.apply(trainer)
            # Validation passed: from here on the run directory is written to.
            mirror = None
            extra: dict[str, Any] = {"wandb_group": wandb_group, "wandb_name": wandb_name}
            if dist_ctx.is_main:
                if resume:
                    rewind_metrics(run, found[0].step if found else None, len(trainer.guard.events))
                if imported is not None:  # the source and the sha256 of its weights
                    extra["init_from"] = imported.record
                if start is not None:
                    start.write_inherited(run)
                    extra |= start.lineage()
                record_start(
                    run, cfg, trainer, dist_ctx, resume_note if resume else None, extra, git
                )
            if start is not None:
                start.save_checkpoint(trainer)  # every rank: the checkpoint gathers RNG states
            if dist_ctx.is_main and cfg.logger.wandb:
                mirror = WandbMirror(
                    cfg.logger,
                    run.path,
                    trainer.wandb_id,
                    config_to_dict(cfg) | wandb_lineage(run.read_status()),
                    name=wandb_name or run.path.name,
                    group=wandb_group,
                    fork_from=start.wandb_fork_from() if start is not None else None,
                )
                trainer.sinks.append(mirror)
                run.update_status(wandb_mode=mirror.mode)
            if dist_ctx.is_main and report_to is not None:
                trainer.sinks.append(report_to(trainer.stop))
            log.info("run directory: %s", run.path)
            return _fit(trainer, run, dist_ctx, metrics, mirror)
    finally:
        shutdown_distributed(dist_ctx)


def _fit(trainer, run, dist_ctx, metrics, mirror) -> float | None:
    status = FAILED
    try:
        result = trainer.fit()
        status = FINISHED
        log.info(
            "finished at step %d: val/loss %s; evaluate with: python -m gptexp.eval run=%s",
            trainer.step,
            "n/a" if result is None else f"{result:.4f}",
            run.path,
        )
        return result
    except TrainingInterrupted as stop:
        if stop.signame != StopRequest.PRUNER:
            status = INTERRUPTED
            raise
        status = PRUNED
        log.info("pruned at step %d: a weak trial of the search", trainer.step)
        raise TrainingPruned(trainer.step, str(run.path)) from None
    except KeyboardInterrupt:
        status = INTERRUPTED
        raise
    finally:
        trainer.release()
        if dist_ctx.is_main:
            summary = trainer.summary()
            run.update_status(
                status=status, ended=now(), **{k: v for k, v in summary.items() if v is not None}
            )
            metrics.close()
            if mirror is not None:
                mirror.summary(summary | {"status": status})
                # W&B's own states know no "pruned": a clean end, the summary says which.
                mirror.finish(exit_code=0 if status in (FINISHED, PRUNED) else 1)
