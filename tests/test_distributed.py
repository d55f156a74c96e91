"""Data parallel on CPU: torchrun with two gloo ranks trains, checkpoints and resumes exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig
from tests.conftest import (
    FAST,
    ROOT,
    assert_finished,
    read_metrics,
    subprocess_env,
    torchrun,
    train,
)

pytestmark = [
    pytest.mark.slow,
]

SETTINGS = ["model.dropout=0.1", "training.max_steps=16", "checkpoint.every_steps=5"]


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint that loads (after a crash at a rename the newest listed one is
    missing)."""
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    return manager.load_latest_valid(warn=lambda message: None)[1]


def test_two_ranks_resume_after_a_crash_bit_identical(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    result = torchrun("gptexp.train", *FAST, *SETTINGS, f"hydra.run.dir={straight}")
    assert_finished(result, straight)
    status = json.loads((straight / "run.json").read_text())
    assert status["status"] == "finished" and status["world_size"] == 2
    # train.log (and the progress line) show the loss metrics.jsonl holds: the mean across
    # the ranks, not rank 0's own.
    shown = [
        (int(m.group(1)), float(m.group(2)))
        for m in re.finditer(r"step (\d+)/16 \| loss (\S+)", (straight / "train.log").read_text())
    ]
    records = read_metrics(straight)
    logged = [(r["step"], round(r["train/loss"], 4)) for r in records if "train/loss" in r]
    assert len(shown) == 16 and shown == logged

    # Rank 0 dies (SIGKILL) after step 10's checkpoint file is in place, before it is listed.
    result = torchrun(
        "gptexp.train", *FAST, *SETTINGS, f"hydra.run.dir={crashed}", crash="10:rename"
    )
    assert result.returncode != 0
    result = torchrun("gptexp.resume", f"run={crashed}")
    assert_finished(result, crashed)
    assert "resuming from step_0000005.pt" in result.stderr

    a, b = final_state(crashed), final_state(straight)
    assert a["step"] == b["step"] == 16 and a["world_size"] == 2 and len(a["rng"]) == 2
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), key
    strip = lambda rs: [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in rs]  # noqa: E731
    assert strip(read_metrics(crashed)) == strip(read_metrics(straight))


def test_resume_on_another_world_size_keeps_the_data_and_the_losses(tmp_path):
    """2 ranks -> 1 -> 2, each time killed in a save: every logged loss matches a straight run
    of the same global batch (1 rank x accum 2) to 1e-4 (only the float reduction order
    differs). Dropout 0: its random numbers are per rank and cannot follow a world size."""
    settings = ["model.dropout=0", "training.max_steps=20", "checkpoint.every_steps=5"]
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    result = train(straight, *settings, "training.grad_accum=2", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

    # 2 ranks x accum 1, killed at step 10 (resumes from 5); 1 rank, killed at 15 (from 10).
    args = [*FAST, *settings, "training.grad_accum=1", f"hydra.run.dir={changed}"]
    result = torchrun("gptexp.train", *args, crash="10:rename")
    assert result.returncode != 0
    assert (changed / "checkpoints").is_dir(), result.stderr[-3000:]  # it trained, then died
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "crashing_save.py"),
            "15",
            "rename",
            "gptexp.resume",
            f"run={changed}",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert "training.grad_accum 1 -> 2" in result.stderr, result.stderr[-3000:]
    assert final_state(changed)["world_size"] == 1
    result = torchrun("gptexp.resume", f"run={changed}")
    assert_finished(result, changed)
    assert "training.grad_accum 2 -> 1" in result.stderr

    status = json.loads((changed / "run.json").read_text())
    assert status["world_size"] == 2 and status["config"]["training"]["grad_accum"] == 1
    a, b = read_metrics(changed), read_metrics(straight)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for mine, theirs in zip(a, b, strict=True):
        for key in ("train/loss", "val/loss"):
            assert (key in mine) == (key in theirs)
            if key in mine:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (mine["step"], key)
