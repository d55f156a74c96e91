"""``python -m gptexp.compare <sweep dir | run dirs...>``: runs side by side, and their curves.

Reads only the run directories (run.json, metrics.jsonl, .hydra/overrides.yaml), so it works
on runs that are still training, were interrupted, crashed or failed, and says which is which::

    python -m gptexp.compare outputs/sweeps/2026-11-28_12-30-00 --sort final_val_loss --plot
    python -m gptexp.compare outputs/runs/a outputs/runs/b --filter status=finished --csv t.csv
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from gptexp.loggers import flatten, read_metrics
from gptexp.run import RUNNING, RunDirectory, RunError

CRASHED = "crashed"  # run.json says running, but no process holds the run's lock
PENDING = "pending"  # Hydra made the job's directory; training never started

# The columns after the overrides; "run" and "status" come first.
METRIC_COLUMNS = ("params", "step", "best_val_loss", "final_val_loss", "tokens_per_s")


def is_locked(run: RunDirectory) -> bool:
    """Whether a live process holds the run's lock (i.e. is training it now)."""
    try:
        fd = os.open(run.lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock taken just now
    return False


def run_status(run: RunDirectory, status: dict[str, Any]) -> str:
    recorded = status.get("status")
    if recorded is None:
        return PENDING
    if recorded == RUNNING and not is_locked(run):
        return CRASHED  # killed without a chance to say so; resumable like an interrupted run
    return str(recorded)


def parse_override(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key.lstrip("+~"), value


def run_row(run: RunDirectory, base: Path | None = None) -> dict[str, Any]:
    """One run as a flat dict: status, overrides (also one key each), size, steps, losses."""
    status = run.read_status()
    overrides = status.get("overrides")
    if not isinstance(overrides, list):
        overrides = run.overrides()
    records = read_metrics(run.metrics)
    val = [r["val/loss"] for r in records if _is_number(r.get("val/loss"))]
    train = [r["train/loss"] for r in records if _is_number(r.get("train/loss"))]
    speeds = [
        r["throughput/tokens_per_s"]
        for r in records
        if _is_number(r.get("throughput/tokens_per_s"))
    ]
    # The first window holds start-up costs; the median of the rest is the steady speed.
    speeds = speeds[1:] or speeds
    name = str(run.path.relative_to(base)) if base and run.path.is_relative_to(base) else None
    row: dict[str, Any] = {
        "run": name or run.path.name,
        "status": run_status(run, status),
        **dict(parse_override(item) for item in overrides),
        "params": status.get("parameters"),
        "step": max((r["step"] for r in records), default=status.get("step")),
        "max_steps": status.get("max_steps"),
        "best_val_loss": min(val) if val else None,
        "final_val_loss": val[-1] if val else None,
        "final_train_loss": train[-1] if train else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "overrides": overrides,
        "run_dir": str(run.path),
    }
    if status.get("error"):
        row["error"] = status["error"]
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run_rows(runs: list[RunDirectory], base: Path | None = None) -> list[dict[str, Any]]:
    return [run_row(run, base) for run in runs]


def differing_override_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value is not the same in every row (all of them for one row)."""
    keys: list[str] = []
    for row in rows:
        for item in row["overrides"]:
            key = parse_override(item)[0]
            if key not in keys:
                keys.append(key)
    if len(rows) < 2:
        return keys
    return [key for key in keys if len({str(row.get(key)) for row in rows}) > 1]


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    return ["run", "status", *differing_override_keys(rows), *METRIC_COLUMNS]


def format_cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if column == "step" and value is not None and row.get("max_steps"):
        return f"{value}/{row['max_steps']}"
    if value is None:
        return "-"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    if column == "tokens_per_s":
        return f"{value:,.0f}"
    if column.endswith("_loss"):
        return f"{value:.4f}"
    return str(value)


def text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [columns] + [[format_cell(row, column) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_cell(row, column).replace("|", "\\|") for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    """Raw values (not the formatted cells), plus where each run lives."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "max_steps", "final_train_loss", "run_dir"])
        for row in rows:
            extra = [row.get("max_steps"), row.get("final_train_loss"), row["run_dir"]]
            writer.writerow([row.get(column) for column in columns] + extra)


# ----------------------------------------------------------------------------- selection


def find_runs(paths: list[str]) -> tuple[list[RunDirectory], Path | None]:
    """The runs named by ``paths`` (run dirs, or sweep dirs holding run dirs) and, for a single
    sweep dir, that dir (run names are shown relative to it)."""
    from gptexp.sweep import runs_in

    runs: list[RunDirectory] = []
    base = None
    for path in paths:
        candidate = RunDirectory(path)
        if not candidate.path.is_dir():
            raise RunError(f"{path}: no such directory")
        if candidate.is_run() or candidate.config_yaml.is_file():
            runs.append(candidate)
            continue
        inside = runs_in(candidate.path)
        if not inside:
            raise RunError(
                f"{path}: neither a run directory (run.json) nor a sweep directory holding runs"
            )
        runs.extend(inside)
        base = candidate.path if len(paths) == 1 else None
    return runs, base


def _matches(row: dict[str, Any], run: RunDirectory, condition: str) -> bool:
    key, sep, wanted = condition.partition("=")
    if not sep:
        raise RunError(f"--filter {condition!r}: expected KEY=VALUE, e.g. status=finished")
    # A column, else any config key (e.g. training.warmup_steps).
    actual = row[key] if key in row else flatten(run.read_status().get("config") or {}).get(key)
    if actual is None:
        return False
    try:
        return math.isclose(float(actual), float(wanted))
    except (TypeError, ValueError):
        return str(actual) == wanted


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """By ``key`` ascending (``-key``: descending); runs without a value go last."""
    descending = key.startswith("-")
    key = key.lstrip("-")
    if rows and all(key not in row for row in rows):
        raise RunError(f"--sort {key!r}: not a column; columns: {', '.join(table_columns(rows))}")

    present = [row for row in rows if row.get(key) is not None]
    missing = [row for row in rows if row.get(key) is None]
    return sorted(present, key=lambda row: _sort_value(row[key]), reverse=descending) + missing


def _sort_value(value: Any) -> tuple[int, float, str]:
    """Numbers by value (also ones given as text, like "3e-4"), then text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


# ----------------------------------------------------------------------------- the plot


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training and validation loss against step, every run in one colour, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = differing_override_keys(rows)
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for index, row in enumerate(rows):
        records = read_metrics(Path(row["run_dir"]) / "metrics.jsonl")
        label = " ".join(f"{key}={row.get(key)}" for key in labels) or row["run"]
        if row["status"] != "finished":
            label += f" ({row['status']})"
        color = colors(index % colors.N)
        for ax, metric, style in (
            (train_ax, "train/loss", {"linewidth": 1.2, "alpha": 0.85}),
            (val_ax, "val/loss", {"linewidth": 1.8, "marker": "o", "markersize": 3}),
        ):
            points = [(r["step"], r[metric]) for r in records if _is_number(r.get(metric))]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, color=color, label=label, **style)
    for ax, name in ((train_ax, "training loss"), (val_ax, "validation loss")):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    train_ax.set_ylabel("cross-entropy (nats/token)")
    handles, names = val_ax.get_legend_handles_labels()
    if not handles:
        handles, names = train_ax.get_legend_handles_labels()
    val_ax.legend(handles, names, fontsize=8, frameon=False, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gptexp.compare",
        description="Compare runs: a table of overrides, sizes, steps, losses and speed.",
    )
    parser.add_argument("paths", nargs="+", help="a sweep directory, or run directories")
    parser.add_argument(
        "--sort",
        metavar="KEY",
        help="column to sort by, e.g. final_val_loss; --sort=-KEY sorts descending",
    )
    parser.add_argument(
        "--filter",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="keep runs where KEY (a column or any config key) equals VALUE; repeatable",
    )
    parser.add_argument("--csv", metavar="PATH", type=Path, help="also write the table as CSV")
    parser.add_argument("--markdown", metavar="PATH", type=Path, help="also write it as Markdown")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        nargs="?",
        type=Path,
        const=True,
        help="draw the loss curves into a PNG (default: <sweep dir>/losses.png or ./losses.png)",
    )
    return parser.parse_args(argv)


def compare(argv: list[str]) -> str:
    """Build the table (and the files asked for); returns the text table."""
    args = parse_args(argv)
    runs, base = find_runs(args.paths)
    rows = run_rows(runs, base)
    kept = [
        row
        for row, run in zip(rows, runs, strict=True)
        if all(_matches(row, run, condition) for condition in args.filter)
    ]
    if args.sort:
        kept = sort_rows(kept, args.sort)
    columns = table_columns(kept)
    if args.csv:
        write_csv(kept, columns, args.csv)
    if args.markdown:
        args.markdown.write_text(markdown_table(kept, columns), encoding="utf-8")
    if args.plot:
        path = args.plot if isinstance(args.plot, Path) else (base or Path.cwd()) / "losses.png"
        plot_losses(kept, path, title=base.name if base else "gptexp runs")
        print(f"plot: {path}", file=sys.stderr)
    if not kept:
        return "no runs match"
    return text_table(kept, columns)


def main() -> None:
    try:
        print(compare(sys.argv[1:]))
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
