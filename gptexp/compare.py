"""``python -m gptexp.compare <sweep dir | run dirs...> [key=value ...]``: runs side by side,
and their curves.

Reads only the run directories (run.json, metrics.jsonl, the launch's overrides), so it works
on runs that are still training, were interrupted, crashed or failed, and says which is which.
No torch is imported::

    python -m gptexp.compare outputs/sweeps/2026-11-28_12-30-00 sort=final/val_loss --plot
    python -m gptexp.compare outputs/runs/a outputs/runs/b filter=status=finished csv=t.csv
    python -m gptexp.compare --tree outputs/     # the family tree of the runs and their forks
    python -m gptexp.compare outputs/sweeps/2026-11-28_12-30-00 group=training.lr  # seeds pooled
    python -m gptexp.compare --frontier outputs/ --plot  # cooldown forks: loss against budget
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptexp.core.cli import parse_options, run_command
from gptexp.core.errors import ConfigError, RunError
from gptexp.core.fsio import atomic_write_text
from gptexp.observe import frontier, seedgroups
from gptexp.observe.figures import finish_loss_panels, loss_panels, save_with_legend_below
from gptexp.observe.metrics import (
    FINAL_VAL_LOSS,
    INHERITED,
    STEP,
    TRAIN_LOSS,
    VAL_LOSS,
    is_number,
    read_metrics,
)
from gptexp.observe.rundir import RunDirectory, find_runs
from gptexp.observe.runtable import (
    DAMAGED,
    cells,
    distinguishing_keys,
    family_tree,
    labels,
    run_rows,
    runs_below,
    table_columns,
)
from gptexp.observe.tables import csv_table, markdown_table, text_table

USAGE = (
    "usage: python -m gptexp.compare <sweep dir | run dirs...> [sort=[-]KEY] "
    "[filter=KEY=VALUE ...] [group=KEY[,KEY...] [metric=COLUMN] [alpha=0.05]] [csv=PATH] "
    "[markdown=PATH] [plot=PATH | --plot] [--tree | --frontier]"
)


@dataclass
class CompareOptions:
    paths: list[str] = field(default_factory=list)
    sort: str | None = field(
        default=None, metadata={"help": "column to sort by; -KEY sorts descending"}
    )
    filter: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE (a column or any config key); repeatable"},
    )
    csv: str | None = field(default=None, metadata={"help": "also write the table as CSV"})
    markdown: str | None = field(default=None, metadata={"help": "also write it as Markdown"})
    plot: str | None = field(
        default=None,
        metadata={"help": "loss curves into a PNG; --plot: <sweep dir or runs' parent>/losses.png"},
    )
    tree: bool = field(
        default=False,
        metadata={"help": "print the family tree (runs and their forks) of every run below"},
    )
    frontier: bool = field(
        default=False,
        metadata={
            "help": "the cooldown forks at or below the paths: final val/loss per budget "
            "(plot: against tokens, with their parent's curve)"
        },
    )
    group: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY[,KEY...]: one row per group of seeds (gptexp.observe.seedgroups)"},
    )
    metric: str = field(
        default=FINAL_VAL_LOSS, metadata={"help": "with group=: the column to summarise"}
    )
    alpha: float = field(
        default=0.05, metadata={"help": "with group=: significance level of p_vs_best"}
    )

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError(f"name at least one run or sweep directory\n{USAGE}")


def collect_runs(paths: list[str]) -> tuple[list[RunDirectory], Path | None]:
    """The runs named by ``paths`` and, for a single sweep dir, that dir (run names are shown
    relative to it)."""
    runs: list[RunDirectory] = []
    for path in paths:
        runs += find_runs(path)
    single_sweep = len(paths) == 1 and not RunDirectory(paths[0]).is_run()
    return runs, RunDirectory(paths[0]).path if single_sweep else None


def filter_value(row: dict[str, Any], condition: str) -> tuple[str, Any, str]:
    """(key, the row's value of it, the wanted value) of a ``KEY=VALUE`` filter."""
    key, sep, wanted = condition.partition("=")
    if not sep:
        raise ConfigError(f"filter={condition!r}: expected KEY=VALUE, e.g. status=finished")
    # A column, else any config key (e.g. training.warmup_steps).
    return key, row[key] if key in row else row["config"].get(key), wanted


def check_filter(rows: list[dict[str, Any]], condition: str) -> None:
    """A filter that no run matches on its own is a mistyped value (``status=finishd``), not
    an empty answer: a ConfigError listing the values the runs have."""
    if not rows or any(matches(row, condition) for row in rows):
        return
    key, _, wanted = filter_value(rows[0], condition)
    present = sorted(
        {str(value) for row in rows if (value := filter_value(row, condition)[1]) is not None}
    )
    if not present:
        raise ConfigError(f"filter={condition}: no run has a value of {key!r}")
    raise ConfigError(
        f"filter={condition}: no run has {key}={wanted}; the runs have {key}="
        + ", ".join(present[:20])
        + (f" (+{len(present) - 20} more)" if len(present) > 20 else "")
    )


def matches(row: dict[str, Any], condition: str) -> bool:
    key, actual, wanted = filter_value(row, condition)
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
        raise ConfigError(f"sort={key!r}: not a column; columns: {', '.join(table_columns(rows))}")
    present = [row for row in rows if row.get(key) is not None]
    missing = [row for row in rows if row.get(key) is None]
    return sorted(present, key=lambda row: _sort_value(row[key]), reverse=descending) + missing


def _sort_value(value: Any) -> tuple[int, float, str]:
    """Numbers by value (also ones given as text, like "3e-4"), then text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def default_plot_path(runs: list[RunDirectory], base: Path | None) -> Path:
    """Next to the runs: the sweep directory, else the runs' common parent."""
    if base is not None:
        return base / "losses.png"
    return Path(os.path.commonpath([str(run.path.parent) for run in runs])) / "losses.png"


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training and validation loss against step, one colour per run, the legend below the
    axes (labels: what sets the runs apart)."""
    names = labels(rows, distinguishing_keys(rows))
    fig, train_ax, val_ax, colors = loss_panels(len(rows))
    for index, row in enumerate(rows):
        records = own_curve(row, read_metrics(Path(row["run_dir"]) / "metrics.jsonl"))
        color = colors(index % colors.N)
        for ax, metric, style in (
            (train_ax, TRAIN_LOSS, {"linewidth": 1.2, "alpha": 0.85}),
            (val_ax, VAL_LOSS, {"linewidth": 1.8, "marker": "o", "markersize": 3}),
        ):
            points = [(r[STEP], r[metric]) for r in records if is_number(r.get(metric))]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, color=color, label=names[index], **style)
    handles, names = finish_loss_panels(fig, train_ax, val_ax, title)
    save_with_legend_below(fig, handles, names, path, fontsize=8)


def own_curve(row: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's records to plot: a fork's from its fork step on (the records it inherited
    before that are its parent's curve, drawn with the parent)."""
    if "fork_step" not in row:
        return records
    return [r for r in records if not r.get(INHERITED) or r[STEP] == row["fork_step"]]


def run_curve(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a run to draw (a fork's own, see own_curve)."""
    return own_curve(row, read_metrics(Path(row["run_dir"]) / "metrics.jsonl"))


def family(paths: list[str]) -> str:
    """The family tree of every run at or below ``paths``."""
    runs = []
    for path in paths:
        if not Path(path).is_dir():
            raise RunError(f"{path}: no such directory")
        runs += [run for run in runs_below(Path(path)) if run.path not in {r.path for r in runs}]
    if not runs:
        raise RunError(f"{', '.join(paths)}: no gptexp run directories below")
    base = Path(paths[0]).resolve() if len(paths) == 1 else None
    return family_tree(runs, base)


def compare(options: CompareOptions) -> str:
    """Build the table (and the files asked for); returns the text table."""
    if options.tree:
        return family(options.paths)
    if options.frontier:
        return compare_frontier(options)
    runs, base = collect_runs(options.paths)
    rows = run_rows(runs, base)
    for condition in options.filter:
        check_filter(rows, condition)
    kept = [row for row in rows if all(matches(row, condition) for condition in options.filter)]
    if options.group:
        return compare_groups(options, kept, runs, base)
    if options.sort:
        kept = sort_rows(kept, options.sort)
    columns = table_columns(kept)
    if options.csv:
        raw = [[row.get(c) for c in columns] + [row["run_dir"]] for row in kept]
        atomic_write_text(Path(options.csv), csv_table([*columns, "run_dir"], raw))
    if options.markdown:
        atomic_write_text(Path(options.markdown), markdown_table(columns, cells(kept, columns)))
    if options.plot is not None:
        as_flag = options.plot.lower() in ("true", "")
        path = default_plot_path(runs, base) if as_flag else Path(options.plot)
        plot_losses(kept, path, title=base.name if base else "gptexp runs")
        print(f"plot: {path.resolve()}", file=sys.stderr)
    if not kept:
        return "no runs match"
    return text_table(columns, cells(kept, columns))


def compare_frontier(options: CompareOptions) -> str:
    """The end points of the cooldown forks at or below ``paths`` (gptexp.observe.frontier):
    the table, and the files asked for."""
    for name in ("sort", "group", "filter"):
        if getattr(options, name):
            raise ConfigError(f"{name}= does not apply with --frontier (one row per cooldown fork)")
    runs: dict[Path, RunDirectory] = {}
    for path in options.paths:
        if not Path(path).is_dir():
            raise RunError(f"{path}: no such directory")
        runs |= {run.path: run for run in runs_below(Path(path))}
    base = Path(options.paths[0]).resolve() if len(options.paths) == 1 else None
    found = frontier.frontiers(list(runs.values()))
    rows = frontier.table_cells(found, base)
    if options.csv:
        atomic_write_text(Path(options.csv), csv_table(frontier.COLUMNS, frontier.raw_rows(found)))
    if options.markdown:
        atomic_write_text(Path(options.markdown), markdown_table(frontier.COLUMNS, rows))
    if options.plot is not None:
        as_flag = options.plot.lower() in ("true", "")
        default = default_plot_path(list(runs.values()), base).with_name("frontier.png")
        path = default if as_flag else Path(options.plot)
        frontier.plot_frontier(found, path, base)
        print(f"plot: {path.resolve()}", file=sys.stderr)
    return text_table(frontier.COLUMNS, rows)


def compare_groups(
    options: CompareOptions, rows: list[dict[str, Any]], runs: list[RunDirectory], base
) -> str:
    """One row per seed group (gptexp.observe.seedgroups), best mean first; the files asked for."""
    seedgroups.check_alpha(options.alpha)
    if options.sort:
        raise ConfigError("sort= does not apply with group=: groups are listed best mean first")
    keys = seedgroups.group_keys(options.group)
    damaged = [row for row in rows if row["status"] == DAMAGED]  # no config to group by
    rows = [row for row in rows if row["status"] != DAMAGED]
    groups = seedgroups.seed_groups(rows, keys, options.metric)
    if options.csv:
        header, raw = seedgroups.raw_table(groups, keys, options.metric)
        atomic_write_text(Path(options.csv), csv_table(header, raw))
    if options.markdown:
        header, text = seedgroups.markdown_cells(groups, keys, options.metric)
        atomic_write_text(Path(options.markdown), markdown_table(header, text))
    if options.plot is not None:
        as_flag = options.plot.lower() in ("true", "")
        path = default_plot_path(runs, base) if as_flag else Path(options.plot)
        seedgroups.plot_bands(groups, path, base.name if base else "gptexp runs", run_curve)
        print(f"plot: {path.resolve()}", file=sys.stderr)
    if not groups:
        return "no runs match"
    header, cells_ = seedgroups.text_cells(groups, keys, options.metric, options.alpha)
    legend = seedgroups.legend_lines(groups, options.metric, options.alpha)
    left_out = [f"left out, damaged: {row['run']} ({row['error']})" for row in damaged]
    return "\n".join([text_table(header, cells_), *legend, *left_out])


def main() -> None:
    run_command(lambda: print(compare(parse_options(sys.argv[1:], CompareOptions, USAGE))))


if __name__ == "__main__":
    main()
