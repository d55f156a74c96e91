"""Process settings: for training on the CPU, and for a command's own process.

Memory: glibc's malloc hands large blocks (above a threshold of at most 32 MiB, 128 KiB at first)
back to the kernel when they are freed, and trims the heap top; the next training step asks
for the same activations again, and every page of them faults in afresh and is zeroed. For
model=tiny, batch 32 that is ~8,700 page faults (34 MB) per step; with the threshold and
the trim limit raised, freed blocks stay in the heap and are reused: 0.3 faults per step.
The price is that the process keeps its peak memory until it exits, which a training
process reaches on its first step anyway. A plain PyTorch script does not do this.

Garbage collection: ``import torch`` leaves ~10^6 Python objects (its modules, their
functions and types), all alive until the process exits. Each full collection walks them all
(~0.1 s per pass here), and the interpreter's shutdown walks them again: 0.5 s after
``import torch`` alone, 1.0 s with torch._dynamo, on a 2-core AMD EPYC. ``gc.freeze()`` moves
the objects alive now out of the collector's sight (they are still freed by reference
counting); done once the imports are over and again at exit, a command's teardown took 0.25 s.

Numerics under contention: MKL (torch's BLAS on x86) picks a matmul's code branch and splits its
work by the run-time conditions, not only by the thread count: on a busy 2-core Xeon (AVX-512,
2 training threads beside other work) about 1 fresh run in 40 parted from its twins in the
last bits at the first update (the tied ``wte.weight`` first; its gradient is a matmul over all
tokens). MKL's conditional numerical reproducibility in strict mode (``MKL_CBWR=AUTO,STRICT``)
makes ?gemm bitwise reproducible even when the threads it gets change. MKL reads the variable
once, at its first call (not at ``import torch``), so a command sets it before any math.
torch itself already turns MKL's dynamic threading off (``torch.set_num_threads`` calls
``mkl_set_dynamic(0)``), and GNU OpenMP's dynamic teams are off unless ``OMP_DYNAMIC`` says so.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import logging
import os
import platform

log = logging.getLogger(__name__)

MKL_CBWR = "MKL_CBWR"
STRICT_REPRODUCIBILITY = "AUTO,STRICT"  # MKL's best code branch for this CPU, strict CNR mode

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed blocks for reuse (see the module docstring). Returns
    whether the setting took effect; a no-op off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.debug("mallopt refused the thresholds; malloc keeps its defaults")
    return ok


def freeze_imported_objects() -> None:
    """In a command's own process, once its modules are imported: freeze what exists now and,
    at exit, everything (see the module docstring). Not for library use: objects frozen in a
    long-lived process (a notebook, a test session) are never collected as cycles."""
    gc.freeze()
    atexit.unregister(gc.freeze)  # registered once, however many commands the process runs
    atexit.register(gc.freeze)  # atexit runs before the interpreter's final collections


def reproducible_blas() -> bool:
    """In a command's own process, before its first matmul: ask MKL for bitwise reproducible
    matmuls (see the module docstring). A user's own ``MKL_CBWR`` stands. Returns whether
    strict mode is what MKL will use; child processes (sweep workers, torchrun ranks) inherit
    it through the environment."""
    os.environ.setdefault(MKL_CBWR, STRICT_REPRODUCIBILITY)
    return blas_caveat() is None


def blas_caveat() -> str | None:
    """Why this process's matmuls may not be bitwise reproducible on busy cores (a user's
    ``MKL_CBWR`` without STRICT), or None. A run says it when it starts and records the value
    in run.json (``mkl_cbwr``)."""
    chosen = os.environ.get(MKL_CBWR)
    if chosen is None or "STRICT" in chosen.upper():
        return None
    return (
        f"{MKL_CBWR}={chosen} (yours): matmuls may part in the last bits when other work keeps "
        f"the cores busy; {MKL_CBWR}={STRICT_REPRODUCIBILITY} (gptexp's default) keeps them exact"
    )


def prepare_command_process() -> None:
    """What a command's ``main()`` does first, before any math: reproducible matmuls, then the
    objects of the imports frozen for the collector."""
    reproducible_blas()
    freeze_imported_objects()
