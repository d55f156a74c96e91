"""How a run compiles: ``training.compile=auto`` (compile the model only where the run repays the
compile time) and ``training.compile_mode`` (the mode ``torch.compile`` is given).

Measured on a 2-core AMD EPYC (AVX2 only, torch 2.13, model=tiny, batch 32, 2 threads, eager
and compiled steps in alternation in one process, malloc tuned as in training): a cold
compile (empty inductor cache) took 29.5 s, and a compiled step took 286.5 ms against
297.1 ms eager, 10.6 ms (3.6%) less. The compile pays for itself after
29.5 s / 10.6 ms = ~2,800 steps, so ``auto`` compiles a run only when it has at least that many
steps left. With the inductor cache warm (a second run of the same shape) the compile took
2.0 s, but the compiled step was no faster than eager in that measurement: on this CPU the gain
is within the noise of a shared machine, so the cold figure stands. On other devices the
break-even was not measured here; ``auto`` applies the same step count there (compiled kernels
gain more on a GPU, so this errs on the side of not compiling); ``training.compile=true``
compiles whatever the length.
"""

from __future__ import annotations

import logging

from gptexp.core.config import TrainingConfig

log = logging.getLogger(__name__)

# Steps after which a cold compile has paid for itself (measured on the CPU, see above).
COMPILE_BREAK_EVEN_STEPS = 2800


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


def compile_options(cfg: TrainingConfig) -> dict[str, str]:
    """The keyword arguments of the run's ``torch.compile`` call: ``training.compile_mode=default``
    passes no mode (torch's own default), any other value is passed as ``mode``."""
    return {} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}
