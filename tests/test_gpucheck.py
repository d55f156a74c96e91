"""make gpu-check: on a machine without CUDA it says why it checks nothing and exits 0."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu-check runs")
def test_gpu_check_without_cuda_says_why_and_exits_0(tmp_path):
    result = run_module("gptexp.gpucheck", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gpu-check: skipped: this PyTorch is a CPU build" in result.stdout or (
        "gpu-check: skipped: no CUDA device is visible" in result.stdout
    )
    assert not (tmp_path / "outputs").exists()  # nothing was trained or written
