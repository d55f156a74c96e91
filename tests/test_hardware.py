"""FLOPs per token, the peak table, the cached CPU peak, MFU in the metrics and the advice on
bf16 for a CPU without native bf16."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from gptexp.model.gpt import GPT
from gptexp.observe.metrics import MetricsFile
from gptexp.observe.rundir import RunDirectory
from gptexp.training import mfu as hardware
from gptexp.training.mfu import (
    cpu_peak_flops,
    cuda_peak_flops,
    flops_per_token,
    has_native_bf16,
    matmul_precision,
    mfu,
    precision_advice,
)
from tests.conftest import FAST, compose_config, make_trainer


def test_flops_per_token_is_nanogpts_count():
    # 6 x 1000 parameters + 12 x 2 layers x 64 wide x 128 context
    assert flops_per_token(1000, 2, 64, 128) == 6000 + 196_608


def test_flops_per_token_of_the_nano_model_by_hand():
    cfg = compose_config(FAST).model  # 2 layers, width 64, context 64, no biases
    block = 64 + 64 * 192 + 64 * 64 + 64 + 64 * 256 + 256 * 64  # ln, qkv, proj, ln, mlp
    n = 2 * block + 64 + 65 * 64  # + final ln + token embedding (tied head); no positions
    model = GPT(cfg, vocab_size=65)
    assert model.num_parameters() == n == 102_784
    assert flops_per_token(n, cfg.n_layer, cfg.n_embd, cfg.block_size) == 6 * n + 98_304


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "tf32", 378.0),
        ("NVIDIA H100 NVL", "bf16", 835.0),
        ("NVIDIA H200", "fp32", 66.9),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-PCIE-40GB", "tf32", 156.0),
        ("NVIDIA A10", "fp16", 125.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.1),
        ("NVIDIA GeForce RTX 4090", "fp16", 165.2),
        ("NVIDIA GeForce RTX 3090", "fp32", 35.6),
        ("Tesla T4", "fp16", 65.0),
        ("Tesla V100-SXM2-16GB", "fp16", 125.0),
        ("Tesla V100-PCIE-16GB", "fp16", 112.0),
    ],
)
def test_cuda_peaks_by_device_name(name, precision, tflops):
    assert cuda_peak_flops(name, precision) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    ("name", "precision"),
    [("Tesla T4", "bf16"), ("NVIDIA A10G", "bf16"), ("Imaginary GPU 9000", "fp32")],
)
def test_unknown_device_or_missing_path_has_no_peak(name, precision):
    assert cuda_peak_flops(name, precision) is None


def test_fp32_matmuls_on_cuda_count_as_tf32_when_pytorch_allows_it():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert matmul_precision(cuda, "fp32") == "tf32" and matmul_precision(cpu, "fp32") == "fp32"
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision(cuda, "fp32") == "fp32"
        assert matmul_precision(cuda, "bf16") == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)


def test_mfu_is_the_same_for_one_rank_x_accum_4_and_two_ranks_x_accum_2():
    # 1 rank x accum 4 processes 4 micro-batches per step on one device; 2 ranks x accum 2 the
    # same 4 on two devices in half the time: twice the tokens per second, twice the peak.
    one = mfu(10_000.0, 1_000_000, 1e11, world_size=1)
    two = mfu(20_000.0, 1_000_000, 1e11, world_size=2)
    assert one == pytest.approx(two) == pytest.approx(0.1)


def test_the_cpu_peak_is_measured_once_and_cached_per_dtype(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        hardware, "measure_cpu_peak_flops", lambda dtype: calls.append(dtype) or 5e10
    )
    assert cpu_peak_flops("fp32", tmp_path) == 5e10
    assert cpu_peak_flops("fp32", tmp_path) == 5e10
    assert calls == [torch.float32]
    cpu_peak_flops("bf16", tmp_path)
    assert calls == [torch.float32, torch.bfloat16]
    keys = json.loads((tmp_path / "cpu_peak.json").read_text())
    threads = f"{torch.get_num_threads()} threads"
    assert all(torch.__version__ in k and threads in k for k in keys) and len(keys) == 2


def test_a_damaged_peak_cache_is_measured_again(tmp_path, monkeypatch, caplog):
    (tmp_path / "cpu_peak.json").write_text("{not json")
    monkeypatch.setattr(hardware, "measure_cpu_peak_flops", lambda dtype: 7e10)
    assert cpu_peak_flops("fp32", tmp_path) == 7e10
    assert "damaged" in caplog.text


def test_the_measured_cpu_peak_is_a_plausible_flop_rate_and_leaves_the_rng_alone():
    before = torch.get_rng_state()
    peak = hardware.measure_cpu_peak_flops(torch.float32, size=256)
    assert 1e8 < peak < 1e14
    assert torch.equal(torch.get_rng_state(), before)  # resume exactness depends on it


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(
        hardware, "_cpuinfo", lambda: ["model name\t: Some EPYC", "flags\t\t: fpu avx2 fma"]
    )
    assert hardware.cpu_flags() == {"fpu", "avx2", "fma"}
    assert hardware.cpu_model() == "Some EPYC"
    assert has_native_bf16() is False
    assert hardware.cpu_info() == {
        "cpu": "Some EPYC",
        "flags": ["avx2", "fma"],
        "native_bf16": False,
    }
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: [])
    assert hardware.cpu_flags() is None and has_native_bf16() is None


@pytest.mark.parametrize(
    ("flags", "native"),
    [({"avx2"}, False), ({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True), ({"bf16"}, True)],
)
def test_native_bf16_flags(flags, native):
    assert has_native_bf16(flags) is native


def test_bf16_on_a_cpu_without_native_bf16_warns_before_training(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    cfg = compose_config([*FAST, "training.precision=bf16"])
    with caplog.at_level(logging.WARNING):
        make_trainer(cfg, tmp_path / "run")
    (message,) = [r.getMessage() for r in caplog.records if "precision=bf16" in r.getMessage()]
    assert "avx512_bf16" in message and "slower" in message and "precision=fp32" in message


def test_no_bf16_advice_where_it_does_not_apply(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert precision_advice(cpu, "bf16") is None
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert precision_advice(cpu, "fp32") is None
    assert precision_advice(torch.device("cuda"), "bf16") is None
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)  # unknown: no guess
    assert precision_advice(cpu, "bf16") is None


def test_mfu_is_logged_with_the_train_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "measure_cpu_peak_flops", lambda dtype: 1e9)
    cfg = compose_config([*FAST, "training.max_steps=3", "checkpoint.enabled=false"])
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    metrics = MetricsFile(run.metrics)
    trainer = make_trainer(cfg, run.path, sinks=[metrics])
    trainer.fit()
    metrics.close()
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    logged = [r for r in records if "train/loss" in r]
    assert len(logged) == 3
    expected = flops_per_token(trainer.model.num_parameters(), 2, 64, 64) / 1e9
    for record in logged:
        assert record["throughput/mfu"] == pytest.approx(
            record["throughput/tokens_per_s"] * expected
        )
