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


# ----------------------------------------------------------------------------- damaged input


def damaged_copy(sweep_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    return copy


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"[1, 2]", "a JSON list, not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
        (bytes(range(256)) * 4, "damaged ("),
    ],
    ids=["list", "deep", "bytes"],
)
def test_a_damaged_run_json_is_a_row_that_says_why(sweep_dir, tmp_path, content, reason):
    copy = damaged_copy(sweep_dir, tmp_path)
    (copy / "1" / "run.json").write_bytes(content)
    result = compare(str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert rows["0"][1] == "finished" and rows["2"][1] == "crashed"
    line = next(line for line in result.stdout.splitlines() if line.startswith("1 "))
    assert "damaged: run.json: damaged" in line and reason in line
    tree = compare("--tree", str(copy), cwd=tmp_path)
    assert tree.returncode == 0, tree.stderr
    assert "1  damaged: run.json: damaged" in tree.stdout


def test_damaged_metrics_lines_are_skipped_with_one_warning(sweep_dir, tmp_path):
    copy = damaged_copy(sweep_dir, tmp_path)
    metrics = copy / "0" / "metrics.jsonl"
    good = metrics.read_text()
    huge = '{"step": 3, "train/loss": ' + "9" * 5000 + "}\n"
    deep = '{"step": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    metrics.write_bytes(huge.encode() + deep.encode() + b"\xff\xfe{\n" + good.encode())
    result = compare(str(copy / "0"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipped 3 damaged lines") == 1, result.stderr
    assert table_rows(result.stdout)["0"][1] == "finished"


def test_garbage_overrides_or_config_yaml_is_named(sweep_dir, tmp_path):
    copy = damaged_copy(sweep_dir, tmp_path)
    status = json.loads((copy / "0" / "run.json").read_text())
    del status["overrides"]  # compare reads .hydra/overrides.yaml then
    (copy / "0" / "run.json").write_text(json.dumps(status))
    (copy / "0" / ".hydra" / "overrides.yaml").write_text("a: [1\n")
    (copy / "1" / ".hydra" / "overrides.yaml").write_bytes(b"\xff" * 10)
    (copy / "1" / "run.json").unlink()  # a pending run: its config is .hydra/config.yaml
    result = compare(str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert "damaged: .hydra/overrides.yaml: damaged" in lines["0"]
    assert "damaged: .hydra/overrides.yaml: damaged" in lines["1"]


def test_an_unknown_value_of_a_known_column_is_an_error(sweep_dir, tmp_path):
    result = compare(str(sweep_dir), "filter=status=finishd", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: filter=status=finishd: no run has status=finishd; "
        "the runs have status=crashed, failed, finished"
    ]
    # Filters that each match some run but no run together: an empty table, not an error.
    both = compare(str(sweep_dir), "filter=status=failed", "filter=training.lr=1e-3", cwd=tmp_path)
    assert both.returncode == 0 and both.stdout.strip() == "no runs match"


def fork_of(run: Path, fork: Path, step: int) -> None:
    """``fork``: a copy of ``run`` whose records up to ``step`` are marked inherited, with a
    parent link (what gptexp.fork writes), and inherited speeds 1000 times the run's own."""
    shutil.copytree(run, fork)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["step"] <= step:
            record["inherited"] = True
            if "throughput/tokens_per_s" in record:
                record["throughput/tokens_per_s"] *= 1000
    (fork / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    status = json.loads((fork / "run.json").read_text())
    status["parent"] = {"run": str(run), "step": step, "checkpoint": "x", "sha256": ""}
    (fork / "run.json").write_text(json.dumps(status))


def test_a_forks_throughput_is_its_own(sweep_dir, tmp_path):
    fork = tmp_path / "fork"
    fork_of(sweep_dir / "0", fork, 6)
    result = compare(str(sweep_dir / "0"), str(fork), "csv=t.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "t.csv") as f:
        speeds = {
            row["run"]: float(row["throughput/median_tokens_per_s"]) for row in csv.DictReader(f)
        }
    own = [
        r["throughput/tokens_per_s"]
        for r in map(json.loads, (fork / "metrics.jsonl").read_text().splitlines())
        if "throughput/tokens_per_s" in r and not r.get("inherited")
    ]
    assert own and speeds["fork"] < 10 * max(own)


def test_a_fork_that_changed_nothing_is_labelled_apart_from_its_parent(sweep_dir, tmp_path):
    from gptexp.compare import CompareOptions
    from gptexp.compare import compare as compare_runs
    from gptexp.observe.rundir import RunDirectory
    from gptexp.observe.runtable import distinguishing_keys, labels, run_rows

    fork = tmp_path / "fork"
    fork_of(sweep_dir / "0", fork, 6)
    runs = [RunDirectory(p) for p in (sweep_dir / "0", sweep_dir / "1", fork)]
    rows = run_rows(runs)
    names = labels(rows, distinguishing_keys(rows))
    assert len(set(names)) == 3, names
    assert names[2].endswith("[fork of 0@6]") and names[0] == "training.lr=0.001"
    table = compare_runs(CompareOptions(paths=[str(p.path) for p in runs]))
    assert "fork" in table


def test_a_long_value_is_shortened_in_the_table(sweep_dir, tmp_path):
    copy = damaged_copy(sweep_dir, tmp_path)
    status = json.loads((copy / "0" / "run.json").read_text())
    status["overrides"].append("data.path=/" + "x" * 400 + "/input.txt")
    status["config"]["data"]["path"] = "/" + "x" * 400 + "/input.txt"
    (copy / "0" / "run.json").write_text(json.dumps(status))
    result = compare(str(copy), "csv=t.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert max(map(len, result.stdout.splitlines())) < 250
    assert "/input.txt" in result.stdout and "…" in result.stdout
    assert "x" * 400 in (tmp_path / "t.csv").read_text()  # the CSV keeps the whole value


def test_an_unfinished_runs_step_is_where_it_would_resume(sweep_dir, tmp_path):
    from gptexp.observe.runtable import write_summary

    copy = damaged_copy(sweep_dir, tmp_path)
    # Run 2 "crashed" (run.json says running, no process holds it) after its checkpoint of
    # step 10 was lost: a resume starts again from step 0, though it logged 10 steps.
    manifest = json.loads((copy / "2" / "checkpoints" / "manifest.json").read_text())
    for entry in manifest["checkpoints"]:
        (copy / "2" / "checkpoints" / entry["file"]).unlink()
    write_summary(copy)
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in (copy / "summary.md").read_text().splitlines()
        if line.startswith("| ")
    }
    assert "| 0/10 (logged 10) |" in rows["2"]
    assert "| 10/10 |" in rows["0"]  # a finished run: its last step


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("resumes", 5, "finished"),
        ("resumes", [5, {"changes": 7}], "finished"),
        ("parameters", "many", "finished"),
        ("overrides", [1, {}], "damaged: run.json: damaged (overrides is not a list of strings)"),
        ("config", [1], "damaged: run.json: damaged (its config is not a mapping)"),
    ],
)
def test_a_run_json_field_of_another_shape_is_no_traceback(
    sweep_dir, tmp_path, field, value, shown
):
    copy = damaged_copy(sweep_dir, tmp_path)
    status = json.loads((copy / "0" / "run.json").read_text())
    (copy / "0" / "run.json").write_text(json.dumps(status | {field: value}))
    result = compare(str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("0 "))
    assert shown in line


def test_a_runs_label_is_capped_and_says_what_it_left_out():
    from gptexp.observe.runtable import LABEL_WIDTH, label

    keys = [f"training.key{i}" for i in range(12)]
    row = {"run": "0", "status": "finished", **{k: "/" + "y" * 300 for k in keys}}
    text = label(row, keys)
    assert len(text) <= LABEL_WIDTH + len(" (+12 more)")
    assert text.endswith("more)") and "…" in text
