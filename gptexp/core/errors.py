"""Every exception gptexp raises on purpose, and the exit codes the commands leave with.

A *user error* is bad input: a config value that cannot work, data that cannot be had, an
unusable checkpoint, a path that is not a run, a run that is busy. Commands print its message
(``error: ...``) and exit 2; nothing has been written by then. A clean stop on a signal exits
130 after saving; any other failure exits 1. :func:`gptexp.core.cli.run_command` is the one place
that turns these into exit codes.

A file that cannot be written or read (a full disk, a read-only directory: an ``OSError``) is
not bad input: retyping the command would not help, freeing space or fixing permissions would.
It is one ``error: <path>: <reason>`` line and exit 1, whether or not a run had started; a run
that had started records ``failed`` and the error in its run.json (:class:`RunFailed`).
"""

from __future__ import annotations

import shlex

EXIT_OK = 0
EXIT_FAILURE = 1  # a run or job failed (NaN loss, a failed sweep job, diverging runs in diff)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class ConfigError(ValueError):
    """A configuration value or command-line argument that cannot work; names the key."""


class DataError(RuntimeError):
    """The text cannot be had or used; the message says why and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no valid checkpoint could be read."""


class RunError(RuntimeError):
    """A path that is not a usable run directory, or a run that is busy."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving; the run is resumable."""

    def __init__(
        self, signame: str, step: int, run_path: str | None = None, world_size: int = 1
    ) -> None:
        where = resume_hint(run_path, world_size=world_size)
        super().__init__(f"stopped by {signame} at step {step}; resume with: {where}")
        self.signame = signame
        self.step = step


def shell_command(*words: object) -> str:
    """A command for a hint, to be pasted into a shell: each word quoted where it must be
    (a path with a space or a quote)."""
    return " ".join(shlex.quote(str(word)) for word in words)


def resume_hint(run_path: object | None, *args: str, world_size: int = 1) -> str:
    """How to resume the run at ``run_path`` on as many processes as it ran on:
    ``make resume RUN=... [NPROC=n]`` (the documented way), or, for a path make would split at
    its spaces, the command it runs."""
    path = "<run dir>" if run_path is None else str(run_path)
    if run_path is None or all(shlex.quote(word) == word for word in (path, *args)):
        hint = f"make resume RUN={path}" + (f' ARGS="{" ".join(args)}"' if args else "")
        return hint + (f" NPROC={world_size}" if world_size > 1 else "")
    launcher = ["python", "-m"]
    if world_size > 1:
        launcher = ["torchrun", f"--nproc_per_node={world_size}", "-m"]
    return shell_command(*launcher, "gptexp.resume", f"run={path}", *args)


class TrainingPruned(Exception):
    """A search's pruner stopped a weak trial at an evaluation, after saving its checkpoint.
    Not a failure: the run ends ``pruned`` and can be continued like an interrupted one."""

    def __init__(self, step: int, run_path: str) -> None:
        super().__init__(step, run_path)  # both in args: a launcher pickles it back
        self.step, self.run_path = step, run_path

    def __str__(self) -> str:
        return f"pruned at step {self.step}; continue it with: {resume_hint(self.run_path)}"


class TrainingDiverged(FloatingPointError):
    """Training produced NaN or infinite values, or more loss spikes than the guard's bounds
    allow (``training.guard``). The run fails (exit 1); its last valid checkpoint is intact."""


class JobFailed(RuntimeError):
    """A multirun job that failed; its run.json says why."""


class RunFailed(RuntimeError):
    """A run that had started stopped on a failure that is not its training's: a file it could
    not write (a full disk, a read-only directory), a checkpoint that could not be saved. Its
    run.json says ``failed`` with the error; what it wrote before (checkpoints included) is
    intact, so it resumes exactly once the cause is fixed (exit 1)."""


def describe_os_error(error: OSError) -> str:
    """``<path>: <reason>`` of an OSError (the path it names, the system's words for errno)."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{error.filename}: {reason}" if error.filename else reason


# What "bad input" means everywhere: these print one line and exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, RunError)
