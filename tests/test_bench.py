"""The bench: ``python -m gptexp.bench --quick`` puts every figure in the JSON and prints the
table; the plain script runs alone and trains what the trainer trains. No timing is asserted
(speed is the bench's output, not a test's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from gptexp.tools.bench.measure import PLAIN_SCRIPT, child_env
from tests.conftest import run_module

FIGURES = {
    "machine": ["cpu", "cores", "threads", "torch", "flags", "native_bf16", "cpu_capability"],
    "whole_process": [
        "gptexp_wall_s",
        "plain_wall_s",
        "gptexp_over_plain_each",
        "gptexp_phases_s",
        "plain_phases_s",
        "gptexp_import_profile_s",
    ],
    "per_step": ["gptexp_step_s", "plain_step_s", "gptexp_over_plain_each", "gptexp_logged_step_s"],
    "startup": [
        "import_torch_s",
        "fresh_first_step_s",
        "fresh_over_import_torch",
        "resume_first_step_s",
        "resume_over_fresh",
    ],
    "sample": ["final_sample_s", "share_of_wall", "kv_cache_s", "no_cache_s"],
    "throughput": ["tokens_per_s_by_setting", "best_setting"],
    "efficiency": ["matmul_flops_per_s", "flops_per_token", "fp32_share_of_peak"],
    "eval": ["evaluate_loss_tokens_per_s", "entry_wall_s"],
    "memory": ["gptexp_peak_rss_bytes", "plain_peak_rss_bytes"],
    "guard": ["off_step_s", "skip_step_s", "skip_over_off"],
}
CHECKPOINT_FIGURES = [
    "first_stall_s",
    "stall_s",
    "first_stall_over_plain_save",
    "stall_over_plain_save",
    "write_s",
    "plain_torch_save_s",
    "load_s",
    "checkpoint_bytes",
    "raw_tensor_bytes",
]
PHASES = [
    "interpreter",
    "import torch",
    "corpus read + tokenize",
    "model + optimizer",
    "first step",
    "later steps",
    "evaluation",
    "teardown",
]


@pytest.mark.slow
def test_quick_bench_writes_every_figure_and_prints_the_table(tmp_path):
    out = tmp_path / "bench"
    result = run_module(
        "gptexp.bench", "--quick", "--threads", "1", "--out", str(out), cwd=tmp_path, timeout=600
    )  # ~30 s on an idle machine; the deadline allows for a busy one
    assert result.returncode == 0, result.stderr

    (path,) = out.glob("*.json")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.json", path.name)
    results = json.loads(path.read_text())
    assert results["mode"] == "quick"
    for section, keys in FIGURES.items():
        for key in keys:
            assert results[section].get(key) is not None, f"{section}.{key} missing"
    whole = results["whole_process"]
    # The breakdown covers exec to exit: each side's phases add up to its wall time.
    for side in ("gptexp", "plain"):
        phases = whole[f"{side}_phases_s"]
        assert set(PHASES) <= set(phases)
        # Medians of two runs are their means, so the phases add up to the median wall.
        assert sum(phases.values()) == pytest.approx(whole[f"{side}_wall_s"], rel=0.01)
    assert {"final sample", "run dir + provenance"} <= set(whole["gptexp_phases_s"])
    assert "torch" in whole["gptexp_import_profile_s"]
    # The plain script trains the same model on the same batches as the trainer.
    assert whole["same_losses_as_plain"] is True
    assert whole["same_val_loss_as_plain"] is True
    tiny = results["checkpoint"]["tiny"]
    for key in CHECKPOINT_FIGURES:
        assert tiny[key] is not None, f"checkpoint.tiny.{key} missing"
    assert results["checkpoint"]["gpt2_124m"] is None  # --quick skips the 124M shape
    assert any("124M" in reason for reason in results["skipped"])
    # At toy sizes no verdict is given.
    assert len(results["targets"]) == 6
    assert all(set(t) == {"target", "value", "limit", "holds"} for t in results["targets"])
    assert all(t["holds"] is None for t in results["targets"])

    # Two pairs: no ratio of the pairs (a median of two is a mean), each pair's instead.
    for section in ("whole_process", "per_step"):
        assert results[section]["gptexp_over_plain"] is None
        assert len(results[section]["gptexp_over_plain_each"]) == 2
    assert result.stdout.count("n/a (2 pairs: ") == 2
    assert "whole process" in result.stdout and "phase (s, medians)" in result.stdout
    assert not re.search(r"^(PASS|FAIL)", result.stdout, flags=re.MULTILINE)
    assert "checkpoint stall, tiny" in result.stdout
    assert str(path) in result.stdout


def test_no_ratio_of_pairs_below_the_minimum_and_a_median_above():
    from gptexp.tools.bench.report import pairs_ratio, ratio_cell

    assert pairs_ratio([1.0, 50.0]) is None  # not 25.5: one outlier would be the headline
    assert ratio_cell(None, [1.0, 50.0]) == "n/a (2 pairs: 1.00, 50.00)"
    assert pairs_ratio([1.0, 1.1, 50.0]) == 1.1
    assert ratio_cell(1.1, [1.0, 1.1, 50.0]) == "1.100"


def test_make_bench_passes_args_through():
    from tests.conftest import ROOT

    dry = subprocess.run(
        ["make", "-n", "bench", "ARGS=--quick --threads 1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    (line,) = [line for line in dry.stdout.splitlines() if "-m gptexp.bench" in line]
    assert line.endswith("--quick --threads 1")


def test_plain_script_runs_alone_and_imports_nothing_of_gptexp(tmp_path):
    """plain_train.py is the standalone yardstick: python gptexp/tools/bench/plain_train.py."""
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} to be or not to be\n" for i in range(300)), encoding="utf-8")
    timings = tmp_path / "timings.json"
    args = [
        "--data", str(text), "--steps", "3", "--batch-size", "2", "--block-size", "16",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--eval-batches", "1",
        "--threads", "1", "--timings", str(timings),
    ]  # fmt: skip
    check = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
        "run_name='__main__'); "
        "loaded = [m for m in sys.modules if m.startswith('gptexp')]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(PLAIN_SCRIPT), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "step 3: train loss" in result.stdout
    t = json.loads(timings.read_text())
    assert len(t["step_ends"]) == len(t["losses"]) == 3
    marks = t["marks"]
    assert marks["started"] <= marks["imported"] <= marks["data"] <= marks["model"]


def test_plain_script_trains_what_the_trainer_trains(tmp_path):
    """Same initialisation, batches and schedule: the same losses as gptexp's Trainer."""
    from gptexp.core.config import (
        CheckpointConfig,
        DataConfig,
        LoggerConfig,
        ModelConfig,
        TrainConfig,
        TrainingConfig,
    )
    from tests.conftest import make_trainer

    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} to be or not to be\n" for i in range(300)), encoding="utf-8")
    timings = tmp_path / "timings.json"
    subprocess.run(
        [sys.executable, str(PLAIN_SCRIPT), "--data", str(text), "--steps", "4",
         "--batch-size", "2", "--block-size", "16", "--n-layer", "1", "--n-head", "2",
         "--n-embd", "16", "--warmup", "2", "--threads", "1", "--timings", str(timings)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    cfg = TrainConfig(
        model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16),
        data=DataConfig(name="text", path=str(text)),
        training=TrainingConfig(
            max_steps=4, batch_size=2, warmup_steps=2, device="cpu", num_threads=1, compile="false"
        ),
        checkpoint=CheckpointConfig(enabled=False),
        logger=LoggerConfig(),
    )
    (tmp_path / "run").mkdir()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        trainer = make_trainer(cfg, tmp_path / "run")
        losses = [trainer.train_step()[0] for _ in range(4)]
    finally:
        torch.set_num_threads(previous)
    assert losses == json.loads(timings.read_text())["losses"]


def test_the_full_bench_fits_ten_minutes_on_two_cores_with_a_margin():
    """5 pairs of 150 steps took 568 s on the 2-core EPYC: too close to 10 minutes."""
    from gptexp.tools.bench.plan import LENGTH_GOAL_S, BenchPlan

    plan = BenchPlan.make(False, 2, False, set())
    assert plan.pairs >= 5  # the ratios are medians over at least 5 pairs
    assert plan.estimated_seconds() <= 0.8 * LENGTH_GOAL_S


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
    from gptexp.checkpoint.manager import CheckpointManager
    from gptexp.core.config import CheckpointConfig

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


def test_the_bench_children_share_gptexps_exact_matmuls(monkeypatch):
    """The plain script compares its losses with gptexp's: both run with MKL's strict mode
    (gptexp sets it in its own process; the plain script only gets it from the bench), and a
    user's own MKL_CBWR stands for both."""
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert child_env()["MKL_CBWR"] == "AUTO,STRICT"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert child_env()["MKL_CBWR"] == "COMPATIBLE"
