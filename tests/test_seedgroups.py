"""Seed groups (gptexp.observe.seedgroups, ``compare group=``): the statistics against values
computed here by their textbook formulas, and through compare on a real 2 lr x 3 seed sweep."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptexp.compare import CompareOptions, compare
from gptexp.core.errors import ConfigError
from gptexp.observe.seedgroups import band, mean_and_ci95, welch_p
from tests.conftest import run_module, subprocess_env, sweep

# Student's t quantiles t(0.975; dof), from the tables (to the digits scipy gives).
T975 = {1: 12.706204736174698, 2: 4.302652729911275, 4: 2.7764451051977987}


def welch_by_hand(a: list[float], b: list[float]) -> float:
    """Welch's statistic and the Welch-Satterthwaite degrees of freedom, then the two-sided
    tail of Student's t (only the distribution is scipy's)."""
    from scipy.stats import t

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    statistic = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * t.sf(abs(statistic), dof)


def test_mean_std_ci95_against_the_formulas():
    values = [2.31, 2.35, 2.29, 2.40, 2.33]
    mean, std, ci95 = mean_and_ci95(values)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert ci95 == pytest.approx(T975[4] * np.std(values, ddof=1) / math.sqrt(5), rel=1e-9)
    assert mean_and_ci95([3.0]) == (3.0, None, None)  # one seed: nothing to estimate from
    _, _, two = mean_and_ci95([1.0, 2.0])
    assert two == pytest.approx(T975[1] * math.sqrt(0.5) / math.sqrt(2), rel=1e-9)


def test_welch_against_the_formula_and_a_known_value():
    a, b = [3.41, 3.32, 3.38], [3.25, 3.11, 3.24, 3.20]
    assert welch_p(a, b) == pytest.approx(welch_by_hand(a, b), rel=1e-9)
    # A worked example: means 2 and 5, variances 1 and 1, so t = -3/sqrt(2/3) = -3.674 with
    # Welch's dof = 4; the two-sided tail of t(4) beyond 3.674 is 0.02131 (tables).
    assert welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.021312, abs=1e-6)
    assert welch_p([1.0], [2.0, 3.0]) is None  # n < 2: untested
    assert welch_p([1.0, 1.0], [2.0, 2.0]) is None  # no spread: undefined


def test_band_is_mean_and_t_interval_per_step():
    curves = [{0: 4.0, 10: 3.0}, {0: 4.2, 10: 3.4}, {0: 4.1}]
    points = band(curves)
    assert [p[0] for p in points] == [0, 10]
    step0 = [4.0, 4.2, 4.1]
    assert points[0][1] == pytest.approx(np.mean(step0))
    assert points[0][2] == pytest.approx(T975[2] * np.std(step0, ddof=1) / math.sqrt(3))
    assert points[1][1] == pytest.approx(3.2)  # two runs reached step 10
    assert points[1][2] == pytest.approx(T975[1] * np.std([3.0, 3.4], ddof=1) / math.sqrt(2))


# ----------------------------------------------------------------------------- through compare


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory) -> Path:
    """2 learning rates x 3 seeds, 10 steps each (one process, a few seconds)."""
    base = tmp_path_factory.mktemp("seeds")
    path = base / "sweep"
    result = sweep(
        path, "training.lr=1e-3,3e-3", "training.seed=1,2,3", "training.max_steps=10", cwd=base
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def final_val_losses(sweep_dir: Path) -> dict[float, list[float]]:
    """Each run's last val/loss read straight from its metrics.jsonl, by learning rate."""
    by_lr: dict[float, list[float]] = {}
    for run in sorted(p for p in sweep_dir.iterdir() if (p / "run.json").is_file()):
        lr = json.loads((run / "run.json").read_text())["config"]["training"]["lr"]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        by_lr.setdefault(lr, []).append([r["val/loss"] for r in records if "val/loss" in r][-1])
    return by_lr


def test_groups_equal_an_independent_computation(seed_sweep, tmp_path):
    table = compare(
        CompareOptions(
            paths=[str(seed_sweep)],
            group=["training.lr"],
            csv=str(tmp_path / "g.csv"),
            markdown=str(tmp_path / "g.md"),
            plot=str(tmp_path / "bands.png"),
        )
    )
    with open(tmp_path / "g.csv") as f:
        rows = list(csv.DictReader(f))
    m = "final/val_loss"
    assert list(rows[0]) == [
        "training.lr", "n", f"{m}_mean", f"{m}_std", f"{m}_ci95", "p_vs_best", "runs",
    ]  # fmt: skip
    by_lr = final_val_losses(seed_sweep)
    assert sorted(float(r["training.lr"]) for r in rows) == sorted(by_lr)
    best = min(by_lr, key=lambda lr: np.mean(by_lr[lr]))
    assert float(rows[0]["training.lr"]) == best  # best mean first
    for row in rows:
        values = by_lr[float(row["training.lr"])]
        assert int(row["n"]) == 3
        assert float(row[f"{m}_mean"]) == pytest.approx(np.mean(values), rel=1e-12)
        assert float(row[f"{m}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        ci95 = T975[2] * np.std(values, ddof=1) / math.sqrt(3)
        assert float(row[f"{m}_ci95"]) == pytest.approx(ci95, rel=1e-9)
    assert rows[0]["p_vs_best"] == ""  # the best itself
    other = by_lr[float(rows[1]["training.lr"])]
    assert float(rows[1]["p_vs_best"]) == pytest.approx(welch_by_hand(other, by_lr[best]))
    header = (tmp_path / "g.md").read_text().splitlines()[0]
    assert header == (f"| training.lr | n | {m}_mean | {m}_std | {m}_ci95 | p_vs_best |")
    assert (tmp_path / "bands.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The terminal: mean ± ci95, the best named.
    first = table.splitlines()[2].split()
    assert first[:4] == [rows[0]["training.lr"], "3", f"{float(rows[0][f'{m}_mean']):.4f}", "±"]
    assert first[-1] == "best"


@pytest.mark.parametrize("alpha", [1e-12, 1.0])
def test_not_significant_is_marked_at_alpha(seed_sweep, alpha):
    table = compare(CompareOptions(paths=[str(seed_sweep)], group=["training.lr"], alpha=alpha))
    second = table.splitlines()[3]
    # No p is below 1e-12 (n.s.), and every p is below 1 (significant).
    assert second.endswith("n.s.") == (alpha == 1e-12), table


def test_runs_that_differ_in_an_ungrouped_key_are_refused(seed_sweep):
    with pytest.raises(ConfigError, match=r"differ in training\.lr, which is not grouped"):
        compare(CompareOptions(paths=[str(seed_sweep)], group=["training.seed"]))
    with pytest.raises(ConfigError, match="sort= does not apply with group="):
        compare(CompareOptions(paths=[str(seed_sweep)], group=["training.lr"], sort="n"))
    with pytest.raises(ConfigError, match="group=training.batch_size: no run here set it"):
        compare(CompareOptions(paths=[str(seed_sweep)], group=["training.batch_size"]))
    # Filtered to one lr, every seed is its own group: one run each, nothing to test.
    table = compare(
        CompareOptions(
            paths=[str(seed_sweep)], group=["training.seed"], filter=["training.lr=1e-3"]
        )
    )
    assert [line.split()[1] for line in table.splitlines()[2:5]] == ["1", "1", "1"]
    assert [line.split()[-1] for line in table.splitlines()[3:5]] == ["-", "-"]


def test_unfinished_runs_are_named(seed_sweep, tmp_path):
    """A run whose run.json says running but no process holds it (killed) is crashed."""
    copy = tmp_path / "sweep"
    shutil.copytree(seed_sweep, copy)
    status = json.loads((copy / "0" / "run.json").read_text())
    (copy / "0" / "run.json").write_text(json.dumps(status | {"status": "running"}))
    table = compare(CompareOptions(paths=[str(copy)], group=["training.lr"]))
    assert table.splitlines()[-1] == (
        "counted though not finished: 0 (crashed) (filter=status=finished leaves them out)"
    )
    kept = compare(
        CompareOptions(paths=[str(copy)], group=["training.lr"], filter=["status=finished"])
    )
    assert "not finished" not in kept
    assert sorted(line.split()[1] for line in kept.splitlines()[2:4]) == ["2", "3"]  # n


def test_a_damaged_run_is_left_out_of_the_groups_and_named(seed_sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(seed_sweep, copy)
    (copy / "0" / "run.json").write_text("[1, 2]")
    table = compare(CompareOptions(paths=[str(copy)], group=["training.lr"]))
    assert table.splitlines()[-1].startswith("left out, damaged: 0 (run.json: ")
    assert sorted(line.split()[1] for line in table.splitlines()[2:4]) == ["2", "3"]  # n


def test_without_scipy_group_is_a_clear_error(seed_sweep, tmp_path):
    """An environment without the extra: a ``scipy`` that cannot be imported first on the
    path (the fault is the test's)."""
    shadow = tmp_path / "shadow" / "scipy"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{env['PYTHONPATH']}"
    result = run_module(
        "gptexp.compare", str(seed_sweep), "group=training.lr", cwd=tmp_path, env=env
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: group=: the statistics need scipy")


def test_the_cli_takes_group_metric_alpha(seed_sweep, tmp_path):
    result = run_module(
        "gptexp.compare",
        str(seed_sweep),
        "group=training.lr",
        "metric=best/val_loss",
        "alpha=0.01",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "best/val_loss (mean ± ci95)" in result.stdout
    assert "alpha=0.01" in result.stdout
    bad_alpha = run_module(
        "gptexp.compare", str(seed_sweep), "group=training.lr", "alpha=5", cwd=tmp_path
    )
    assert bad_alpha.returncode == 2 and "alpha=5.0: must be in (0, 1]" in bad_alpha.stderr
    refused = run_module("gptexp.compare", str(seed_sweep), "group=training.seed", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: the runs also differ in training.lr")
