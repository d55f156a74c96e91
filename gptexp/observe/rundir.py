"""The run directory: its layout, what counts as a run, its status, its lock and its log.

Everything needed to resume, evaluate or compare a run lives inside its directory, so every
tool takes just a path. ``run.json`` records the status (running | finished | interrupted |
failed) and the facts of the run; ``.lock`` is held (``flock``) by the process training it.
No torch here: compare and sweep summaries read run directories without it (what a run records
about the machine and the source tree is gptexp.run.provenance's).

Links: gptexp writes nothing through a symbolic link in a run directory (a linked train.log
or eval/ would put the run's output somewhere else): a file or folder it writes that is a link
is refused with one line (:meth:`RunDirectory.refuse_links`), and walks over directories never
follow a link to a folder (a link to a folder above would be walked forever).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptexp.core.errors import RunError
from gptexp.core.fsio import atomic_write_json

log = logging.getLogger(__name__)

# What run.json records ...
RUNNING, FINISHED, INTERRUPTED, FAILED = "running", "finished", "interrupted", "failed"
PRUNED = "pruned"  # a search's pruner stopped the trial at an evaluation (resumable)
# ... and what a reader concludes beyond it (see RunDirectory.status).
CRASHED = "crashed"  # run.json says running, but no process holds the run's lock
PENDING = "pending"  # the directory exists, training never started


class RunDirectory:
    """Paths and status of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()

    hydra_dir = property(lambda self: self.path / ".hydra")
    config_yaml = property(lambda self: self.path / ".hydra" / "config.yaml")
    overrides_yaml = property(lambda self: self.path / ".hydra" / "overrides.yaml")
    run_json = property(lambda self: self.path / "run.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    eval_dir = property(lambda self: self.path / "eval")
    samples = property(lambda self: self.path / "samples.txt")
    log_file = property(lambda self: self.path / "train.log")
    lock_file = property(lambda self: self.path / ".lock")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")  # logger=tensorboard

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    def written(self) -> tuple[Path, ...]:
        """The files and folders that training writes in the run."""
        return (
            self.hydra_dir,
            self.run_json,
            self.metrics,
            self.checkpoints,
            self.tokenizer,
            self.samples,
            self.log_file,
            self.lock_file,
            self.tensorboard_dir,
        )

    def refuse_links(self, *paths: Path) -> None:
        """A RunError when one of ``paths`` (default: :meth:`written`), or a folder between it
        and the run, is a symbolic link: gptexp never writes through one."""
        for path in paths or self.written():
            current = self.path
            for part in Path(path).relative_to(self.path).parts:
                current = current / part
                if current.is_symlink():
                    raise RunError(
                        f"{current} is a symbolic link; gptexp writes nothing through a link in "
                        "a run directory: replace it with the file or folder itself"
                    )

    def is_run(self) -> bool:
        """A run is a directory with run.json (written when training starts) or Hydra's
        composed config (a job whose directory exists but whose training never started)."""
        return self.run_json.is_file() or self.config_yaml.is_file()

    def has_started(self) -> bool:
        return self.run_json.is_file()

    def status(self) -> str:
        """The one definition of a run's status, used by every tool: what run.json says,
        except that a run recorded as running whose lock no process holds has ``crashed``
        (killed without a chance to say so; resumable like an interrupted run), and a run
        that never recorded a status is ``pending``."""
        recorded = self.read_status().get("status")
        if recorded is None:
            return PENDING
        if recorded == RUNNING and not self.is_locked():
            return CRASHED
        return str(recorded)

    def is_locked(self) -> bool:
        """Whether a live process holds the run's lock (i.e. is training it now)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the shared lock taken just now
        return False

    def read_status(self) -> dict[str, Any]:
        """run.json as a dict ({} before training started); a RunError naming the file when
        it is anything else (see :func:`read_json_object`)."""
        if not self.run_json.is_file():
            return {}
        return read_json_object(self.run_json)

    def update_status(self, **fields: Any) -> dict[str, Any]:
        status = self.read_status() | fields
        atomic_write_json(self.run_json, status)
        return status

    def overrides(self) -> list[str]:
        """What the user changed at launch (Hydra's overrides.yaml: a list of strings), or [];
        a RunError naming the file when it holds anything else."""
        if not self.overrides_yaml.is_file():
            return []
        items = read_yaml(self.overrides_yaml)
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise RunError(f"{self.overrides_yaml}: damaged (not a list of overrides)")
        return items

    @contextmanager
    def lock(self):
        """Hold the run's lock for the duration; a second trainer gets a clear RunError.

        ``flock`` is released by the kernel when the process dies, however it dies, so a
        killed run never leaves a stale lock behind.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self.refuse_links()  # every trainer takes the lock before it writes anything
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RunError(
                    f"{self.path} is being trained by a live process (pid {holder}); "
                    "stop it first, or wait for it to finish"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def require_run(path: str | Path) -> RunDirectory:
    """The run at ``path``, or a RunError saying why it is not one."""
    run = RunDirectory(path)
    if not run.path.exists():
        raise RunError(f"{path}: no such directory")
    if not run.path.is_dir():
        raise RunError(f"{path}: not a directory")
    if not run.is_run():
        raise RunError(
            f"{path}: not a gptexp run directory (no run.json or .hydra/config.yaml); "
            "runs are the directories that python -m gptexp.train creates under outputs/"
        )
    return run


def job_order(name: str) -> tuple[int, int, str]:
    """Sort key of the runs of a directory: Hydra's job numbers in numeric order, each followed
    by the directories claimed next to it (``3``, ``3-1``, ``3-2``, then ``4``), then named
    runs alphabetically."""
    number, _, rest = name.partition("-")
    if number.isdigit() and (not rest or rest.isdigit()):
        return (int(number), int(rest or 0), "")
    return (sys.maxsize, 0, name)


def runs_under(directory: Path) -> list[RunDirectory]:
    """The run directories directly under ``directory`` (a sweep, or ``outputs/runs``), in
    job order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        RunDirectory(child)
        for child in directory.iterdir()
        if child.is_dir() and not child.is_symlink()  # a linked run is not this folder's
    ]
    return sorted((run for run in found if run.is_run()), key=lambda run: job_order(run.path.name))


def find_runs(path: str | Path) -> list[RunDirectory]:
    """The run at ``path``, or every run directly under it (a sweep directory); a RunError
    that says why when there is neither."""
    candidate = RunDirectory(path)
    if not candidate.path.is_dir():
        raise RunError(f"{path}: no such directory")
    if candidate.is_run():
        return [candidate]
    inside = runs_under(candidate.path)
    if not inside:
        raise RunError(
            f"{path}: neither a gptexp run directory (no run.json or .hydra/config.yaml) nor a "
            "sweep (no run directories inside); runs are the directories that "
            "python -m gptexp.train creates under outputs/"
        )
    return inside


def stored_config(run: RunDirectory) -> dict[str, Any]:
    """The run's effective config: the one its last start recorded in run.json, else the
    composed config of its launch (``.hydra/config.yaml``); a RunError naming the file when
    neither is a mapping."""
    status = run.read_status()
    if isinstance(status.get("config"), dict):
        return status["config"]
    if "config" in status:
        raise RunError(f"{run.run_json}: damaged (its config is not a mapping)")
    if not run.config_yaml.is_file():
        raise RunError(
            f"{run.path}: no stored config (run.json has none, .hydra/config.yaml is missing)"
        )
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    composed = read_yaml(run.config_yaml)
    if not isinstance(composed, dict):
        raise RunError(f"{run.config_yaml}: damaged (not a mapping)")
    try:  # Hydra writes ${...} interpolations unresolved
        return OmegaConf.to_container(OmegaConf.create(composed), resolve=True)  # type: ignore[return-value]
    except (OmegaConfBaseException, ValueError, RecursionError) as error:
        raise RunError(f"{run.config_yaml}: damaged ({_first_line(error)})") from None


# ----------------------------------------------------------------------------- readers
# Every file of a run directory may have been written by someone else (copied, hand-edited,
# truncated): each reader checks the shape it needs and says what is wrong in one RunError
# line naming the file, never a traceback from the parser.

READ_ERRORS = (OSError, UnicodeDecodeError, ValueError, RecursionError)  # ValueError: JSON, and
# Python's limit on the digits of an int


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a RunError naming the file when it is not valid UTF-8,
    not JSON, nested too deep, holds an over-long number, or is not an object."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except READ_ERRORS as error:
        reason = "nested too deep" if isinstance(error, RecursionError) else _first_line(error)
        raise RunError(f"{path}: damaged ({reason})") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: damaged (a JSON {type(value).__name__}, not an object)")
    return value


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` as plain lists and dicts, read as OmegaConf reads Hydra's
    files (``1e-3`` is a float), interpolations left as written; a RunError naming the file
    when it cannot be read."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        loaded = OmegaConf.create(Path(path).read_bytes().decode("utf-8"))
        return OmegaConf.to_container(loaded, resolve=False)
    except (*READ_ERRORS, yaml.YAMLError, OmegaConfBaseException) as error:
        reason = "nested too deep" if isinstance(error, RecursionError) else _first_line(error)
        raise RunError(f"{path}: damaged ({reason})") from None


def discard_unstarted(run: RunDirectory) -> None:
    """Remove what Hydra wrote for a run that failed validation before it started.

    Only Hydra's own files go, and a directory only when it is then empty, so a run (or
    anything else) that was already there is never touched. The caller owns the directory: it
    holds the run's lock (train), or made it (fork, a sweep's job); a launch that lost the
    lock to another one would remove the winner's files.
    """
    if run.has_started() or run.checkpoints.exists() or not run.path.is_dir():
        return
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run.hydra_dir / name).unlink(missing_ok=True)
    for path in (run.log_file, run.lock_file):
        path.unlink(missing_ok=True)
    for directory in (run.hydra_dir, run.path):
        try:
            directory.rmdir()
        except OSError:
            return


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
