"""The life of a run around its trainer: lock, run.json, the metric sinks (metrics.jsonl, the
W&B and TensorBoard mirrors), and what the run records when it ends. How it starts (the corpus,
the state it starts from) is its :class:`gptexp.run.starts.Start`'s.

``train`` and ``resume`` (and each job of a sweep) come here. Everything that can fail on bad
input fails before the first write into the run directory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from hydra.core.override_parser.types import OverrideType
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptexp.checkpoint.manager import run_checkpoints
from gptexp.core.cli import run_log_starts
from gptexp.core.config import TrainConfig, config_to_dict, parse_overrides, to_train_config
from gptexp.core.errors import (
    USER_ERRORS,
    CheckpointError,
    ConfigError,
    RunFailed,
    TrainingInterrupted,
    TrainingPruned,
    describe_os_error,
    resume_hint,
    shell_command,
)
from gptexp.core.fsio import atomic_write_json, atomic_write_text
from gptexp.observe.metrics import MetricsFile, config_diff
from gptexp.observe.rundir import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    PRUNED,
    RUNNING,
    RunDirectory,
    now,
    stored_config,
)
from gptexp.run.forking import wandb_lineage
from gptexp.run.provenance import PendingGitCommit, environment
from gptexp.run.starts import Start
from gptexp.run.tensorboard_sink import TensorBoardSink, require_tensorboard
from gptexp.run.wandb_mirror import WandbMirror
from gptexp.training.runtime import (
    Distributed,
    StopRequest,
    apply_process_settings,
    init_distributed,
    shutdown_distributed,
)
from gptexp.training.speed import blas_caveat
from gptexp.training.trainer import MetricsSink, Trainer

log = logging.getLogger(__name__)

# Keys baked into the checkpoints: the weights' shapes, the vocabulary, the data. data.path may
# change (a moved corpus): the text is checked by its fingerprint instead.
FROZEN_GROUPS = ("model", "data")
MOVABLE_KEYS = ("data.path",)
# A fork may train on another text, encoded with its parent's tokenizer; the model and the
# tokenizer are the checkpoint's.
FORK_FROZEN_KEYS = ("data.tokenizer", "data.vocab_size")


# ----------------------------------------------------------------------------- resume config


def parse_resume_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key.path=value`` overrides as (key, value), parsed exactly as ``train`` parses them
    (Hydra's override grammar: ``off`` and ``yes`` stay strings, ``null`` is None, ``010``
    is a string that an int key reads as 10), their keys checked against the schema. Only
    one value per key applies to a stored run; a group choice would recompose it."""
    pairs = []
    for item, override in zip(overrides, parse_overrides(overrides), strict=True):
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(
                f"{item!r}: one value per key (a sweep of forks is python -m gptexp.fork -m)"
            )
        if override.type != OverrideType.CHANGE or override.package or "." not in key:
            raise ConfigError(
                f"{item!r}: a resumed or forked run takes key=value overrides of its stored "
                "config (e.g. training.max_steps=6000); group choices such as model=small "
                "would start a different run"
            )
        pairs.append((key, override.value()))
    return pairs


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
    merged = OmegaConf.structured(old)
    for key, value in parse_resume_overrides(overrides):
        try:  # the update Hydra applies to train's overrides
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from None
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
    """The typed config to resume with, and the changes the overrides make. A run cannot be
    cut short of the step it reached: that would rewrite its history as a shorter run."""
    cfg, changes = overridden_config(run, overrides)
    step = reached_step(run, cfg)
    if step is not None and cfg.training.max_steps < step:
        raise ConfigError(
            f"training.max_steps={cfg.training.max_steps}: the run is at step {step}; "
            f"give training.max_steps > {step} to train it further"
        )
    return cfg, changes


def reached_step(run: RunDirectory, cfg: TrainConfig) -> int | None:
    """The furthest step the run recorded: run.json's (written when it stopped) or, for a run
    killed before it could say, its newest listed checkpoint's; None when it has neither."""
    recorded = run.read_status().get("step")
    steps = [recorded] if isinstance(recorded, int) and not isinstance(recorded, bool) else []
    with contextlib.suppress(CheckpointError):  # a damaged manifest is the resume's to report
        steps += [
            entry.step
            for entry in run_checkpoints(run, cfg.checkpoint).entries()
            if isinstance(entry.step, int)
        ]
    return max(steps, default=None)


# ----------------------------------------------------------------------------- the pieces


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
        "wandb_id": trainer.state.wandb_id,
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
        resumes = previous.get("resumes")
        if not isinstance(resumes, list):  # absent, or hand-edited into something else
            resumes = [] if resumes is None else [{"replaced": resumes}]
        resumes.append({"at": now(), "from_step": trainer.state.step, "argv": argv, **resume_note})
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
    start: Start,
    *,
    wandb_group: str | None = None,
    wandb_name: str | None = None,
    locked: bool = False,
    report_to: Callable[[StopRequest], MetricsSink] | None = None,
) -> float | None:
    """Train the run in ``run`` from ``start`` (a new run, an import, a resume, a fork: see
    gptexp.run.starts): lock, status, checkpoints, logs. ``locked``: the caller already holds the
    run's lock (a sweep job claims its run before it records it). ``report_to``: given the
    trainer's stop request, a sink that also receives the records (a search trial's reporter,
    gptexp.run.optuna_trial, which may ask the run to stop as pruned).

    Raises a user error (gptexp.core.errors.USER_ERRORS) before any write when the input is bad,
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
            if dist_ctx.is_main and (caveat := blas_caveat()) is not None:
                log.warning(caveat)
            if cfg.logger.tensorboard and dist_ctx.is_main:
                require_tensorboard()
            beginning = start.begin(cfg, run)
            metrics = MetricsFile(run.metrics) if dist_ctx.is_main else None
            trainer = Trainer(
                cfg,
                run,
                dist_ctx,
                beginning.corpus,
                beginning.checkpoint,
                sinks=[metrics] if metrics else [],
                init_weights=beginning.weights,
            )
            start.adopt(trainer)
            # Validation passed: from here on the run directory is written to.
            run_log_starts()
            if dist_ctx.is_main:
                names = {"wandb_group": wandb_group, "wandb_name": wandb_name}
                extra = names | start.record(run, trainer)
                record_start(run, cfg, trainer, dist_ctx, start.resume_note, extra, git)
            start.after_record(trainer)  # every rank (a checkpoint gathers the RNG states)
            mirror, board = attach_mirrors(trainer, start, wandb_group, wandb_name)
            if dist_ctx.is_main and report_to is not None:
                trainer.sinks.append(report_to(trainer.stop))
            log.info("run directory: %s", run.path)
            return _fit(trainer, run, dist_ctx, metrics, mirror, board)
    finally:
        shutdown_distributed(dist_ctx)


def attach_mirrors(
    trainer: Trainer, start: Start, wandb_group: str | None, wandb_name: str | None
) -> tuple[WandbMirror | None, TensorBoardSink | None]:
    """The W&B and TensorBoard mirrors the config asks for (the main process), as sinks of
    the trainer."""
    cfg, run = trainer.cfg, trainer.run
    mirror = board = None
    if trainer.dist.is_main and cfg.logger.wandb:
        mirror = WandbMirror(
            cfg.logger,
            run.path,
            trainer.state.wandb_id,
            config_to_dict(cfg) | wandb_lineage(run.read_status()),
            name=wandb_name or run.path.name,
            group=wandb_group,
            fork_from=start.wandb_fork_from(),
        )
        trainer.sinks.append(mirror)
        run.update_status(wandb_mode=mirror.mode)
    if trainer.dist.is_main and cfg.logger.tensorboard:
        board = TensorBoardSink(run.path)
        trainer.sinks.append(board)
    return mirror, board


def failure_text(error: BaseException) -> str:
    """One line for run.json's ``error`` and the console: what went wrong, without traceback.
    DCP's CheckpointException (a BaseException holding each rank's exception and traceback)
    is told by its first rank's exception."""
    failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's exception
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            return failure_text(inner[0])
    if isinstance(error, OSError):
        return describe_os_error(error)
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _is_storage_failure(error: BaseException) -> bool:
    """A failure of the machine around the run, not of its training: a file that could not be
    written (OSError), a checkpoint that could not be saved (CheckpointError, DCP's
    CheckpointException). Other exceptions (a bug) keep their traceback."""
    from torch.distributed.checkpoint import CheckpointException

    return isinstance(error, (OSError, CheckpointException, *USER_ERRORS))


def record_end(run: RunDirectory, status: str, error: str | None, summary: dict) -> None:
    """run.json at the end: the status, the figures, and for a failed run its ``error`` (an
    error of an earlier attempt goes once the run has ended otherwise). A run.json that cannot
    be written (the disk is full) keeps ``running``: the run reads as crashed, resumable."""
    fields = {k: v for k, v in summary.items() if v is not None}
    try:
        recorded = run.read_status()
        recorded.pop("error", None)
        if error is not None:
            fields["error"] = error
        atomic_write_json(run.run_json, recorded | {"status": status, "ended": now(), **fields})
    except OSError:
        pass  # the failure the caller reports is the one that matters; nothing is lost


def _fit(trainer, run, dist_ctx, metrics, mirror, board=None) -> float | None:
    status, error = FAILED, None
    if dist_ctx.is_main:  # a second Ctrl-C ends the process at once: it was interrupted
        trainer.stop.on_abandon = lambda: record_end(run, INTERRUPTED, None, trainer.summary())
    try:
        result = trainer.fit()
        status = FINISHED
        log.info(
            "finished at step %d: val/loss %s; evaluate with: %s",
            trainer.state.step,
            "n/a" if result is None else f"{result:.4f}",
            shell_command("python", "-m", "gptexp.eval", f"run={run.path}"),
        )
        return result
    except TrainingInterrupted as stop:
        if stop.signame != StopRequest.PRUNER:
            status = INTERRUPTED
            raise
        status = PRUNED
        log.info("pruned at step %d: a weak trial of the search", trainer.state.step)
        raise TrainingPruned(trainer.state.step, str(run.path)) from None
    except KeyboardInterrupt:
        status = INTERRUPTED
        raise
    except BaseException as failure:
        error = failure_text(failure)
        if not _is_storage_failure(failure):
            raise
        where = resume_hint(run.path, world_size=dist_ctx.world_size)
        intact = "" if "intact" in error else ", its checkpoints are intact"  # (said once)
        raise RunFailed(
            f"{error}; the run stopped at step {trainer.state.step}{intact}: fix that, then resume "
            f"it with: {where}"
        ) from None
    finally:
        trainer.release()
        if dist_ctx.is_main:
            summary = trainer.summary()
            record_end(run, status, error, summary)
            with contextlib.suppress(OSError):  # each line was flushed as it was written
                metrics.close()
            if board is not None:
                board.close()
            if mirror is not None:
                mirror.summary(summary | {"status": status})
                # W&B's own states know no "pruned": a clean end, the summary says which.
                mirror.finish(exit_code=0 if status in (FINISHED, PRUNED) else 1)
