"""What the machine can do: FLOPs per token, peak FLOP/s per device and precision, CPU flags.

Model FLOPs utilisation (MFU) is the training FLOP/s that the model's arithmetic needs (nanoGPT's
count, below) over the peak FLOP/s of the hardware it ran on. The peak of a CUDA device comes
from its data sheet (dense tensor-core figures, no sparsity), looked up by the device's name;
the peak of a CPU is measured once with a large matmul and cached, since no table can know every
CPU, its core count and its clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per precision from NVIDIA's data sheets: bf16/fp16 on tensor cores with fp32
# accumulation (what PyTorch uses), tf32 on tensor cores, fp32 without them. None: the device
# has no such tensor-core path (bf16 on Volta and Turing is emulated).
# Patterns are tried in order: more specific names (H100 NVL, H100 PCIe) before the general one.
CUDA_PEAK_TFLOPS: list[tuple[str, dict[str, float | None]]] = [
    (r"\bH200 NVL\b", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b|\bGH200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH100 NVL\b", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM, HBM3
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL40S\b", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA6000\b", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"\bRTX 4090\b", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"\bRTX 3090\b", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bT4\b", {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1}),
    (r"\bV100\b.*\bPCIE\b", {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0}),
    (r"\bV100\b", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),  # SXM2
]

# An AVX2-only AMD EPYC ran a bf16-autocast training step 17x slower than fp32 (measured for
# issue 12): without native bf16 instructions every bf16 matmul is converted in software.
EMULATED_BF16_SLOWDOWN = 17

CPU_PEAK_CACHE = "cpu_peak.json"
CPU_PEAK_MATMUL = 1024  # square size of the matmul whose speed is the CPU's peak


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> int:
    """Training FLOPs per token, nanoGPT's count (PaLM appendix B): 6 per parameter (2 forward,
    4 backward) plus 12 x layers x width x context for the attention scores and their use.

    ``n_params``: non-embedding parameters, as ``GPT.num_parameters()`` counts them (the
    position embeddings left out; the token embedding counts, as the tied output layer).
    """
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def mfu(tokens_per_s: float, flops_per_tok: int, peak_flops: float, world_size: int) -> float:
    """Model FLOPs utilisation: ``tokens_per_s`` counts the tokens of all ranks, so it is
    compared with ``world_size`` devices' peak (1 rank x accum 4 and 2 x accum 2 at the same
    per-device speed have the same MFU)."""
    return tokens_per_s * flops_per_tok / (world_size * peak_flops)


# ----------------------------------------------------------------------------- peaks


def cuda_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the CUDA device called ``device_name`` in ``precision`` (bf16, fp16,
    tf32, fp32); None when the device is not in the table or has no such path."""
    for pattern, peaks in CUDA_PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def matmul_precision(device: torch.device, precision: str) -> str:
    """The precision the matmuls of a step run in: fp32 training uses tf32 tensor cores on CUDA
    when PyTorch allows it (``torch.set_float32_matmul_precision('high')``)."""
    if precision != "fp32":
        return precision
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def measure_cpu_peak_flops(dtype: torch.dtype, size: int = CPU_PEAK_MATMUL) -> float:
    """FLOP/s of the fastest of a few ``size`` x ``size`` matmuls in ``dtype`` on the CPU
    (about a second at most): the practical peak of this CPU with torch's thread count."""
    # Its own generator: the measurement runs inside training and must not move the global
    # RNG, or a resumed run (peak cached, not measured) would draw other dropout masks.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # picks kernels and faults the pages in
    best = float("inf")
    deadline = time.perf_counter() + 0.5
    for _ in range(20):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


def cpu_peak_flops(precision: str, cache_dir: Path) -> float:
    """The CPU's matmul peak in ``precision``, measured once per CPU model, torch version,
    thread count and dtype, and kept in ``cache_dir/cpu_peak.json``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    key = f"{cpu_model()}|torch {torch.__version__}|{torch.get_num_threads()} threads|{dtype}"
    path = cache_dir / CPU_PEAK_CACHE
    cached: dict[str, float] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is damaged; measuring the CPU's peak again", path)
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    peak = measure_cpu_peak_flops(dtype)
    log.info(
        "CPU %s matmul peak: %.1f GFLOP/s (measured once, cached in %s)", dtype, peak / 1e9, path
    )
    cached[key] = peak
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=2) + "\n")
    tmp.replace(path)  # concurrent runs each write a whole file
    return peak


@dataclass
class Peak:
    """The peak a run's MFU is measured against, and where it came from."""

    flops: float | None  # None: unknown, MFU is not logged
    source: str  # e.g. "NVIDIA H100 80GB HBM3 bf16 (data sheet)"


def peak_for(device: torch.device, precision: str, cache_dir: Path) -> Peak:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        dtype = matmul_precision(device, precision)
        return Peak(cuda_peak_flops(name, dtype), f"{name} {dtype} (data sheet)")
    if device.type == "cpu":
        return Peak(cpu_peak_flops(precision, cache_dir), f"{cpu_model()} {precision} (measured)")
    return Peak(None, f"{device.type}: no peak known")


# ----------------------------------------------------------------------------- CPU


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); None where unknown (no
    /proc/cpuinfo, e.g. macOS)."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def has_native_bf16(flags: set[str] | None = None) -> bool | None:
    """Whether the CPU computes bf16 matmuls in hardware: AVX512-BF16 or AMX on x86, the BF16
    extension on Arm. None when the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_info() -> dict[str, object]:
    """The CPU's model and the flags that decide its speed, for benchmark records."""
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "bf16", "asimd")
    return {
        "cpu": cpu_model(),
        "flags": sorted(f for f in (flags or ()) if f in wanted),
        "native_bf16": has_native_bf16(flags),
    }


def precision_advice(device: torch.device, precision: str) -> str | None:
    """A warning for a precision that this machine runs slowly, or None."""
    if device.type == "cpu" and precision == "bf16" and has_native_bf16() is False:
        return (
            f"training.precision=bf16 on a CPU without native bf16 ({cpu_model()}: no "
            "avx512_bf16 or amx_bf16): every bf16 matmul is emulated in software, so a step is "
            f"expected to be several times slower than fp32 (about {EMULATED_BF16_SLOWDOWN}x "
            "on an AVX2-only EPYC); use training.precision=fp32 on this machine"
        )
    return None


class ThroughputWindow:
    """Tokens and seconds of the updates since the last log line (evaluation excluded;
    checkpoint stalls included, since training waits for them)."""

    def __init__(self) -> None:
        self.seconds, self.tokens, self.updates = 0.0, 0, 0

    @contextlib.contextmanager
    def timing(self, tokens: int = 0, updates: int = 0):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started
            self.tokens += tokens
            self.updates += updates

    def take(self) -> tuple[float, float]:
        """(tokens/s, seconds per update) of the window, which starts again."""
        rate = self.tokens / max(self.seconds, 1e-9)
        per_update = self.seconds / max(self.updates, 1)
        self.seconds, self.tokens, self.updates = 0.0, 0, 0
        return rate, per_update
