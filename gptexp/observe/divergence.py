"""Where two runs part, read from their directories alone (no torch): the config keys that
differ (and those that cannot change a number), and the first logged step at which a shared
metric differs."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptexp.core.errors import RunError
from gptexp.observe.metrics import config_diff, read_metrics
from gptexp.observe.rundir import RunDirectory, require_run, stored_config

log = logging.getLogger(__name__)


# Config keys that cannot change a parameter or a logged number. data.path only says where the
# text was; the text itself is compared by its fingerprint (run.json data_fingerprint).
INERT_PREFIXES = ("logger.", "checkpoint.", "hydra.")


INERT_KEYS = frozenset(
    {
        "training.progress",
        "training.sample_every",
        "training.sample_tokens",
        "data.path",
        "experiment",  # the preset's name; the values it sets are compared key by key
    }
)


# Metric record keys that are markers, not numbers of the training.
MARKER_KEYS = frozenset({"step", "inherited", "event"})


# Words of a metric name that make it a measure of time or speed, which differs run to run.
TIME_WORDS = frozenset({"time", "seconds", "sec", "ms", "elapsed", "duration", "eta", "s"})


# Within one step, the losses are reported first: they are what users look at.
METRIC_PRIORITY = ("train/loss", "val/loss")


@dataclass
class RunInfo:
    """What the diff reads of one run directory."""

    run: RunDirectory
    status: dict[str, Any]
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def last_step(self) -> int:
        """The furthest step the run's metrics reached (its run.json step without metrics)."""
        steps = [r["step"] for r in self.records]
        return max(steps) if steps else int(self.status.get("step") or 0)


def load_run(path: str | Path) -> RunInfo:
    """The run at ``path``: RunError (exit 2) when it is not one or cannot be read."""
    run = require_run(path)
    try:
        return RunInfo(run, run.read_status(), stored_config(run), read_metrics(run.metrics))
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise RunError(f"{path}: unreadable ({reason})") from None


def is_inert(key: str) -> bool:
    """Whether config ``key`` cannot change the numbers of a run."""
    return key in INERT_KEYS or key.startswith(INERT_PREFIXES)


def config_difference(a: RunInfo, b: RunInfo) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(keys that can change the numbers, keys that cannot), each a list of {key, a, b}.

    A key that one config lacks (an older schema) shows as None on that side. A different
    text under the same config shows as ``data.fingerprint``.
    """
    rows = [
        {"key": key, "a": value_a, "b": value_b}
        for key, (value_a, value_b) in config_diff(a.config, b.config).items()
    ]
    print_a, print_b = a.status.get("data_fingerprint"), b.status.get("data_fingerprint")
    if print_a and print_b and print_a != print_b:
        rows.append({"key": "data.fingerprint", "a": print_a, "b": print_b})
    changed = [row for row in rows if not is_inert(row["key"])]
    inert = [row for row in rows if is_inert(row["key"])]
    return changed, inert


def is_compared_metric(key: str, value: Any) -> bool:
    """Numbers of the training only: no markers, no times or speeds, no strings or flags.
    None stands for a non-finite number (metrics.jsonl writes NaN and inf as null)."""
    if key in MARKER_KEYS or key.startswith("throughput/"):
        return False
    if TIME_WORDS & set(re.split(r"[/_.\-]", key.lower())):
        return False
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def records_by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """One dict per step (several records of a step, e.g. an event beside the metrics, are
    merged; a key logged twice in a step keeps its last value)."""
    steps: dict[int, dict[str, Any]] = {}
    for record in records:
        steps.setdefault(record["step"], {}).update(record)
    return steps


def _metric_order(key: str) -> tuple[int, str]:
    rank = METRIC_PRIORITY.index(key) if key in METRIC_PRIORITY else len(METRIC_PRIORITY)
    return rank, key


def first_metric_divergence(
    records_a: list[dict[str, Any]], records_b: list[dict[str, Any]]
) -> dict[str, Any]:
    """Over the steps both runs logged: the first step at which a shared metric differs.

    Returns ``first`` ({step, key, a, b} or None), ``by_key`` (the first differing step of
    every metric that differs), ``common_steps`` (how many steps were compared) and
    ``identical_through`` (the last common step, when nothing differs).
    """
    steps_a, steps_b = records_by_step(records_a), records_by_step(records_b)
    common = sorted(steps_a.keys() & steps_b.keys())
    by_key: dict[str, dict[str, Any]] = {}
    for step in common:
        ra, rb = steps_a[step], steps_b[step]
        for key in sorted(ra.keys() & rb.keys(), key=_metric_order):
            if key in by_key:
                continue
            if not (is_compared_metric(key, ra[key]) and is_compared_metric(key, rb[key])):
                continue
            if ra[key] != rb[key]:  # exact: deterministic runs agree to the last bit
                by_key[key] = {"step": step, "a": ra[key], "b": rb[key]}
    first = None
    if by_key:
        key = min(by_key, key=lambda k: (by_key[k]["step"], *_metric_order(k)))
        first = {"key": key, **by_key[key]}
    return {
        "first": first,
        "by_key": by_key,
        "common_steps": len(common),
        "identical_through": common[-1] if common and first is None else None,
    }
