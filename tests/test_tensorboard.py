"""logger=tensorboard: TensorBoard's own readers see what metrics.jsonl holds, each step once,
across a SIGKILL and a resume; a rollback rewinds the event files as it rewinds metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")  # the `tensorboard` extra (make install installs it)

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.backend.event_processing.plugin_event_multiplexer import (  # noqa: E402
    EventMultiplexer,
)
from tensorboard.util import tensor_util  # noqa: E402

from gptexp.core.config import compose_config  # noqa: E402
from gptexp.run.tensorboard_sink import (  # noqa: E402
    EVENT_FILE_PREFIX,
    TensorBoardSink,
    event_files,
    rewind_run,
)
from tests.conftest import FAST, ROOT, run_module, subprocess_env  # noqa: E402

CRASHING_SAVE = str(ROOT / "tests" / "crashing_save.py")
LOSSES = ("train/loss", "val/loss")


def raw_scalars(folder: Path) -> list[tuple[str, int, float]]:
    """Every scalar in every event file of ``folder``, in the order TensorBoard reads them,
    duplicates included (no purging: the files as they are)."""
    found = []
    for path in event_files(folder):
        for event in EventFileLoader(str(path)).Load():
            found += [(v.tag, event.step, scalar(v)) for v in event.summary.value]
    return found


def scalar(value) -> float:
    """A summary value as a number: the tensor form, or the older ``simple_value``."""
    if value.HasField("tensor"):
        return float(tensor_util.make_ndarray(value.tensor).item())
    return value.simple_value


def jsonl_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[tag]) for r in records if isinstance(r.get(tag), float)]


def test_sigkill_and_resume_each_step_once_as_in_metrics_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    board = run_dir / "tensorboard"
    overrides = [*FAST, "logger=tensorboard", "training.max_steps=30", "checkpoint.every_steps=10"]
    # Killed mid-save of step 20's checkpoint: steps 11..20 are logged, the last checkpoint
    # is step 10.
    killed = subprocess.run(
        [sys.executable, CRASHING_SAVE, "20", "write", "gptexp.train", *overrides,
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = raw_scalars(board)
    assert max(step for tag, step, _ in before if tag == "train/loss") == 20

    resumed = run_module("gptexp.resume", f"run={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step_0000010.pt" in resumed.stderr
    assert len(event_files(board)) == 2  # a fresh event file per start

    after = raw_scalars(board)
    for tag in LOSSES:
        expected = jsonl_scalars(run_dir, tag)
        assert [s for s, _ in expected] == sorted({s for s, _ in expected})
        # The files as they are: each step once (steps 11..20 of the killed start are gone).
        seen = [(step, value) for t, step, value in after if t == tag]
        assert [s for s, _ in seen] == [s for s, _ in expected], tag
        assert np.allclose([v for _, v in seen], [v for _, v in expected], rtol=1e-6)
        # TensorBoard's view of the run.
        view = EventAccumulator(str(board))
        view.Reload()
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in view.Scalars(tag)] == expected
    assert max(s for s, _ in jsonl_scalars(run_dir, "train/loss")) == 30

    # `tensorboard --logdir <parent>`: one run, named by its path under the logdir.
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    assert list(multiplexer.Runs()) == ["run/tensorboard"]


def test_a_guard_rollback_in_a_run_leaves_each_step_once(tmp_path):
    """The spike guard rolls back to step 10 after step 14: steps 11..14 are trained again."""
    from tests.test_guard import GUARDED, spiking

    run_dir = tmp_path / "run"
    result = spiking(
        "13:100", run_dir, "training.guard.action=rollback", *GUARDED, "logger=tensorboard",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rolled back to checkpoint step_0000010.pt" in result.stderr
    scalars = raw_scalars(run_dir / "tensorboard")
    expected = jsonl_scalars(run_dir, "train/loss")
    seen = [(step, value) for tag, step, value in scalars if tag == "train/loss"]
    assert [s for s, _ in seen] == [s for s, _ in expected] == list(range(1, 21))
    assert np.allclose([v for _, v in seen], [v for _, v in expected], rtol=1e-6)


def test_a_rollback_rewinds_the_event_files(tmp_path):
    """The trainer's guard rolls back: it calls rewind; the steps after it are logged again."""
    sink = TensorBoardSink(tmp_path)
    for step in range(1, 6):
        sink.log({"step": step, "train/loss": float(step)})
    sink.log({"step": 5, "event": "spike", "n": 1})  # an event is not a scalar
    sink.rewind(3)
    for step in range(4, 8):
        sink.log({"step": step, "train/loss": 10.0 + step})
    sink.close()
    scalars = raw_scalars(tmp_path / "tensorboard")
    assert [(step, value) for _, step, value in scalars] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0), (7, 17.0),
    ]  # fmt: skip


def test_a_resume_without_tensorboard_still_rewinds_its_files(tmp_path):
    """The resume's rewind (starts.rewind_metrics) covers the event files, whatever this
    start's logger: a later start with TensorBoard on again must not show steps twice."""
    from gptexp.observe.rundir import RunDirectory
    from gptexp.run.starts import rewind_metrics

    sink = TensorBoardSink(tmp_path)
    for step in range(1, 6):
        sink.log({"step": step, "train/loss": float(step)})
    sink.close()
    rewind_metrics(RunDirectory(tmp_path), 3)
    assert [step for _, step, _ in raw_scalars(tmp_path / "tensorboard")] == [1, 2, 3]


def test_a_torn_record_is_cut_at_the_next_start(tmp_path):
    """A crash mid-write leaves half a record; the next start rewrites the file without it."""
    sink = TensorBoardSink(tmp_path)
    sink.log({"step": 1, "train/loss": 2.5})
    sink.close()
    (path,) = event_files(tmp_path / "tensorboard")
    with open(path, "ab") as f:
        f.write(b"\x30\x00\x00\x00\x00\x00\x00\x00torn")
    rewind_run(tmp_path, 1)
    assert raw_scalars(tmp_path / "tensorboard") == [("train/loss", 1, 2.5)]
    assert not path.read_bytes().endswith(b"torn")
    # What is named like an event file but is none is not the run's to rewrite.
    stranger = tmp_path / "tensorboard" / f"{EVENT_FILE_PREFIX}0.someone-else"
    stranger.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not an event file at all")
    rewind_run(tmp_path, 0)
    assert stranger.read_bytes().endswith(b"not an event file at all")


def test_without_the_package_the_run_is_refused_before_it_writes(tmp_path):
    """An environment without the extra: a ``tensorboard`` that cannot be imported first on
    the path (the fault is the test's, the product has no switch for it)."""
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{env['PYTHONPATH']}"
    run_dir = tmp_path / "run"
    result = run_module(
        "gptexp.train", *FAST, "logger=tensorboard", f"hydra.run.dir={run_dir}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: logger=tensorboard: the tensorboard package is not installed" in result.stderr
    assert not (run_dir / "run.json").exists() and not (run_dir / "metrics.jsonl").exists()


def test_both_loggers_compose():
    both = compose_config(["logger=[wandb,tensorboard]"]).logger
    assert both.wandb and both.tensorboard
    alone = compose_config(["logger=tensorboard"]).logger
    assert alone.tensorboard and not alone.wandb
