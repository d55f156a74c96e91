"""Runs as rows: what every tool that lists runs shows (compare, sweep summaries, eval of a
sweep). A row is read from the run directory alone (run.json, metrics.jsonl, the launch's
overrides), so it works on runs that are training, interrupted, crashed or failed. No torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptexp.metrics import (
    BEST_VAL_LOSS,
    FINAL_TRAIN_LOSS,
    FINAL_VAL_LOSS,
    MEDIAN_TOKENS_PER_S,
    STEP,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    flatten,
    median_throughput,
    read_metrics,
    values_of,
)
from gptexp.rundir import RunDirectory

# The columns after the ones that set runs apart; "run" and "status" come first.
METRIC_COLUMNS = ("params", "step", BEST_VAL_LOSS, FINAL_VAL_LOSS, MEDIAN_TOKENS_PER_S)
DEFAULT_CHOICE = "(default)"  # a config group the run did not choose explicitly


def override_keys(overrides: list[str]) -> list[str]:
    return [item.partition("=")[0].lstrip("+~") for item in overrides]


def launch_overrides(run: RunDirectory, status: dict[str, Any]) -> list[str]:
    """What the launch changed (run.json keeps it; Hydra's overrides.yaml before that)."""
    overrides = status.get("overrides")
    return overrides if isinstance(overrides, list) else run.overrides()


def changed_keys(status: dict[str, Any], overrides: list[str]) -> list[str]:
    """Every key the run's starts changed: the launch's overrides, then each resume's."""
    keys = override_keys(overrides)
    for entry in status.get("resumes", []):
        keys += [k for k in entry.get("changes", {}) if k not in keys]
    return keys


def run_row(run: RunDirectory, base: Path | None = None) -> dict[str, Any]:
    """One run as a flat dict: status, the effective value of every key its starts changed,
    size, steps, losses, speed."""
    status = run.read_status()
    overrides = launch_overrides(run, status)
    config = flatten(status.get("config") or {})
    records = [r for r in read_metrics(run.metrics) if not r.get("event")]
    val, train = values_of(records, VAL_LOSS), values_of(records, TRAIN_LOSS)
    chosen = dict(item.lstrip("+~").partition("=")[::2] for item in overrides)
    settings = {
        key: config.get(key, chosen.get(key)) if "." in key else chosen.get(key, DEFAULT_CHOICE)
        for key in changed_keys(status, overrides)
    }
    name = str(run.path.relative_to(base)) if base and run.path.is_relative_to(base) else None
    row: dict[str, Any] = {
        "run": name or run.path.name,
        "status": run.status(),
        **settings,
        "params": status.get("parameters"),
        STEP: max((r[STEP] for r in records), default=status.get(STEP)),
        "max_steps": config.get("training.max_steps", status.get("max_steps")),
        BEST_VAL_LOSS: min(val) if val else None,
        FINAL_VAL_LOSS: val[-1] if val else None,
        FINAL_TRAIN_LOSS: train[-1] if train else None,
        MEDIAN_TOKENS_PER_S: median_throughput(values_of(records, TOKENS_PER_S)),
        "settings": list(settings),
        "overrides": overrides,
        "run_dir": str(run.path),
    }
    if status.get("error"):
        row["error"] = status["error"]
    return row


def run_rows(runs: list[RunDirectory], base: Path | None = None) -> list[dict[str, Any]]:
    return [run_row(run, base) for run in runs]


def distinguishing_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same in every row: what sets these runs apart (for a
    single run, every key it changed)."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row["settings"] if key not in keys]
    if len(rows) < 2:
        return keys
    return [key for key in keys if len({str(row.get(key, DEFAULT_CHOICE)) for row in rows}) > 1]


def label(row: dict[str, Any], keys: list[str]) -> str:
    """A short name for a run among others: its values of the distinguishing keys."""
    text = " ".join(f"{key}={row.get(key, DEFAULT_CHOICE)}" for key in keys) or row["run"]
    return text if row["status"] == "finished" else f"{text} ({row['status']})"


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    return ["run", "status", *distinguishing_keys(rows), *METRIC_COLUMNS]


def format_cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if column == STEP and value is not None and row.get("max_steps"):
        return f"{value}/{row['max_steps']}"
    if value is None:
        return DEFAULT_CHOICE if column in row.get("settings", ()) else "-"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    if column == MEDIAN_TOKENS_PER_S:
        return f"{value:,.0f}"
    if column.endswith("_loss"):
        return f"{value:.4f}"
    return str(value)


def cells(rows: list[dict[str, Any]], columns: list[str]) -> list[list[str]]:
    return [[format_cell(row, column) for column in columns] for row in rows]
