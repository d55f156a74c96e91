"""The optional TensorBoard mirror of ``metrics.jsonl`` (``logger=tensorboard``).

Every metric record becomes TensorBoard scalars (one per numeric value, tagged with the
metric's name, at the record's step) in ``<run>/tensorboard/``, offline. ``metrics.jsonl``
stays the record; the event files follow its rewinds, so no reader sees a step twice:

- each start of the run writes a fresh event file (TensorBoard reads a directory's files in
  name order, which is the order they were started in);
- a resume first rewinds the earlier event files to the checkpoint it resumes from, with
  metrics.jsonl (gptexp.run.starts.rewind_metrics; also when this start does not write
  TensorBoard): the steps a crashed start logged after that checkpoint are dropped from its
  file (rewritten atomically), and the new start logs them again;
- a spike guard's rollback does the same mid-run (the trainer rewinds every sink that can).

Each record is flushed as it is written, as metrics.jsonl's lines are: a crash loses at most
the record in flight. Guard events (records with an ``event`` key) are not scalars and stay in
metrics.jsonl only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from gptexp.core.errors import ConfigError
from gptexp.observe.metrics import EVENT, STEP, is_number
from gptexp.observe.rundir import RunDirectory

log = logging.getLogger(__name__)

EVENT_FILE_PREFIX = "events.out.tfevents."


def require_tensorboard() -> None:
    """logger=tensorboard needs the package (the ``tensorboard`` extra): said before the run
    directory is written to, not after."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "logger=tensorboard: the tensorboard package is not installed; install it with "
            "pip install 'gptexp[tensorboard]' (make install does), or drop logger=tensorboard"
        ) from None


def event_files(folder: Path) -> list[Path]:
    """The run's own event files, in TensorBoard's reading order (by name); links and other
    entries are not ours to read or rewrite."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.name.startswith(EVENT_FILE_PREFIX) and path.is_file() and not path.is_symlink()
    )


def rewind_event_files(folder: Path, step: int) -> int:
    """Drop every scalar logged after ``step`` from the event files in ``folder`` (each file
    rewritten atomically, under its own name); returns how many events were dropped."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in event_files(folder):
        # The records as written (a torn last one is left out); parsed only for their step.
        records = list(RawEventFileLoader(str(path)).Load())
        if not records or not Event.FromString(records[0]).HasField("file_version"):
            log.warning("TensorBoard: %s is not an event file; left as it is", path)
            continue
        kept = [r for r in records if _step_of(Event.FromString(r), step) <= step]
        if len(kept) == len(records) and _intact(path, records):
            continue
        dropped += len(records) - len(kept)
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".rewind-")
        try:
            with os.fdopen(fd, "wb") as out:
                writer = RecordWriter(out)
                for record in kept:
                    writer.write(record)
                out.flush()
                os.fchmod(out.fileno(), path.stat().st_mode & 0o777)
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    return dropped


def _step_of(event, step: int) -> int:
    """A scalar's step; other events (the file's version header) belong to every step."""
    return event.step if event.HasField("summary") else step


def _intact(path: Path, records: list[bytes]) -> bool:
    """Whether the file holds exactly ``records`` (no torn one after them): 16 bytes of
    framing per record (length, its CRC, the data's CRC)."""
    return path.stat().st_size == sum(16 + len(r) for r in records)


def rewind_run(run_dir: Path, step: int) -> None:
    """A resume's rewind of the run's event files to its checkpoint's ``step``, whether or not
    this start writes TensorBoard (a start without it must not leave a crashed start's steps
    in view)."""
    folder = RunDirectory(run_dir).tensorboard_dir
    if not event_files(folder):
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.warning(
            "TensorBoard: %s is not rewound to step %d (tensorboard is not installed); it "
            "may show steps after that step twice",
            folder,
            step,
        )
        return
    dropped = rewind_event_files(folder, step)
    if dropped:
        log.info("TensorBoard: dropped %d scalars logged after step %d", dropped, step)


class TensorBoardSink:
    """Writes the metric records of one start of a run into a fresh event file (the resume
    has rewound the earlier ones: rewind_run)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.folder = RunDirectory(self.run_dir).tensorboard_dir
        self._writer = None
        self._open()
        log.info("TensorBoard: %s", self.folder)

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder.mkdir(exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.folder))

    def log(self, record: dict[str, Any]) -> None:
        if EVENT in record:
            return
        for key, value in record.items():
            if key != STEP and is_number(value):
                self._writer.add_scalar(key, value, global_step=record[STEP])
        self._writer.flush()  # one record at a time, as metrics.jsonl

    def rewind(self, step: int, events: int = 0) -> None:
        """After a rollback to ``step``: the steps after it will be logged again. The file
        written so far is closed and rewound with the others; a fresh one takes the rest."""
        self.close()
        rewind_run(self.run_dir, step)
        self._open()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
