"""Smoke test of ``python -m gptexp.bench --quick``: every figure lands in the JSON and the
table prints. No timing is asserted (speed is the bench's output, not a test's)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_module

FIGURES = {
    "machine": ["cpu", "cores", "threads", "torch"],
    "throughput": [
        "framework_tokens_per_s",
        "reference_tokens_per_s",
        "framework_over_reference",
        "settings_tokens_per_s",
    ],
    "efficiency": [
        "matmul_flops_per_s",
        "flops_per_token",
        "fp32_framework_share_of_peak",
        "best_setting",
        "best_over_fp32_reference",
        "best_share_of_peak",
    ],
    "startup": [
        "import_torch_s",
        "fresh_first_step_s",
        "resume_first_step_s",
        "fresh_over_import_torch",
        "resume_over_fresh",
    ],
    "eval": ["entry_tokens_per_s", "evaluate_loss_tokens_per_s", "entry_wall_s"],
    "memory": ["train_peak_rss_bytes"],
}
CHECKPOINT_FIGURES = [
    "stall_s",
    "write_s",
    "plain_torch_save_s",
    "stall_over_plain_save",
    "load_s",
    "checkpoint_bytes",
    "raw_tensor_bytes",
]


@pytest.mark.slow
def test_quick_bench_writes_every_figure_and_prints_the_table(tmp_path):
    out = tmp_path / "bench"
    result = run_module(
        "gptexp.bench", "--quick", "--threads", "1", "--out", str(out), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr

    (path,) = out.glob("*.json")
    results = json.loads(path.read_text())
    assert results["mode"] == "quick"
    for section, keys in FIGURES.items():
        for key in keys:
            assert results[section].get(key) is not None, f"{section}.{key} missing"
    assert "entry_marginal_tokens_per_s" in results["eval"]  # None when noise swamps it
    tiny = results["checkpoint"]["tiny"]
    for key in CHECKPOINT_FIGURES:
        assert tiny[key] is not None, f"checkpoint.tiny.{key} missing"
    assert results["checkpoint"]["gpt2_124m"] is None  # --quick skips the 124M shape
    # The plain loop trains the same model on the same batches as the trainer.
    assert results["throughput"]["same_losses_as_reference"] is True
    assert len(results["targets"]) == 6
    assert all(set(t) == {"target", "value", "limit", "holds"} for t in results["targets"])

    assert "train tokens/s" in result.stdout
    assert "checkpoint stall, tiny" in result.stdout
    assert str(path) in result.stdout


def test_bench_refuses_a_missing_corpus(tmp_path):
    result = run_module(
        "gptexp.bench", "--quick", "--corpus", str(tmp_path / "nope.txt"), cwd=tmp_path
    )
    assert result.returncode == 1
    assert "nope.txt: no such file" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_reused_snapshot_buffers_keep_each_checkpoint_consistent(tmp_path):
    """The bench's stall fix: from its second save on, the manager copies into the buffers of
    the previous snapshot. Each checkpoint must still hold the values of its own step, and a
    tied weight must still be written once."""
    from gptexp.checkpoint import CheckpointManager
    from gptexp.config import CheckpointConfig

    manager = CheckpointManager(tmp_path, CheckpointConfig(every_steps=1, keep_last=3))
    weight = torch.zeros(64, 64)
    for step in (1, 2, 3):
        weight.fill_(step)
        # state_dict() returns a distinct tensor object per name for tied weights
        manager.save(
            {"model": {"wte": weight.detach(), "head": weight.detach()}, "step": step},
            step,
            None,
            ["periodic"],
        )
        weight.fill_(-1.0)  # training mutates in place while the writer runs
    manager.wait()
    for entry in manager.entries():
        state = manager.load(entry)
        assert torch.equal(state["model"]["wte"], torch.full((64, 64), float(entry.step)))
        assert state["model"]["wte"].untyped_storage().data_ptr() == (
            state["model"]["head"].untyped_storage().data_ptr()
        ), "the tied weight is stored once"
        assert entry.bytes < 2 * 64 * 64 * 4
