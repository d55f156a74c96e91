"""``training.compile=auto``: compile the model only where the run repays the compile time.

torch.compile's first step compiles the model (a cold compile of model=tiny took ~30 s on a
2-core AMD EPYC, AVX2 only) and each later step is a little faster (fp32: 1.058x the eager
throughput, 210 -> ~199 ms per step for model=tiny, batch 32; numbers from the bench, see the
README's Benchmarks). The compile pays for itself after ~30 s / 11.5 ms = about 2,600 steps,
so ``auto`` compiles a CPU run only when it has at least that many steps left. On other
devices the break-even was not measured here; ``auto`` applies the same step count there
(compiled kernels gain more on a GPU, so this errs on the side of not compiling);
``training.compile=true`` compiles whatever the length.
"""

from __future__ import annotations

import logging

from gptexp.config import TrainingConfig

log = logging.getLogger(__name__)

# Steps after which a cold compile has paid for itself (measured on the CPU, see above).
COMPILE_BREAK_EVEN_STEPS = 2600


def should_compile(cfg: TrainingConfig, step: int) -> bool:
    """Whether to torch.compile a run at ``step`` (0 for a fresh run, later on resume); the
    decision and its reason are logged."""
    if cfg.compile in ("true", "false"):
        return cfg.compile == "true"
    remaining = cfg.max_steps - step
    chosen = remaining >= COMPILE_BREAK_EVEN_STEPS
    log.info(
        "training.compile=auto: %s (%d steps to go; a compile repays itself after ~%d)",
        "compiling" if chosen else "not compiling",
        remaining,
        COMPILE_BREAK_EVEN_STEPS,
    )
    return chosen
