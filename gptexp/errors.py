"""Every exception gptexp raises on purpose, and the exit codes the commands leave with.

A *user error* is bad input: a config value that cannot work, data that cannot be had, an
unusable checkpoint, a path that is not a run, a run that is busy. Commands print its message
(``error: ...``) and exit 2; nothing has been written by then. A clean stop on a signal exits
130 after saving; any other failure exits 1. :func:`gptexp.cli.run_command` is the one place
that turns these into exit codes.
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

    def __init__(self, signame: str, step: int, run_path: str | None = None) -> None:
        where = resume_hint(run_path) if run_path else "make resume RUN=<run dir>"
        super().__init__(f"stopped by {signame} at step {step}; resume with: {where}")
        self.signame = signame
        self.step = step


def shell_command(*words: object) -> str:
    """A command for a hint, to be pasted into a shell: each word quoted where it must be
    (a path with a space or a quote)."""
    return " ".join(shlex.quote(str(word)) for word in words)


def resume_hint(run_path: object, *args: str) -> str:
    """How to resume the run at ``run_path``: ``make resume RUN=...`` (the documented way),
    or, for a path make would split at its spaces, the python command it runs."""
    path = str(run_path)
    if all(shlex.quote(word) == word for word in (path, *args)):
        return f"make resume RUN={path}" + (f' ARGS="{" ".join(args)}"' if args else "")
    return shell_command("python", "-m", "gptexp.resume", f"run={path}", *args)


class TrainingDiverged(FloatingPointError):
    """Training produced NaN or infinite values, or more loss spikes than the guard's bounds
    allow (``training.guard``). The run fails (exit 1); its last valid checkpoint is intact."""


class JobFailed(RuntimeError):
    """A multirun job that failed; its run.json says why."""


# What "bad input" means everywhere: these print one line and exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, RunError)
