"""python -m gptexp.diff on real runs: a resumed twin, a fork with another lr, another thread
count; lineage over hand-made parent links; bad input.

The runs are trained once per module (nano, 30 steps, every step logged, checkpoints at 10, 20
and 30 kept as milestones) and only read by the tests, which check that the diff writes
nothing into them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import gptexp.diff
from gptexp.checkpoint.comparison import holds_checkpoint
from gptexp.checkpoint.format import MANIFEST
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig
from gptexp.observe.lineage import lineage
from gptexp.observe.rundir import RunDirectory
from tests.conftest import (
    FAST,
    ROOT,
    call_main,
    files_of,
    read_metrics,
    run_module,
    subprocess_env,
    wait_until,
)

pytestmark = pytest.mark.slow

RUN = [
    "model.dropout=0.1",  # the replay must keep each side's RNG stream apart
    "training.max_steps=30",
    "checkpoint.every_steps=10",
    "checkpoint.keep_every=10",  # keep 10, 20 and 30: the fork needs 20
]
FORK_STEP = 20


def manager(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(run_dir / "checkpoints", CheckpointConfig())


def keep_checkpoints(run_dir: Path, steps: set[int]) -> None:
    """Un-list and delete every checkpoint of the run but those of ``steps``."""
    entries = manager(run_dir).entries()
    kept = [asdict(e) for e in entries if e.step in steps]
    (run_dir / "checkpoints" / MANIFEST).write_text(
        json.dumps({"format_version": 1, "checkpoints": kept})
    )
    for entry in entries:
        if entry.step not in steps:
            (run_dir / "checkpoints" / entry.file).unlink()


def launch(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    """Wait (with a deadline) for a process that must succeed; its stderr."""
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """parent; twin (the same config, SIGKILLed after a checkpoint and resumed); fork (the
    parent copied at step 20 and resumed with another lr, parent link written as a fork will
    write it); threads2 (the parent's config with training.num_threads=2).

    The independent runs train at the same time, to keep the set-up short.
    """
    base = tmp_path_factory.mktemp("diff")
    parent, twin, fork, threads2 = (base / name for name in ("parent", "twin", "fork", "t2"))
    training = [
        launch("gptexp.train", *FAST, *RUN, *extra, f"hydra.run.dir={path}", cwd=base)
        for path, extra in ((parent, []), (threads2, ["training.num_threads=2"]), (twin, []))
    ]
    killed = training.pop()
    wait_until(
        lambda: (twin / "checkpoints" / MANIFEST).is_file(),
        process=killed,
        what="the twin's first checkpoint",
    )
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert max(r["step"] for r in read_metrics(twin)) < 30, "killed before the end"
    resumed = launch("gptexp.resume", f"run={twin}", cwd=ROOT)
    for proc in training:
        finish(proc)

    shutil.copytree(parent, fork)
    keep_checkpoints(fork, {10, FORK_STEP})
    records = [r | {"inherited": True} for r in read_metrics(parent) if r["step"] <= FORK_STEP]
    (fork / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    entry = manager(parent).find(FORK_STEP)
    status = json.loads((fork / "run.json").read_text())
    status |= {"status": "interrupted", "step": FORK_STEP}  # the copy stops at the fork step
    status["parent"] = {
        "run": str(parent),
        "step": FORK_STEP,
        "checkpoint": entry.file,
        "sha256": entry.sha256,
    }
    (fork / "run.json").write_text(json.dumps(status))
    forked = launch("gptexp.resume", f"run={fork}", "training.lr=3e-4", cwd=ROOT)
    real_fork = base / "real_fork"
    made = launch(
        "gptexp.fork",
        f"run={parent}",
        f"ckpt={FORK_STEP}",
        "training.lr=3e-4",
        f"out={real_fork}",
        cwd=ROOT,
    )
    assert "resuming from step_0000020.pt" in finish(forked)
    finish(made)
    finish(resumed)
    return {
        "parent": parent,
        "twin": twin,
        "fork": fork,
        "threads2": threads2,
        "real_fork": real_fork,
    }


def diff_json(capsys, *args: str) -> tuple[int, dict]:
    code, stderr = call_main(gptexp.diff.main, *map(str, args), "--json")
    out = capsys.readouterr().out
    assert out, stderr
    return code, json.loads(out)


def test_sigkilled_and_resumed_twin_is_identical(runs, capsys):
    before = files_of(runs["parent"]), files_of(runs["twin"])
    code, report = diff_json(capsys, runs["parent"], runs["twin"], "--replay")
    assert code == 0
    assert report["identical"] is True
    assert report["config"] == []
    assert report["first_metric_divergence"] is None
    assert report["metrics_identical_through"] == 30
    assert report["checkpoints"]["equal_steps"] == [10, 20, 30]
    assert report["checkpoints"]["first_different_step"] is None
    assert report["replay"]["first_different_update"] is None
    assert report["replay"]["note"].startswith("no update to replay after step 30")
    assert report["lineage"]["common_ancestor"] is None  # two roots
    assert (files_of(runs["parent"]), files_of(runs["twin"])) == before, "diff wrote nothing"

    code, stderr = call_main(gptexp.diff.main, str(runs["parent"]), str(runs["twin"]))
    text = capsys.readouterr().out
    assert code == 0, stderr
    assert "identical through step 30" in text
    assert "bit-identical through step 30" in text
    assert text.rstrip().endswith("identical over the common steps")


def test_replaying_identical_runs_finds_no_difference(runs, tmp_path, capsys):
    # The twin without its checkpoints 20 and 30: 20 updates are replayed from step 10.
    twin = tmp_path / "twin"
    shutil.copytree(runs["twin"], twin)
    keep_checkpoints(twin, {10})
    code, report = diff_json(capsys, runs["parent"], twin, "--replay")
    assert code == 0 and report["identical"] is True
    replayed = report["replay"]
    assert (replayed["from_step"], replayed["through_step"]) == (10, 30)
    assert replayed["replayed_updates"] == 20
    assert replayed["first_different_update"] is None


def test_fork_with_another_lr_parts_after_update_21(runs, capsys):
    parent, fork = runs["parent"], runs["fork"]
    before = files_of(parent), files_of(fork)
    result = run_module("gptexp.diff", str(parent), str(fork), "--replay", "--json", cwd=ROOT)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["identical"] is False
    assert report["config"] == [{"key": "training.lr", "a": 0.001, "b": 0.0003}]
    assert report["lineage"]["common_ancestor"] == str(parent)
    assert report["lineage"]["fork_step"] == FORK_STEP
    # The lr logged at step 21 is the one update 22 uses; update 21 changes the parameters,
    # so the loss logged at step 22 is the first to differ.
    assert report["first_metric_divergence"]["step"] == 21
    assert report["metric_divergence_by_key"]["lr"]["step"] == 21
    train_loss = report["metric_divergence_by_key"]["train/loss"]
    assert train_loss["step"] == 22
    logged = (
        {r["step"]: r for r in read_metrics(parent)},
        {r["step"]: r for r in read_metrics(fork)},
    )
    assert (train_loss["a"], train_loss["b"]) == (
        logged[0][22]["train/loss"],
        logged[1][22]["train/loss"],
    )
    checkpoints = report["checkpoints"]
    assert (checkpoints["last_equal_step"], checkpoints["first_different_step"]) == (20, 30)
    assert checkpoints["differing_tensors"], "the tensors that differ are named"
    assert all(row["max_abs_diff"] > 0 for row in checkpoints["differing_tensors"])
    assert report["replay"]["from_step"] == FORK_STEP
    assert report["replay"]["first_different_update"] == 21

    code, stderr = call_main(gptexp.diff.main, str(parent), str(fork), "--replay")
    text = capsys.readouterr().out
    assert code == 1, stderr
    assert (
        "parameters first differ after update 21; configs differ in training.lr: 0.001 vs 0.0003"
        in text
    )
    assert "B descends from A, forked at step 20" in text
    assert (files_of(parent), files_of(fork)) == before, "diff wrote nothing"


def test_a_forks_start_checkpoint_is_bit_identical_and_its_lr_is_config(runs, capsys):
    # python -m gptexp.fork writes its start checkpoint with its own lr in the optimizer's
    # param groups; the tensors are the parent's, bit for bit.
    code, report = diff_json(capsys, runs["parent"], runs["real_fork"])
    assert code == 1
    checkpoints = report["checkpoints"]
    assert (checkpoints["last_equal_step"], checkpoints["first_different_step"]) == (20, 30)
    assert not any("param_groups" in row["name"] for row in checkpoints["differing_tensors"])
    hyper = checkpoints["hyperparameters"]
    assert hyper["step"] == FORK_STEP
    initial = {row["name"]: (row["a"], row["b"]) for row in hyper["differ"]}
    assert initial["optimizer.param_groups.0.initial_lr"] == (0.001, 0.0003)

    code, stderr = call_main(gptexp.diff.main, str(runs["parent"]), str(runs["real_fork"]))
    text = capsys.readouterr().out
    assert code == 1, stderr
    assert "bit-identical through step 20; first differ at step 30:" in text
    assert (
        "optimizer settings differ from step 20 (config, not state): initial_lr 0.001 vs 0.0003"
        in text
    )


def moved_family(runs, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the parent and its real fork, side by side, the fork's parent link naming
    where the parent was before it was moved (a path that no longer exists)."""
    parent, fork = tmp_path / "family" / "renamed-parent", tmp_path / "family" / "fork"
    shutil.copytree(runs["parent"], parent)
    shutil.copytree(runs["real_fork"], fork)
    status = json.loads((fork / "run.json").read_text())
    status["parent"]["run"] = str(tmp_path / "gone" / "parent")
    (fork / "run.json").write_text(json.dumps(status))
    return parent, fork


def test_a_moved_parent_is_found_by_its_checkpoints_sha256(runs, tmp_path, capsys):
    parent, fork = moved_family(runs, tmp_path)
    code, report = diff_json(capsys, parent, fork, "--replay")
    assert code == 1
    family = report["lineage"]
    assert family["common_ancestor"] == str(parent) and family["fork_step"] == FORK_STEP
    assert family["b_ancestry"][1]["moved_from"] == str(tmp_path / "gone" / "parent")
    assert report["replay"]["from_step"] == FORK_STEP
    assert report["replay"]["first_different_update"] == 21
    # Beside the fork, it is found too when the fork is diffed against another run.
    code, report = diff_json(capsys, runs["twin"], fork)
    assert report["lineage"]["b_ancestry"][1]["run"] == str(parent)


def test_a_fork_whose_parent_is_nowhere_is_not_replayed_from_initialisation(runs, tmp_path, capsys):
    parent, fork = moved_family(runs, tmp_path)
    shutil.rmtree(parent)
    other = tmp_path / "elsewhere" / "t2"  # beside no run that holds the fork's checkpoint
    shutil.copytree(runs["threads2"], other)
    code, stderr = call_main(gptexp.diff.main, str(other), str(fork), "--replay")
    assert code == 2
    assert capsys.readouterr().out == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: cannot replay: B is a fork of {tmp_path / 'gone' / 'parent'}")
    assert "pass the parent's directory" in line
    # Without --replay the report is made, and says the ancestor is missing.
    code, stderr = call_main(gptexp.diff.main, str(other), str(fork))
    assert code == 1 and "B's ancestor" in capsys.readouterr().out


def test_a_fork_is_not_replayed_with_its_config_before_its_fork_step(runs, tmp_path, capsys):
    # The real fork against an unrelated run (another thread count): no state is shared, and
    # replaying the fork from initialisation with its own lr would be a false divergence.
    code, stderr = call_main(
        gptexp.diff.main, str(runs["threads2"]), str(runs["real_fork"]), "--replay"
    )
    assert code == 2
    assert "cannot replay: B is a fork of" in stderr and "share no state" in stderr


def test_a_replay_stopped_by_sigterm_leaves_no_temporary_directory(runs, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(runs["twin"], twin)
    keep_checkpoints(twin, set())  # 30 updates to replay, from both initialisations
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptexp.diff", str(runs["parent"]), str(twin), "--replay"],
        cwd=ROOT,
        env=subprocess_env(TMPDIR=str(scratch)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: any(scratch.glob("gptexp-diff-*/b")), process=proc, what="the replay's trainers"
    )
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(scratch.iterdir()) == []


def test_replay_starts_at_the_fork_when_the_fork_holds_no_checkpoint_of_it(runs, tmp_path, capsys):
    # A fork's own directory need not hold the checkpoint it started from: the replay then
    # starts from the parent's checkpoint at the fork step (the last common one is 10).
    fork = tmp_path / "fork"
    shutil.copytree(runs["fork"], fork)
    keep_checkpoints(fork, {10, 30})
    code, report = diff_json(capsys, runs["parent"], fork, "--replay")
    assert code == 1
    assert report["checkpoints"]["last_equal_step"] == 10
    assert report["replay"]["from_step"] == FORK_STEP
    assert report["replay"]["from"].endswith("parent/checkpoints/step_0000020.pt")
    assert report["replay"]["first_different_update"] == 21


def test_another_thread_count_parts_at_a_named_step(runs, capsys):
    code, report = diff_json(capsys, runs["parent"], runs["threads2"], "--replay")
    assert code == 1
    assert report["config"] == [{"key": "training.num_threads", "a": 1, "b": 2}]
    first = report["first_metric_divergence"]

    # The first step whose records differ, read straight from the two files.
    def numbers(record: dict) -> dict:
        return {k: v for k, v in record.items() if not k.startswith(("throughput/", "time/"))}

    pairs = zip(read_metrics(runs["parent"]), read_metrics(runs["threads2"]), strict=True)
    parted = next(a["step"] for a, b in pairs if numbers(a) != numbers(b))
    assert first["step"] == parted
    assert first["a"] != first["b"]
    records = {r["step"]: r for r in read_metrics(runs["threads2"])}
    assert records[parted][first["key"]] == first["b"]
    # No checkpoint is shared, so the replay starts from both initialisations and finds the
    # update the checkpoints say happened by step first_different_step.
    replayed = report["replay"]
    assert replayed["from_step"] == 0 and replayed["from"] == "initialisation"
    assert 1 <= replayed["first_different_update"] <= report["checkpoints"]["first_different_step"]


def test_a_damaged_checkpoint_is_skipped_and_named(runs, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(runs["twin"], twin)
    with open(twin / "checkpoints" / "step_0000030.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    code, report = diff_json(capsys, runs["parent"], twin)
    assert code == 0
    assert report["checkpoints"]["equal_steps"] == [10, 20]
    assert any(
        "step 30 skipped" in note and "corrupted" in note for note in report["checkpoints"]["notes"]
    )


def test_keys_that_cannot_change_the_numbers_are_listed_apart(runs, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(runs["twin"], twin)
    status = json.loads((twin / "run.json").read_text())
    status["config"]["logger"]["project"] = "elsewhere"
    status["config"]["training"]["progress"] = False
    (twin / "run.json").write_text(json.dumps(status))
    code, report = diff_json(capsys, runs["parent"], twin)
    assert code == 0 and report["identical"] is True
    assert report["config"] == []
    assert report["config_inert"] == [
        {"key": "logger.project", "a": "gptexp", "b": "elsewhere"},
        {"key": "training.progress", "a": True, "b": False},
    ]


def write_run(path: Path, parent: Path | None = None, step: int | None = None) -> Path:
    path.mkdir(parents=True)
    status = {"status": "finished", "config": {}}
    if parent is not None:
        status["parent"] = {"run": str(parent), "step": step, "checkpoint": "x.pt", "sha256": ""}
    (path / "run.json").write_text(json.dumps(status))
    return RunDirectory(path)


def test_lineage_walks_parent_links(tmp_path):
    root = write_run(tmp_path / "root")
    a = write_run(tmp_path / "a", root.path, 20)
    b = write_run(tmp_path / "b", root.path, 30)
    grandchild = write_run(tmp_path / "c", a.path, 25)
    orphan = write_run(tmp_path / "orphan", tmp_path / "gone", 5)
    unrelated = write_run(tmp_path / "u")

    assert (
        lineage(a, root, holds_checkpoint)["common_ancestor"],
        lineage(a, root, holds_checkpoint)["fork_step"],
    ) == (
        str(root.path),
        20,
    )
    assert lineage(root, a, holds_checkpoint)["fork_step"] == 20
    siblings = lineage(a, b, holds_checkpoint)
    assert (siblings["common_ancestor"], siblings["fork_step"]) == (str(root.path), 20)
    assert lineage(grandchild, a, holds_checkpoint)["fork_step"] == 25
    deep = lineage(grandchild, b, holds_checkpoint)  # c -> a -(20)-> root <-(30)- b
    assert (deep["common_ancestor"], deep["fork_step"], deep["a_depth"]) == (str(root.path), 20, 2)
    assert (
        lineage(a, a, holds_checkpoint)["common_ancestor"] == str(a.path)
        and lineage(a, a, holds_checkpoint)["fork_step"] is None
    )
    assert lineage(a, unrelated, holds_checkpoint)["common_ancestor"] is None
    broken = lineage(orphan, unrelated, holds_checkpoint)
    assert broken["a_ancestry"][-1] == {"run": str(tmp_path / "gone"), "step": 5, "missing": True}


def test_bad_input_is_named_and_exits_2(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, stderr = call_main(gptexp.diff.main, str(runs["parent"]), str(tmp_path / "empty"))
    assert code == 2 and "error:" in stderr and "not a gptexp run directory" in stderr
    code, stderr = call_main(gptexp.diff.main, str(tmp_path / "nowhere"), str(runs["parent"]))
    assert code == 2 and "no such directory" in stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text("{")
    code, stderr = call_main(gptexp.diff.main, str(runs["parent"]), str(damaged))
    assert code == 2 and "run.json: damaged" in stderr
    for content, why in (("[1, 2]", "a JSON list"), ("[" * 100_000 + "]" * 100_000, "too deep")):
        (damaged / "run.json").write_text(content)
        code, stderr = call_main(gptexp.diff.main, str(runs["parent"]), str(damaged))
        assert code == 2 and "run.json: damaged" in stderr and why in stderr
        assert "Traceback" not in stderr
    code, stderr = call_main(gptexp.diff.main, str(runs["parent"]))
    assert code == 2 and "usage:" in stderr
    assert capsys.readouterr().out == "", "nothing on stdout for bad input"

    code, _ = call_main(gptexp.diff.main, "--help")
    out = capsys.readouterr().out
    assert code == 0 and "--json" in out and "--replay" in out
