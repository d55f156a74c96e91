"""Seed groups: ``compare ... group=KEY`` puts together the runs that differ only in their seed
(and the grouped keys), and says whether a difference stands out from the seed noise.

Owns the grouping rule (which runs may share a group, and the refusal naming a key that
is not grouped), the statistics of a group (mean, sample standard deviation, the half-width
of the 95% interval by Student's t, Welch's two-sided t-test against the best group; by
scipy.stats), the group table and the band plot (mean curve, shaded 95% band). Reads rows
made by gptexp.observe.runtable; no torch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptexp.core.errors import ConfigError
from gptexp.observe.figures import finish_loss_panels, loss_panels, save_with_legend_below
from gptexp.observe.metrics import STEP, TRAIN_LOSS, VAL_LOSS, is_number
from gptexp.observe.runtable import DEFAULT_CHOICE, distinguishing_keys

SEED_KEY = "training.seed"  # the key that may differ inside a group without being named
P_VS_BEST = "p_vs_best"
N = "n"


def higher_is_better(metric: str) -> bool:
    """Losses (and every other metric) are best when lowest; speeds (``throughput/...``)
    when highest."""
    return metric.startswith("throughput/")


def summary_columns(metric: str) -> list[str]:
    """The statistics' column names, as csv= and markdown= write them."""
    return [N, f"{metric}_mean", f"{metric}_std", f"{metric}_ci95", P_VS_BEST]


def _scipy_stats():
    """scipy.stats (the ``compare`` extra), or a user error that says how to install it."""
    try:
        from scipy import stats
    except ImportError:
        raise ConfigError(
            "group=: the statistics need scipy, which is not installed; install it with "
            "pip install 'gptexp[compare]' (make install does)"
        ) from None
    return stats


def mean_and_ci95(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean, sample standard deviation (n-1) and the half-width of the 95% confidence
    interval of the mean (Student's t, n-1 degrees of freedom); the last two are None for
    a single value."""
    stats = _scipy_stats()
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None, None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances); None where either sample
    has fewer than two values, or both have no spread (the test is undefined)."""
    stats = _scipy_stats()
    if len(a) < 2 or len(b) < 2 or (len(set(a)) == 1 and len(set(b)) == 1):
        return None
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


@dataclass
class SeedGroup:
    """The runs that share the grouped keys' values, and their statistics of one metric."""

    key_values: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # the metric of the runs that have it
    mean: float | None = None
    std: float | None = None
    ci95: float | None = None
    p_vs_best: float | None = None
    best: bool = False

    @property
    def name(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.key_values.items())

    def significant(self, alpha: float) -> bool | None:
        """Whether the difference from the best group is significant (None: untested)."""
        return None if self.p_vs_best is None else self.p_vs_best < alpha


def group_keys(options: list[str]) -> list[str]:
    """``group=a,b`` and ``group=a group=b`` alike."""
    keys = [key.strip() for option in options for key in option.split(",") if key.strip()]
    return list(dict.fromkeys(keys))


def check_alpha(alpha: float) -> None:
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha={alpha}: must be in (0, 1], e.g. alpha=0.01")


def check_groupable(rows: list[dict[str, Any]], keys: list[str], metric: str) -> None:
    """Refuse what cannot be grouped: a group key no run set, a metric that is not a column,
    runs that differ in a key that is neither grouped nor the seed."""
    changed = {key for row in rows for key in row["settings"]}
    apart = distinguishing_keys(rows)
    for key in keys:
        if key not in changed:
            raise ConfigError(
                f"group={key}: no run here set it; keys that set these runs apart: "
                f"{', '.join(apart) or '(none)'}"
            )
    if rows and all(metric not in row for row in rows):
        columns = sorted({c for row in rows for c, v in row.items() if is_number(v)})
        raise ConfigError(f"metric={metric}: not a column; numeric columns: {', '.join(columns)}")
    ungrouped = [key for key in apart if key not in keys and key != SEED_KEY]
    if ungrouped:
        raise ConfigError(
            f"the runs also differ in {', '.join(ungrouped)}, which is not grouped: add it "
            f"(group={','.join([*keys, *ungrouped])}) or keep one value "
            f"(filter={ungrouped[0]}=VALUE)"
        )


def seed_groups(rows: list[dict[str, Any]], keys: list[str], metric: str) -> list[SeedGroup]:
    """The runs grouped by their values of ``keys``, each group's statistics of ``metric``,
    best mean first; ``p_vs_best`` against that best group."""
    check_groupable(rows, keys, metric)
    groups: dict[tuple[str, ...], SeedGroup] = {}
    for row in rows:
        values = {key: str(row.get(key, DEFAULT_CHOICE)) for key in keys}
        group = groups.setdefault(tuple(values.values()), SeedGroup(values))
        group.rows.append(row)
        if is_number(row.get(metric)):
            group.values.append(float(row[metric]))
    for group in groups.values():
        if group.values:
            group.mean, group.std, group.ci95 = mean_and_ci95(group.values)
    sign = -1.0 if higher_is_better(metric) else 1.0
    ranked = sorted(
        groups.values(),
        key=lambda g: (g.mean is None, sign * g.mean if g.mean is not None else 0.0),
    )
    if ranked and ranked[0].mean is not None:
        best = ranked[0]
        best.best = True
        for group in ranked[1:]:
            group.p_vs_best = welch_p(group.values, best.values)
    return ranked


# ----------------------------------------------------------------------------- tables


def raw_table(
    groups: list[SeedGroup], keys: list[str], metric: str
) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the CSV: the values as numbers (empty where undefined), and the
    group's runs."""
    header = [*keys, *summary_columns(metric), "runs"]
    rows = [
        [
            *g.key_values.values(),
            len(g.values),
            g.mean,
            g.std,
            g.ci95,
            g.p_vs_best,
            " ".join(row["run"] for row in g.rows),
        ]
        for g in groups
    ]
    return header, rows


def markdown_cells(
    groups: list[SeedGroup], keys: list[str], metric: str
) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the Markdown table: the issue's column names, numbers in full."""
    header = [*keys, *summary_columns(metric)]
    rows = [
        [*g.key_values.values(), str(len(g.values))]
        + ["" if v is None else f"{v:.6g}" for v in (g.mean, g.std, g.ci95, g.p_vs_best)]
        for g in groups
    ]
    return header, rows


def text_cells(
    groups: list[SeedGroup], keys: list[str], metric: str, alpha: float
) -> tuple[list[str], list[list[str]]]:
    """The terminal's table: ``mean ± ci95``, and ``p_vs_best`` marked where the group is not
    significantly different from the best (``n.s.``) or could not be tested (``-``)."""
    header = [*keys, N, f"{metric} (mean ± ci95)", "std", P_VS_BEST]
    rows = []
    for g in groups:
        if g.mean is None:
            estimate = "-"
        else:
            estimate = _number(g.mean) + ("" if g.ci95 is None else f" ± {_number(g.ci95)}")
        if g.best:
            versus = "best"
        elif g.p_vs_best is None:
            versus = "-"
        else:
            versus = f"{g.p_vs_best:.2g}" + ("" if g.significant(alpha) else "  n.s.")
        std = "-" if g.std is None else _number(g.std)
        rows.append([*g.key_values.values(), str(len(g.values)), estimate, std, versus])
    return header, rows


def _number(value: float) -> str:
    """Losses to 4 decimals; large figures (tokens/s) as whole numbers."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def legend_lines(groups: list[SeedGroup], metric: str, alpha: float) -> list[str]:
    """What the marks mean, and the runs left out of the statistics."""
    lines = [
        "ci95: half-width of the 95% interval of the mean (Student's t, n-1 dof)",
        f"p_vs_best: Welch's t-test against the best group; n.s.: not significant at "
        f"alpha={alpha:g}",
    ]
    rows = [row for g in groups for row in g.rows]
    missing = [row["run"] for row in rows if not is_number(row.get(metric))]
    if missing:
        lines.append(f"left out (no {metric}): {', '.join(missing)}")
    unfinished = [
        f"{row['run']} ({row['status']})"
        for row in rows
        if row["status"] != "finished" and is_number(row.get(metric))
    ]
    if unfinished:
        # A crashed or diverged run's last value is not its final one: say it is counted.
        lines.append(
            f"counted though not finished: {', '.join(unfinished)} "
            "(filter=status=finished leaves them out)"
        )
    return lines


# ----------------------------------------------------------------------------- the plot


def band(curves: list[dict[int, float]]) -> list[tuple[int, float, float]]:
    """(step, mean, ci95 half-width) at each step that at least one curve has; the band is 0
    where only one run has the step (nothing to estimate it from)."""
    steps = sorted({step for curve in curves for step in curve})
    points = []
    for step in steps:
        values = [curve[step] for curve in curves if step in curve]
        mean, _, ci95 = mean_and_ci95(values)
        points.append((step, mean, ci95 or 0.0))
    return points


def plot_bands(
    groups: list[SeedGroup],
    path: Path,
    title: str,
    records_of: Callable[[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    """Training and validation loss against step: each group's mean curve with its shaded
    95% band (Student's t over the group's runs at each step), one colour per group.
    ``records_of(row)``: the metric records of a run to draw."""
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, train_ax, val_ax, colors = loss_panels(len(groups))
    for index, group in enumerate(groups):
        color = colors(index % colors.N)
        runs = [records_of(row) for row in group.rows]
        label = f"{group.name} (n={len(runs)})"
        for ax, metric, marker in ((train_ax, TRAIN_LOSS, None), (val_ax, VAL_LOSS, "o")):
            curves = [{r[STEP]: r[metric] for r in rs if is_number(r.get(metric))} for rs in runs]
            points = band([curve for curve in curves if curve])
            if not points:
                continue
            steps, means, halves = zip(*points, strict=True)
            low = [m - h for m, h in zip(means, halves, strict=True)]
            high = [m + h for m, h in zip(means, halves, strict=True)]
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
            ax.plot(
                steps, means, color=color, label=label, linewidth=1.6, marker=marker, markersize=3
            )
    note = ": mean of the seeds, shaded 95% interval"
    handles, names = finish_loss_panels(fig, train_ax, val_ax, title, note)
    # Each entry shows the line over its band, as the axes draw them.
    handles = [
        (
            Patch(color=line.get_color(), alpha=0.2, linewidth=0),
            Line2D([], [], color=line.get_color()),
        )
        for line in handles
    ]
    save_with_legend_below(
        fig, handles, names, path, fontsize=9, handler_map={tuple: HandlerTuple(ndivide=1)}
    )
