"""python -m gptexp.compare through the real CLI, on finished, failed, crashed and live runs."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_module, sweep


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A finished run (lr 1e-3), a failed one (lr 1e4: NaN), and a copy of the finished run
    whose run.json says running although no process trains it (killed with SIGKILL)."""
    base = tmp_path_factory.mktemp("compare")
    path = base / "sweep"
    result = sweep(path, "training.lr=1e-3,1e4", "training.max_steps=10", cwd=base)
    assert result.returncode == 1, result.stderr
    shutil.copytree(path / "0", path / "2")
    status = json.loads((path / "2" / "run.json").read_text())
    (path / "2" / "run.json").write_text(json.dumps(status | {"status": "running"}))
    return path


def compare(*args: str, cwd: Path):
    return run_module("gptexp.compare", *args, cwd=cwd)


def table_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.strip().splitlines()
    return {line.split()[0]: line.split() for line in lines[2:]}


def test_table_says_which_run_is_which(sweep_dir, tmp_path):
    result = compare(str(sweep_dir), "sort=final/val_loss", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:3] == ["run", "status", "training.lr"]  # only the override that differs
    rows = table_rows(result.stdout)
    assert rows["0"][1] == "finished" and rows["1"][1] == "failed" and rows["2"][1] == "crashed"
    assert rows["0"][header.index("step")] == "10/10"
    # Ascending final val loss: the copies (equal) in job order, then the run that diverged,
    # whose last finite val loss is the one before training.
    assert list(rows) == ["0", "2", "1"]
    assert float(rows["1"][header.index("final/val_loss")]) > float(
        rows["0"][header.index("final/val_loss")]
    )


def test_a_live_run_is_running(sweep_dir, tmp_path):
    fd = os.open(sweep_dir / "2" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live trainer holds
        result = compare(str(sweep_dir / "2"), str(sweep_dir / "0"), cwd=tmp_path)
    finally:
        os.close(fd)
    assert table_rows(result.stdout)["2"][1] == "running"


def test_filter_sort_and_files(sweep_dir, tmp_path):
    result = compare(
        str(sweep_dir),
        "filter=status=finished",
        "--filter=training.lr=1e-3",
        f"csv={tmp_path / 't.csv'}",
        f"markdown={tmp_path / 't.md'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert list(table_rows(result.stdout)) == ["0"]
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == ["0"] and float(rows[0]["final/val_loss"]) > 0
    assert rows[0]["run_dir"] == str(sweep_dir / "0")
    assert (tmp_path / "t.md").read_text().startswith("| run | status |")

    descending = compare(str(sweep_dir), "sort=-training.lr", cwd=tmp_path)
    assert list(table_rows(descending.stdout))[0] == "1"


def test_plot_writes_a_png(sweep_dir, tmp_path):
    result = compare(str(sweep_dir), "--plot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png = (sweep_dir / "losses.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (sweep_dir / "losses.png").unlink()


def test_not_a_run_is_a_clear_error(tmp_path):
    result = compare(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "neither a gptexp run directory" in result.stderr
