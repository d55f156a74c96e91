"""``metrics.jsonl``, the names of the metrics, and the summaries made from them.

``metrics.jsonl`` is the record of a run: one JSON object per line, each with an integer
``step`` and flat metric names. A resumed run rewinds it to its checkpoint's step, so the file
never holds a step twice. The names below are the only spellings: the trainer logs them, W&B
mirrors them, run.json and compare show them. No torch here.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gptexp.core.fsio import atomic_write_text

log = logging.getLogger(__name__)

# Per-step records
STEP = "step"
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_LOSS_EMA = "val/loss_ema"  # val/loss of the weights' moving average (training.ema_decay)
LR = "lr"
GRAD_NORM = "grad_norm"
TOKENS = "tokens"
TOKENS_PER_S = "throughput/tokens_per_s"
MFU = "throughput/mfu"  # model FLOPs utilisation against the device's peak (gptexp.training.mfu)
STEP_SECONDS = "time/step_s"  # mean wall time of the updates in the logging window
# A fork's metrics.jsonl begins with its parent's records up to the fork step, marked so.
INHERITED = "inherited"

# Event records (not metrics: tables and the W&B mirror keep them apart by the EVENT key)
EVENT = "event"
SPIKE_EVENT = "spike"  # a loss spike or non-finite update the guard acted on
EVENT_NUMBER = "n"  # guard events are numbered 1, 2, ... within a run

# Run summaries (run.json, W&B summary, compare and sweep tables)
BEST_VAL_LOSS = "best/val_loss"
FINAL_VAL_LOSS = "final/val_loss"
FINAL_VAL_LOSS_EMA = "final/val_loss_ema"  # the last val/loss_ema, where the run keeps an average
FINAL_TRAIN_LOSS = "final/train_loss"
MEDIAN_TOKENS_PER_S = "throughput/median_tokens_per_s"


def best_metric_name(monitor: str) -> str:
    """``val/loss`` -> ``best/val_loss``: the summary name of the monitored metric's best."""
    return "best/" + monitor.replace("/", "_")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def median_throughput(values: Iterable[float]) -> float | None:
    """The steady speed of a run: the median of its logged tokens/s, leaving out the first
    window (it holds start-up costs) when there are others."""
    windows = list(values)
    speeds = [v for v in (windows[1:] or windows) if is_number(v)]
    return statistics.median(speeds) if speeds else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file: JSON objects with an integer ``step``.

    A torn last line (a crash mid-write) is skipped silently; any other line that is not such
    a record (bad UTF-8, not JSON, nested too deep, a number too long for Python's int, no
    step) is skipped with one warning that says how many.
    """
    if not path.is_file():
        return []
    records, damaged = [], 0
    text = path.read_bytes().decode("utf-8", errors="replace")  # a bad byte spoils its line only
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is not None:
            records.append(record)
        elif number < len(lines):  # a line the writer finished (the torn one has no newline)
            damaged += 1
    if damaged:
        log.warning(
            "%s: skipped %d damaged line%s (not a JSON record with an integer step)",
            path,
            damaged,
            "" if damaged == 1 else "s",
        )
    return records


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # ValueError: JSON, and an int of too many digits
        return None
    if not isinstance(record, dict):
        return None
    step = record.get(STEP)
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def values_of(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records if is_number(r.get(key))]


class MetricsFile:
    """Appends step-stamped records to ``metrics.jsonl``, one line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def rewind(self, step: int, events: int = 0) -> int:
        """Drop every record after ``step`` (atomically); returns how many were dropped.

        Guard events are kept by number instead (the first ``events`` of them): after a
        rollback a run logs steps it has logged before, so an event's step does not say
        whether the checkpoint it is rewound to already knew of it.
        """
        self.close()  # the rewritten file is a new one; appends must go there
        records = read_metrics(self.path)
        kept = [r for r in records if _kept(r, step, events)]
        if self.path.exists():
            atomic_write_text(self.path, "".join(_line(r) for r in kept))
        return len(records) - len(kept)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._file.write(_line(record))
        self._file.flush()  # one line at a time: a crash loses at most the line in flight

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _kept(record: dict[str, Any], step: int, events: int) -> bool:
    number = record.get(EVENT_NUMBER)
    if record.get(EVENT) == SPIKE_EVENT and isinstance(number, int):
        return number <= events
    return record[STEP] <= step


def _line(record: dict[str, Any]) -> str:
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    return json.dumps(clean) + "\n"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_layer": 4}}`` -> ``{"model.n_layer": 4}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = value
    return flat


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for every flattened key whose value differs."""
    before, after = flatten(old), flatten(new)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }
