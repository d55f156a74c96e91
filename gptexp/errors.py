"""Every exception gptexp raises on purpose, and the exit codes the commands leave with.

A *user error* is bad input: a config value that cannot work, data that cannot be had, an
unusable checkpoint, a path that is not a run, a run that is busy. Commands print its message
(``error: ...``) and exit 2; nothing has been written by then. A clean stop on a signal exits
130 after saving; any other failure exits 1. :func:`gptexp.cli.run_command` is the one place
that turns these into exit codes.
"""

from __future__ import annotations

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
        where = f"make resume RUN={run_path}" if run_path else "make resume RUN=<run dir>"
        super().__init__(f"stopped by {signame} at step {step}; resume with: {where}")
        self.signame = signame
        self.step = step


class TrainingPruned(Exception):
    """A search's pruner stopped a weak trial at an evaluation, after saving its checkpoint.
    Not a failure: the run ends ``pruned`` and can be continued like an interrupted one."""

    def __init__(self, step: int, run_path: str) -> None:
        super().__init__(step, run_path)  # both in args: a launcher pickles it back
        self.step, self.run_path = step, run_path

    def __str__(self) -> str:
        return f"pruned at step {self.step}; continue it with: make resume RUN={self.run_path}"


class TrainingDiverged(FloatingPointError):
    """Training produced NaN or infinite values, or more loss spikes than the guard's bounds
    allow (``training.guard``). The run fails (exit 1); its last valid checkpoint is intact."""


class JobFailed(RuntimeError):
    """A multirun job that failed; its run.json says why."""


# What "bad input" means everywhere: these print one line and exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, RunError)
