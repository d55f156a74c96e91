"""compare's figures: the loss figure, two panels (training and validation loss against step)
that share a y axis, a colour per curve, and a legend below both panels, saved as a PNG. Its
drawings (a curve per run in compare, a band per seed group in seedgroups) fill the panels in
between. The frontier figure (gptexp.observe.frontier) is one panel with the same legend.
matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def loss_panels(curves: int) -> tuple[Any, Any, Any, Any]:
    """(figure, training axes, validation axes, colour map) for ``curves`` curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    return fig, train_ax, val_ax, plt.get_cmap("tab10" if curves <= 10 else "tab20")


def one_panel(curves: int) -> tuple[Any, Any, Any]:
    """(figure, axes, colour map) of a one-panel figure for ``curves`` curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax, plt.get_cmap("tab10" if curves <= 10 else "tab20")


def finish_loss_panels(
    fig: Any, train_ax: Any, val_ax: Any, title: str, panel_note: str = ""
) -> tuple[list, list[str]]:
    """Titles, labels and grid of both panels; the legend entries (the training panel's, or
    the validation panel's where the runs logged no training loss)."""
    for ax, name in ((train_ax, "training loss"), (val_ax, "validation loss")):
        ax.set_title(name + panel_note)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    train_ax.set_ylabel("cross-entropy (nats/token)")
    fig.suptitle(title)
    handles, names = train_ax.get_legend_handles_labels()
    if not handles:
        handles, names = val_ax.get_legend_handles_labels()
    return handles, names


def save_with_legend_below(
    fig: Any, handles: list, names: list[str], path: Path, fontsize: int, **legend: Any
) -> None:
    """The legend below both panels, so that it never squeezes them however many curves
    there are; then the PNG at ``path``, and the figure closed."""
    import matplotlib.pyplot as plt

    fig.legend(
        handles,
        names,
        loc="lower center",
        ncol=min(3, max(1, len(names))),
        fontsize=fontsize,
        frameon=False,
        **legend,
    )
    rows_of_legend = math.ceil(len(names) / 3) if names else 0
    fig.tight_layout(rect=(0, min(0.5, 0.05 * rows_of_legend + 0.03), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
