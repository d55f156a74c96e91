"""What a bench run measures: sizes, repeats, and what this machine can do natively."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptexp.core.config import ModelConfig

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # gptexp/tools/bench/plan.py -> the checkout
GPT2_VOCAB = 50257

# The full bench should end within LENGTH_GOAL_S on 2 cores. Its length, from its run on the
# 2-core AVX2 EPYC of docs/benchmarks.md (568 s with 150 steps a process): a whole-process pair
# costs ~11 s of start-up, evaluation and exit (both processes and ``import torch``) plus
# 0.28 + 0.29 s for each step after the first; the other parts ~92 s whatever the steps.
LENGTH_GOAL_S = 600.0
PAIR_FIXED_S, PAIR_STEP_S, OTHER_PARTS_S = 11.0, 0.57, 92.0


@dataclass(frozen=True)
class BenchPlan:
    """Sizes and repeat counts of one bench run."""

    mode: str  # full | quick
    model_name: str  # the conf/model/ option trained by both sides
    batch_size: int
    steps: int  # optimizer steps of each whole-process run
    pairs: int  # whole-process runs of each side, alternated
    short_steps: int  # a run with a final checkpoint, for resume and eval
    eval_batches: int  # the one evaluation at the end of each run
    matmul_size: int
    checkpoint_repeats: int
    gpt2: bool  # the 124M GPT-2 checkpoint cost
    eval_entry: tuple[int, int]  # python -m gptexp.eval with both batch counts
    eval_repeats: int
    resume_repeats: int
    guard_steps: int  # steps of each trainer in the spike guard's in-process A/B
    threads: int
    compile: bool  # also measure torch.compile (and its break-even)
    bf16: bool  # also measure bf16 autocast (only where the CPU has native bf16)
    skipped: tuple[str, ...]  # what was left out, and why

    @classmethod
    def make(cls, quick: bool, threads: int, compile: bool, flags: set[str]) -> BenchPlan:
        skipped = []
        bf16 = native_bf16(flags)
        if not bf16:
            skipped.append(
                "bf16 autocast: this CPU has no native bf16 (avx512_bf16/amx_bf16), "
                "where a bf16 step is many times slower than fp32"
            )
        if not compile:
            skipped.append("torch.compile: pass --compile (a cold compile costs ~30 s per run)")
        if quick:
            skipped.append("124M checkpoint cost and PASS/FAIL verdicts: --quick sizes are toys")
            return cls(
                "quick", "nano", 4, 6, 2, 2, 1, 256, 1, False, (1, 3), 1, 1, 3, threads, compile,
                bf16, tuple(skipped),
            )  # fmt: skip
        return cls(
            "full", "tiny", 32, 100, 5, 5, 2, 1024, 3, True, (2, 22), 2, 2, 11, threads, compile,
            bf16, tuple(skipped),
        )  # fmt: skip

    def model_config(self, name: str | None = None) -> ModelConfig:
        """The shape that ``model=<name>`` composes, as the entry point composes it (a copy)."""
        return dataclasses.replace(composed_model_config(name or self.model_name))

    def estimated_seconds(self) -> float:
        """The full bench's length on the 2-core EPYC it was measured on (see above)."""
        return self.pairs * (PAIR_FIXED_S + (self.steps - 1) * PAIR_STEP_S) + OTHER_PARTS_S

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model_config().block_size


@functools.cache
def composed_model_config(name: str) -> ModelConfig:
    """Composed once per name: a Hydra composition takes ~0.15 s, and the bench asks for the
    shape for every step it reads (it took 22 s a whole-process pair before this cache)."""
    from gptexp.core.config import compose_config

    return compose_config([f"model={name}"]).model


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(flags: set[str]) -> bool:
    """bf16 matmuls in hardware: AVX512-BF16 or AMX (elsewhere oneDNN emulates them)."""
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def machine_info(threads: int, flags: set[str]) -> dict[str, Any]:
    """The CPU's model and the flags that decide its speed, recorded next to every figure."""
    import torch

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": any(f.startswith("amx") for f in flags),
        "native_bf16": native_bf16(flags),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": _memory_gib(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
    }


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None
