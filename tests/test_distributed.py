"""Data parallel on CPU: torchrun with two gloo ranks trains, checkpoints and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptexp.checkpoint import CheckpointManager
from gptexp.config import CheckpointConfig
from tests.conftest import FAST, assert_finished, read_metrics, torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH"),
]

SETTINGS = ["model.dropout=0.1", "training.max_steps=16", "checkpoint.every_steps=5"]


def final_state(run_dir: Path) -> dict:
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    return manager.load(manager.find("last"))


def test_two_ranks_resume_after_a_crash_bit_identical(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    result = torchrun("gptexp.train", *FAST, *SETTINGS, f"hydra.run.dir={straight}")
    assert_finished(result, straight)
    status = json.loads((straight / "run.json").read_text())
    assert status["status"] == "finished" and status["world_size"] == 2

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
