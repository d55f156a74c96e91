"""make gpu-check: on a machine without CUDA it says why it checks nothing and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys

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


# ----------------------------------------------------------------------------- the side-by-side
# What runs only on a GPU is the two processes of a point; the plan, the timing windows, the
# rows, the table and what the two sides record are checked here on the CPU.


def test_the_side_by_side_covers_both_batches_eager_and_compiled_in_alternation():
    from gptexp.tools.gpucheck import Point, side_by_side_points

    points = side_by_side_points()
    core = [p for p in points if p.with_plain]
    assert {(p.batch, p.compiled) for p in core} == {(8, False), (8, True), (32, False), (32, True)}
    assert [p.compiled for p in core] == [True, False, True, False]  # alternated
    assert points[: len(core)] == core  # the other compile modes come after, gptexp alone
    modes = {(p.batch, p.mode) for p in points[len(core) :]}
    assert modes == {
        (b, m) for b in (8, 32) for m in ("reduce-overhead", "max-autotune-no-cudagraphs")
    }
    assert all(p.compiled for p in points if p.mode != "default")
    assert Point(8, True, "reduce-overhead").name == "batch 8, compiled reduce-overhead"


def test_the_plan_checks_correctness_first_and_fits_the_side_by_side_in_the_budget(tmp_path):
    from gptexp.tools.gpucheck import BUDGET_S, plan, side_by_side_points

    planned = plan(tmp_path, tmp_path / "corpus.txt")
    measurements = [p for p in planned if p.measurement]
    assert planned[-len(measurements) :] == measurements  # after every correctness check
    assert [p.name for p in measurements] == [
        f"side by side: {q.name}" for q in side_by_side_points()
    ]
    # plain script first, then gptexp first, alternately (functools.partial's arguments)
    assert [p.run.args[3] for p in measurements] == [i % 2 == 0 for i in range(len(measurements))]
    core = [p for p in planned if not p.measurement] + measurements[:4]
    assert sum(p.estimate_s for p in core) <= BUDGET_S  # the four points fit the ~8 minutes


def test_time_per_step_is_the_median_window_from_the_warm_up_on():
    from gptexp.tools.gpucheck import SIDE_WARMUP, window_ms

    reads = [(10, 0.0), (20, 50.0)]  # the compile: left out
    reads += [(SIDE_WARMUP + 10 * i, 100.0 + 0.2 * i) for i in range(5)]  # 20 ms a step
    reads[-1] = (reads[-1][0], reads[-1][1] + 0.5)  # an evaluation in the last window
    assert window_ms(reads) == pytest.approx(20.0)
    with pytest.raises(RuntimeError, match="fewer than two"):
        window_ms([(10, 0.0), (SIDE_WARMUP, 1.0)])


def test_a_row_has_both_times_the_ratio_both_mfus_and_the_targets():
    from gptexp.tools.gpucheck import Point, side_by_side_row, side_by_side_table

    per_token, peak = 6 * 85_000_000, 989.4e12
    row = side_by_side_row(Point(32, True), 50.0, 45.0, per_token, peak)
    assert row["ratio"] == pytest.approx(0.9) and row["meets_ratio_target"] is True
    tokens_per_s = 32 * 1024 / 0.045
    assert row["gptexp_mfu"] == pytest.approx(tokens_per_s * per_token / peak)
    assert row["plain_mfu"] == pytest.approx(32 * 1024 / 0.050 * per_token / peak)
    assert row["meets_mfu_target"] == (row["gptexp_mfu"] >= 0.45)
    slower = side_by_side_row(Point(8, False), 18.0, 20.0, per_token, peak)
    assert slower["meets_ratio_target"] is False and slower["meets_mfu_target"] is None
    alone = side_by_side_row(Point(8, True, "reduce-overhead"), None, 12.0, per_token, None)
    assert alone["ratio"] is None and alone["gptexp_mfu"] is None
    table = side_by_side_table([row, slower, alone]).splitlines()
    assert table[0].split()[:4] == ["gpt2", "shape,", "bf16", "plain"]
    assert "45.0" in table[2] and "0.900" in table[2] and "<= 0.95x met" in table[2]
    assert "MFU >= 45%" in table[2]
    assert "1.111" in table[3] and "<= 0.95x MISSED" in table[3]
    assert table[4].startswith("batch 8, compiled reduce-overhead (plain: compiled)")


def test_the_plain_script_reads_the_loss_only_on_the_steps_it_logs(tmp_path):
    """--log-every 3 (the gpu-check's habit, nanoGPT's): the same losses on those steps."""
    from gptexp.tools.bench.measure import PLAIN_SCRIPT

    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} to be or not to be\n" for i in range(300)), encoding="utf-8")
    args = [
        "--data", str(text), "--steps", "7", "--batch-size", "2", "--block-size", "16",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--eval-batches", "1",
        "--threads", "1",
    ]  # fmt: skip
    timings = {}
    for every in (1, 3):
        timings[every] = tmp_path / f"every-{every}.json"
        subprocess.run(
            [sys.executable, str(PLAIN_SCRIPT), *args, "--log-every", str(every),
             "--timings", str(timings[every])],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    each, some = (json.loads(timings[k].read_text()) for k in (1, 3))
    assert each["logged_steps"] == list(range(1, 8))
    assert some["logged_steps"] == [3, 6, 7]  # and the last
    assert some["losses"] == [each["losses"][s - 1] for s in (3, 6, 7)]
    assert len(some["step_ends"]) == 7


def test_the_probe_records_when_each_train_record_is_written(tmp_path):
    """gptexp's side is timed at its train records: the probe lists them with their steps."""
    from tests.conftest import FAST, read_metrics, run_module

    marks, run = tmp_path / "marks.json", tmp_path / "run"
    result = run_module(
        "gptexp.tools.bench.probe", str(marks), "gptexp.train", *FAST,
        "training.max_steps=6", "training.log_every=2", "checkpoint.enabled=false",
        f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    logs = json.loads(marks.read_text())["train_logs"]
    trained = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert [step for step, _ in logs] == trained == [2, 4, 6]
    instants = [at for _, at in logs]
    assert instants == sorted(instants)


def test_gpu_check_refuses_a_missing_corpus_with_one_line(tmp_path):
    result = run_module("gptexp.gpucheck", "--corpus", "nope.txt", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --corpus nope.txt: no such file; give a UTF-8 text file"
