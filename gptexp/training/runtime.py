"""The process a run trains in: device, precision, distributed context, threads, seeding,
RNG state and stop signals."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gptexp.core.config import TrainingConfig
from gptexp.core.errors import ConfigError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Distributed:
    """Rank and world size; one process is rank 0 of a world of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (itself where there is one process)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(dist_ctx: Distributed, device_kind: str) -> None:
    if dist_ctx.enabled and not dist.is_initialized():
        backend = (
            "nccl" if device_kind in ("cuda", "auto") and torch.cuda.is_available() else "gloo"
        )
        dist.init_process_group(backend=backend)


def shutdown_distributed(dist_ctx: Distributed) -> None:
    if dist_ctx.enabled and dist.is_initialized():
        gc.collect()  # a DDP wrapper caught in a reference cycle is freed now, not at exit
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- device


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device='cuda': no CUDA device is available here")
        return torch.device("cuda", local_rank)
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("training.device='mps': no MPS device is available here")
    return torch.device(requested)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(device: torch.device, precision: str) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"training.precision='fp16': needs a CUDA device (have {device.type})")


def apply_process_settings(t: TrainingConfig) -> None:
    """Threads and deterministic kernels, as the run's config says."""
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic != torch.are_deterministic_algorithms_enabled():
        # Only on a change: the call imports torch's compiler stack (about 1 s of start-up).
        torch.use_deterministic_algorithms(t.deterministic)


# ----------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a step can touch, as plain data that ``weights_only`` loading accepts."""
    version, mt_state, gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npy["key"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- signals


class StopRequest:
    """The first SIGINT/SIGTERM/SIGUSR1 asks the loop to stop after the current step; a second
    SIGINT or SIGTERM stops at once with one line (atomic writes keep the disk consistent),
    after ``on_abandon`` (the session records the run as interrupted: it resumes from its last
    checkpoint like any stopped run)."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
    PRUNER = "the pruner"  # not a signal: a search stops a weak trial the same way

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, Any] = {}
        self.on_abandon: Callable[[], None] | None = None

    def install(self) -> None:
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None and signum in (signal.SIGINT, signal.SIGTERM):
            # The second request: no traceback, no more saving; the last checkpoint stands.
            if self.on_abandon is not None:
                with contextlib.suppress(Exception):  # (a full disk: the run reads as crashed)
                    self.on_abandon()
            os.write(2, f"{name} again: stopping now without saving\n".encode())
            os._exit(130)
        self.signame = name
        log.warning("%s received: stopping after this step and saving a checkpoint", name)

    def request(self, reason: str) -> None:
        """Stop after this step, as a signal would, for ``reason`` (e.g. PRUNER)."""
        if self.signame is None:
            self.signame = reason

    def mark_stopped_elsewhere(self) -> None:
        """Another rank asked to stop: behave as if this process had been asked too."""
        if self.signame is None:
            self.signame = "SIGTERM (another rank)"
