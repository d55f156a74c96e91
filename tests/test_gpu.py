"""CUDA: the same entry points on a GPU (skipped where there is none)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, run_module, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_and_resume_on_cuda(tmp_path, precision):
    run_dir = tmp_path / "run"
    result = train(run_dir, "training.device=cuda", f"training.precision={precision}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished"
    records = read_metrics(run_dir)
    assert records[-1]["val/loss"] < records[0]["val/loss"]

    extended = run_module("gptexp.resume", f"run={run_dir}", "training.max_steps=25", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr
    assert read_metrics(run_dir)[-1]["step"] == 25
