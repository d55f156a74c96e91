"""Runs as rows: what every tool that lists runs shows (compare, sweep summaries, eval of a
sweep). A row is read from the run directory alone (run.json, metrics.jsonl, the launch's
overrides), so it works on runs that are training, interrupted, crashed or failed. No torch.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from gptexp.core.errors import RunError
from gptexp.core.fsio import atomic_write_json, atomic_write_text
from gptexp.observe.lineage import fork_parent
from gptexp.observe.metrics import (
    BEST_VAL_LOSS,
    FINAL_TRAIN_LOSS,
    FINAL_VAL_LOSS,
    FINAL_VAL_LOSS_EMA,
    INHERITED,
    MEDIAN_TOKENS_PER_S,
    STEP,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_LOSS_EMA,
    flatten,
    is_number,
    median_throughput,
    read_metrics,
    values_of,
)
from gptexp.observe.rundir import CRASHED, INTERRUPTED, RunDirectory, read_json_object, runs_under
from gptexp.observe.tables import markdown_table, shorten

# The columns after the ones that set runs apart; "run" and "status" come first.
METRIC_COLUMNS = ("params", "step", BEST_VAL_LOSS, FINAL_VAL_LOSS, MEDIAN_TOKENS_PER_S)
DEFAULT_CHOICE = "(default)"  # a config group the run did not choose explicitly
PARENT = "parent@step"  # a fork's lineage column: the run it branched from, at which step
VALUE_WIDTH = 40  # a value in a run's label or a table cell, at most (start…end)
LABEL_WIDTH = 100  # a run's label: the keys that fit, then "(+N more)"
DAMAGED = "damaged"  # the status of a run whose files cannot be read (the row says why)


def override_keys(overrides: list[str]) -> list[str]:
    return [item.partition("=")[0].lstrip("+~") for item in overrides]


def launch_overrides(run: RunDirectory, status: dict[str, Any]) -> list[str]:
    """What the launch changed (run.json keeps it; Hydra's overrides.yaml before that)."""
    overrides = status.get("overrides")
    if overrides is None:
        return run.overrides()
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise RunError(f"{run.run_json}: damaged (overrides is not a list of strings)")
    return overrides


def changed_keys(status: dict[str, Any], overrides: list[str]) -> list[str]:
    """Every key the run's starts changed: the launch's overrides, then each resume's (a
    resume entry of another shape changed nothing that can be shown)."""
    keys = override_keys(overrides)
    resumes = status.get("resumes")
    for entry in resumes if isinstance(resumes, list) else []:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        keys += [k for k in changes if k not in keys] if isinstance(changes, dict) else []
    return keys


def run_row(run: RunDirectory, base: Path | None = None) -> dict[str, Any]:
    """One run as a flat dict: status, the effective value of every key its starts changed,
    size, steps, losses, speed."""
    status = run.read_status()
    overrides = launch_overrides(run, status)
    if not isinstance(status.get("config") or {}, dict):
        raise RunError(f"{run.run_json}: damaged (its config is not a mapping)")
    config = flatten(status.get("config") or {})
    records = [r for r in read_metrics(run.metrics) if not r.get("event")]
    val, train = values_of(records, VAL_LOSS), values_of(records, TRAIN_LOSS)
    # The average's loss beside the last val/loss: none where the run (a fork, a resume) no
    # longer keeps one, though records before hold its (or its parent's) earlier average.
    evaluated = next((r for r in reversed(records) if is_number(r.get(VAL_LOSS))), {})
    averaged = evaluated.get(VAL_LOSS_EMA)
    chosen = dict(item.lstrip("+~").partition("=")[::2] for item in overrides)
    settings = {
        key: config.get(key, chosen.get(key)) if "." in key else chosen.get(key, DEFAULT_CHOICE)
        for key in changed_keys(status, overrides)
    }
    row: dict[str, Any] = {
        "run": display_name(run.path, base),
        "status": run.status(),
        **settings,
        "params": status.get("parameters"),
        STEP: max((r[STEP] for r in records), default=status.get(STEP)),
        "max_steps": config.get("training.max_steps", status.get("max_steps")),
        BEST_VAL_LOSS: min(val) if val else None,
        FINAL_VAL_LOSS: val[-1] if val else None,
        FINAL_VAL_LOSS_EMA: averaged if is_number(averaged) else None,
        FINAL_TRAIN_LOSS: train[-1] if train else None,
        # A fork's own speed: the records it inherited were its parent's (another process).
        MEDIAN_TOKENS_PER_S: median_throughput(
            values_of([r for r in records if not r.get(INHERITED)], TOKENS_PER_S)
        ),
        "settings": list(settings),
        "overrides": overrides,
        "config": config,  # flat; for filters on any config key (not a column)
        "run_dir": str(run.path),
    }
    if row["status"] in (INTERRUPTED, CRASHED):
        row["resume_step"] = resume_step(run)
    if status.get("error"):
        row["error"] = status["error"]
    parent = fork_parent(status)
    if parent is not None:
        row[PARENT] = f"{display_name(Path(parent['run']), base)}@{parent['step']}"
        row["fork_step"] = parent["step"]
    return row


def resume_step(run: RunDirectory) -> int | None:
    """The step a resume of ``run`` would start from: its newest listed checkpoint whose file
    is there (0: none, it starts again), read without torch and unverified (resume verifies);
    None when the manifest cannot be read."""
    manifest = run.checkpoints / "manifest.json"
    if not manifest.is_file():
        return 0
    try:
        entries = read_json_object(manifest).get("checkpoints")
    except RunError:
        return None
    if not isinstance(entries, list):
        return None
    steps = [
        entry["step"]
        for entry in entries
        if isinstance(entry, dict)
        and isinstance(entry.get("step"), int)
        and isinstance(entry.get("file"), str)
        and Path(entry["file"]).name == entry["file"]
        and (run.checkpoints / entry["file"]).is_file()
    ]
    return max(steps, default=0)


def display_name(path: Path, base: Path | None) -> str:
    """A run's path relative to ``base`` where it lies under it, else its directory name."""
    path = Path(path)
    return str(path.relative_to(base)) if base and path.is_relative_to(base) else path.name


def damaged_row(run: RunDirectory, base: Path | None, error: RunError) -> dict[str, Any]:
    """A run whose files cannot be read, as a row that says why (one damaged run must not
    hide the others of a sweep)."""
    reason = str(error).splitlines()[0].replace(str(run.path) + "/", "")
    return {
        "run": display_name(run.path, base),
        "status": DAMAGED,
        "error": reason,
        "settings": [],
        "overrides": [],
        "config": {},
        "run_dir": str(run.path),
    }


def readable_row(run: RunDirectory, base: Path | None = None) -> dict[str, Any]:
    try:
        return run_row(run, base)
    except RunError as error:
        return damaged_row(run, base, error)


def run_rows(runs: list[RunDirectory], base: Path | None = None) -> list[dict[str, Any]]:
    """The rows of ``runs`` (a damaged run is a row saying why); a config key that some run
    changed and another did not shows the other's effective value (a fork's ``training.lr``
    next to its parent's), not a blank."""
    rows = [readable_row(run, base) for run in runs]
    changed = {key for row in rows for key in row["settings"] if "." in key}
    for row in rows:
        missing = [key for key in changed if key not in row]
        row |= {key: row["config"][key] for key in missing if key in row["config"]}
    return rows


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
    """A short name for a run among others: its values of the distinguishing keys, each value
    and the whole capped (a long path or many keys must not make a 400-character column)."""
    parts = [f"{key}={shorten(str(row.get(key, DEFAULT_CHOICE)), VALUE_WIDTH)}" for key in keys]
    shown: list[str] = []
    for part in parts:
        if shown and len(" ".join([*shown, part])) > LABEL_WIDTH:
            shown.append(f"(+{len(parts) - len(shown)} more)")
            break
        shown.append(part)
    text = " ".join(shown) or row["run"]
    return text if row["status"] == "finished" else f"{text} ({row['status']})"


def labels(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """:func:`label` of each row, made unique: a fork that changed nothing is not named like
    its parent (it says whose fork it is), and other twins add their run's name."""
    names = [label(row, keys) for row in rows]
    forks = [f"fork of {row[PARENT]}" if PARENT in row else "" for row in rows]
    for extras in (forks, [row["run"] for row in rows]):  # forks first, then any twins left
        twins = {name for name in names if names.count(name) > 1}
        names = [
            f"{name} [{extra}]" if name in twins and extra else name
            for name, extra in zip(names, extras, strict=True)
        ]
    return names


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The lineage column where a run is a fork; ``final/val_loss_ema`` after ``final/val_loss``
    where a run keeps a weight average."""
    lineage = [PARENT] if any(PARENT in row for row in rows) else []
    metrics = list(METRIC_COLUMNS)
    if any(row.get(FINAL_VAL_LOSS_EMA) is not None for row in rows):
        metrics.insert(metrics.index(FINAL_VAL_LOSS) + 1, FINAL_VAL_LOSS_EMA)
    return ["run", "status", *lineage, *distinguishing_keys(rows), *metrics]


def format_cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if column == "status" and value == DAMAGED:
        return f"{DAMAGED}: {row['error']}"
    if column == STEP and row.get("resume_step") not in (None, value):
        # An unfinished run goes on from its checkpoint, not from its last logged step.
        total = f"/{row['max_steps']}" if row.get("max_steps") else ""
        return f"{row['resume_step']}{total} (logged {value})"
    if column == STEP and value is not None and row.get("max_steps"):
        return f"{value}/{row['max_steps']}"
    if value is None:
        return DEFAULT_CHOICE if column in row.get("settings", ()) else "-"
    if column == "params" and is_number(value):
        return f"{value / 1e6:.2f}M"
    if column == MEDIAN_TOKENS_PER_S and is_number(value):
        return f"{value:,.0f}"
    if column.endswith(("_loss", "_loss_ema")) and is_number(value):
        return f"{value:.4f}"
    return str(value) if column in ("run", "status") else shorten(str(value), VALUE_WIDTH)


def cells(rows: list[dict[str, Any]], columns: list[str]) -> list[list[str]]:
    return [[format_cell(row, column) for column in columns] for row in rows]


# ----------------------------------------------------------------------------- the summary


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``sweep.json`` and ``summary.md`` for the runs in ``sweep_dir``; returns the rows.

    Jobs of a parallel launcher finish in their own processes; the lock makes the last writer
    the one that saw every run's final status.
    """
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".summary.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = run_rows(runs_under(sweep_dir))
        jobs = [{key: value for key, value in row.items() if key != "config"} for row in rows]
        atomic_write_json(sweep_dir / "sweep.json", {"sweep_dir": str(sweep_dir), "jobs": jobs})
        columns = table_columns(rows)
        table = markdown_table(columns, cells(rows, columns))
        atomic_write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir.name}\n\n{table}")
    return rows


# ----------------------------------------------------------------------------- lineage


def runs_below(directory: Path) -> list[RunDirectory]:
    """Every run at or below ``directory``, at any depth (a run's own folders are not
    searched), in path order."""
    found: list[RunDirectory] = []
    pending = [Path(directory)]
    while pending:
        folder = pending.pop()
        candidate = RunDirectory(folder)
        if candidate.is_run():
            found.append(candidate)
            continue
        # Never through a link: a link to a folder above would be walked forever.
        pending += [c for c in folder.iterdir() if c.is_dir() and not c.is_symlink()]
    return sorted(found, key=lambda run: str(run.path))


def readable_status(run: RunDirectory) -> dict[str, Any]:
    """run.json, or ``{"damaged": <why>}`` for one that cannot be read."""
    try:
        return run.read_status()
    except RunError as error:
        return {DAMAGED: str(error).splitlines()[0].replace(str(run.path) + "/", "")}


def family_tree(runs: list[RunDirectory], base: Path | None = None) -> str:
    """The runs as a forest: each root, its forks indented under it with the step they
    branched at and what they changed. A fork whose parent is not among ``runs`` is a root
    that names its parent."""
    by_path = {run.path: run for run in runs}
    statuses = {run.path: readable_status(run) for run in runs}
    children: dict[Path, list[RunDirectory]] = {run.path: [] for run in runs}
    roots = []
    for run in runs:
        parent = fork_parent(statuses[run.path])
        parent_path = Path(parent["run"]).resolve() if parent else None
        if parent_path in by_path and parent_path != run.path:
            children[parent_path].append(run)
        else:
            roots.append(run)

    def describe(run: RunDirectory, as_root: bool) -> str:
        status = statuses[run.path]
        parts = [display_name(run.path, base)]
        parent = fork_parent(status)
        if parent is not None:
            origin = f"{parent['run']}@{parent['step']}" if as_root else f"@{parent['step']}"
            parts.append(f"fork of {origin}" if as_root else origin)
            changed = [str(item) for item in status.get("fork_overrides") or []]
            if status.get("reset"):
                changed.append("reset=" + ",".join(status["reset"]))
            parts.append(" ".join(changed) or "(no change)")
        if DAMAGED in status:
            parts.append(f"{DAMAGED}: {status[DAMAGED]}")
            return "  ".join(parts)
        step = status.get(STEP)
        parts.append(f"{run.status()}" + (f" at step {step}" if step is not None else ""))
        return "  ".join(parts)

    lines: list[str] = []

    def walk(run: RunDirectory, prefix: str, last: bool, root: bool) -> None:
        branch = "" if root else ("└─ " if last else "├─ ")
        lines.append(prefix + branch + describe(run, root))
        below = prefix if root else prefix + ("   " if last else "│  ")
        forks = sorted(
            children[run.path], key=lambda r: (fork_parent(statuses[r.path])["step"], str(r.path))
        )
        for index, child in enumerate(forks):
            walk(child, below, index == len(forks) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines)
