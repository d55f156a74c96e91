"""Prefetch: the micro-batches of the next training step are built, and on CUDA on their way to
the device, before the current step ends.

A step's batches are a pure function of their index (``gptexp.data.batches``), so building
them early changes no number: ``prefetch(index)`` builds all ``grad_accum`` micro-batches of
that index on the host while the GPU still works through the kernels the host has queued,
and on CUDA starts their copies from pinned memory with ``non_blocking=True``, so the host
does not wait for them. ``take(index)`` hands them over when the index is the one
prefetched, and builds them then and there when it is not (a rollback to a checkpoint or the
guard's skip list moved the data position): a wrong batch is never returned.

On a CPU nothing changes: the tensors are the ones the batch function built, without a copy.

The copies go on the current stream, the one the step's kernels run on: they are ordered
after the work already queued and before the next step's use, with no cross-stream events to
keep. They are small (one step's token ids: 256 KB for 32 x 1024), so overlapping them with
compute on a second stream would save next to nothing; what saves time is that the host builds
the batch and queues its copy without waiting for the GPU. The pinned host tensors stay
referenced until the next ``prefetch`` or ``take`` replaces them, and PyTorch's pinned-memory
cache does not hand a block out again before the copies recorded on it have completed, so a
copy in flight never reads a buffer that is being overwritten.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (index, micro) -> (x, y), each (B, T), on the host: the batch function of a run.
MakeBatch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


class Prefetcher:
    """The micro-batches of one step at a time, built ahead of the step that trains on them."""

    def __init__(self, make: MakeBatch, grad_accum: int, device: torch.device) -> None:
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.make = make
        self.grad_accum = grad_accum
        self.device = device
        self._index: int | None = None  # the index of the batches in flight, if any
        self._batches: MicroBatches = []
        self._host: MicroBatches = []  # pinned sources of copies that may be in flight (CUDA)

    def prefetch(self, index: int) -> None:
        """Build the micro-batches of ``index`` now and start their way to the device."""
        self._batches = self._build(index)
        self._index = index

    def take(self, index: int) -> MicroBatches:
        """The ``grad_accum`` micro-batches (x, y) of ``index``, on the device: the prefetched
        ones when ``index`` is the one prefetched, else built now."""
        batches = self._batches if self._index == index else self._build(index)
        self.discard()
        return batches

    def discard(self) -> None:
        """Forget what was prefetched (after the trainer loads another state, for instance);
        the next ``take`` builds its batches."""
        self._index, self._batches = None, []

    def _build(self, index: int) -> MicroBatches:
        host = [self.make(index, micro) for micro in range(self.grad_accum)]
        if self.device.type != "cuda":
            return [(x.to(self.device), y.to(self.device)) for x, y in host]  # CPU: as built
        pinned = [(x.pin_memory(), y.pin_memory()) for x, y in host]
        self._host = pinned  # the sources of the copies below stay alive until replaced
        return [
            (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            for x, y in pinned
        ]
