"""The loss-versus-budget frontier of cooldown forks (no torch).

A cooldown fork (``python -m gptexp.fork ... cooldown=D``, gptexp.run.forking) decays its
parent's learning rate to ``min_lr`` over D updates from a checkpoint; the final validation
loss of each is what a run planned for that budget would reach. This module finds the cooldown
forks among some runs, groups them by parent and gives, per fork, the budget (its last step and
tokens), its final ``val/loss`` and the parent's own ``val/loss`` at the same step where the
parent evaluated there (the run that never cooled down); ``python -m gptexp.compare --frontier``
prints the table and draws the figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptexp.core.errors import RunError
from gptexp.observe.figures import one_panel, save_with_legend_below
from gptexp.observe.lineage import fork_cooldown, fork_parent
from gptexp.observe.metrics import INHERITED, STEP, TOKENS, VAL_LOSS, is_number, read_metrics
from gptexp.observe.rundir import RunDirectory
from gptexp.observe.runtable import display_name, readable_status

COLUMNS = (
    "parent",
    "from_step",
    "cooldown",
    "step",
    "tokens",
    "val/loss",
    "parent_val/loss",
    "run",
)


@dataclass
class Point:
    """One cooldown fork's end point."""

    run: RunDirectory
    from_step: int  # the checkpoint it was forked from
    cooldown: int
    step: int | None  # its last recorded step (from_step + cooldown once finished)
    tokens: int | None
    val_loss: float | None  # its last val/loss (at ``step``)
    parent_val_loss: float | None  # the parent's val/loss at ``step``, where it evaluated there


def last_value(records: list[dict[str, Any]], key: str) -> tuple[int, Any] | None:
    """(step, value) of the last record with a number for ``key``."""
    found = [(r[STEP], r[key]) for r in records if is_number(r.get(key))]
    return found[-1] if found else None


def end_point(run: RunDirectory, from_step: int, cooldown: int, parent_records) -> Point:
    """The fork's end: its last val/loss (its own records, not the ones it inherited)."""
    own = [r for r in read_metrics(run.metrics) if not r.get(INHERITED)]
    val = last_value(own, VAL_LOSS)
    step = val[0] if val else None
    tokens = next((r[TOKENS] for r in own if r[STEP] == step and is_number(r.get(TOKENS))), None)
    at_step = [
        r[VAL_LOSS] for r in parent_records if r[STEP] == step and is_number(r.get(VAL_LOSS))
    ]
    return Point(
        run=run,
        from_step=from_step,
        cooldown=cooldown,
        step=step,
        tokens=tokens,
        val_loss=val[1] if val else None,
        parent_val_loss=at_step[-1] if at_step else None,
    )


def frontiers(runs: list[RunDirectory]) -> dict[Path, list[Point]]:
    """The cooldown forks among ``runs``, by parent (its path), by budget."""
    forks: dict[Path, list[tuple[RunDirectory, int, int]]] = {}
    for run in runs:
        status = readable_status(run)
        parent, cooldown = fork_parent(status), fork_cooldown(status)
        if parent is None or cooldown is None:
            continue
        path = Path(parent["run"])
        path = RunDirectory(path if path.is_absolute() else run.path / path).path
        forks.setdefault(path, []).append((run, parent["step"], cooldown))
    if not forks:
        raise RunError(
            "no cooldown forks among these runs; make some with python -m gptexp.fork -m "
            "run=<run> ckpt=<step>,<step> cooldown=<updates>, then name their directories"
        )
    result = {}
    for parent_path, members in forks.items():
        parent_records = read_metrics(RunDirectory(parent_path).metrics)
        points = [end_point(run, step, cooldown, parent_records) for run, step, cooldown in members]
        result[parent_path] = sorted(points, key=lambda p: (p.from_step + p.cooldown, p.cooldown))
    return result


def table_cells(found: dict[Path, list[Point]], base: Path | None) -> list[list[str]]:
    def number(value: Any, form: str) -> str:
        return format(value, form) if value is not None else "-"

    return [
        [
            display_name(parent, base),
            str(p.from_step),
            str(p.cooldown),
            number(p.step, "d"),
            number(p.tokens, ","),
            number(p.val_loss, ".4f"),
            number(p.parent_val_loss, ".4f"),
            display_name(p.run.path, base),
        ]
        for parent, points in found.items()
        for p in points
    ]


def raw_rows(found: dict[Path, list[Point]]) -> list[list[Any]]:
    """The table as the CSV holds it: numbers as recorded (not rounded, no thousands
    separators), an empty cell where there is none, the parent and the run as full paths."""
    return [
        [
            str(parent),
            p.from_step,
            p.cooldown,
            p.step,
            p.tokens,
            p.val_loss,
            p.parent_val_loss,
            str(p.run.path),
        ]
        for parent, points in found.items()
        for p in points
    ]


def parent_curve(parent: Path) -> list[tuple[int, float]]:
    """(tokens, val/loss) of the parent's evaluations (step 0 at 0 tokens)."""
    points = []
    for record in read_metrics(RunDirectory(parent).metrics):
        tokens = 0 if record[STEP] == 0 else record.get(TOKENS)
        if is_number(record.get(VAL_LOSS)) and is_number(tokens):
            points.append((tokens, record[VAL_LOSS]))
    return points


def plot_frontier(found: dict[Path, list[Point]], path: Path, base: Path | None) -> None:
    """Validation loss against tokens: each parent's curve (thin) and its cooldown forks' end
    points (markers, joined), one colour per parent."""
    fig, ax, colors = one_panel(len(found))
    for index, (parent, points) in enumerate(found.items()):
        color = colors(index % colors.N)
        name = display_name(parent, base)
        curve = parent_curve(parent)
        if curve:
            ax.plot(*zip(*curve, strict=True), color=color, alpha=0.5, linewidth=1.2, label=name)
        ends = [(p.tokens, p.val_loss) for p in points if p.tokens is not None and p.val_loss]
        if ends:
            ax.plot(
                *zip(*ends, strict=True),
                color=color,
                marker="o",
                linestyle="--",
                label=f"{name}: cooldown end points",
            )
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss against budget: cooldown forks")
    handles, names = ax.get_legend_handles_labels()
    save_with_legend_below(fig, handles, names, path, fontsize=9)
