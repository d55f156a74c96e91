"""The exponential moving average (EMA) of a run's weights (``training.ema_decay``).

An fp32 copy of every parameter, updated after every applied optimizer update:
``ema = decay * ema + (1 - decay) * weights``. It is exact state: the checkpoint holds it
(key ``ema``: parameter name -> fp32 tensor; None when the run keeps no average), a resume
continues it bit for bit, and a rollback of the spike guard restores it with the weights.
With FSDP each rank averages its own shards of the parameters (the average is sharded like the
weights); a single-file checkpoint holds whole tensors, a DCP one each rank's shards.

The average is evaluated by swapping it into the model and the weights back afterwards, bit
for bit (``val/loss_ema`` at each evaluation); ``eval``, ``export`` and ``fork`` take
``weights=ema`` to use it instead of the weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from gptexp.checkpoint.format import average_layout, check_average

log = logging.getLogger(__name__)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values on this rank: a DTensor's shard (a view), a plain tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor: a DTensor gathered (every rank must call), a plain tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def assign(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor (every rank holds it) into ``target``, a parameter or an average:
    a DTensor keeps the slice of its own shard."""
    with torch.no_grad():
        if hasattr(target, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            mine = distribute_tensor(
                whole.to(_local(target).device), target.device_mesh, target.placements
            )
            _local(target).copy_(mine.to_local())
        else:
            target.copy_(whole)


def regather(model: torch.nn.Module) -> None:
    """After weights were written into their shards in place: make the next forward see them.
    FSDP2 keeps the root module's gathered weights after a forward (the root does not reshard
    after it, its weights being wanted by the backward next), so a forward after a swap would
    run the embeddings and the last norm with the values gathered before it. Resharding every
    FSDP module drops what was gathered; a plain model has nothing to drop."""
    for module in model.modules():
        if callable(getattr(module, "reshard", None)) and callable(
            getattr(module, "unshard", None)
        ):
            module.reshard()


def copy_average_into(model: torch.nn.Module, average: Any) -> None:
    """Load a checkpoint's average (checked against the model) into the model's weights, sharded
    or not: a fork's ``weights=ema`` (eval and export rebuild their model in
    gptexp.checkpoint.stored)."""
    average = check_average(average, average_layout(model))
    for name, param in model.named_parameters():
        assign(param, average[name].to(param.dtype))
    regather(model)


class WeightAverage:
    """The EMA of ``model``'s parameters (build it after the model is sharded)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [param for _, param in model.named_parameters()]
        with torch.no_grad():
            self.average = [p.detach().to(torch.float32, copy=True) for p in self.params]

    def _locals(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(this rank's averages, this rank's weights in fp32): the values it updates."""
        weights = [_local(p.detach()) for p in self.params]
        weights = [w if w.dtype == torch.float32 else w.float() for w in weights]
        return [_local(a) for a in self.average], weights

    @torch.no_grad()
    def update(self, applied: torch.Tensor) -> None:
        """One step of the average, after an optimizer update. ``applied``: a 0-d tensor on the
        device, true where the spike guard let the update through and false where it masked it
        (gptexp.training.device_guard): the step is masked on the device, nothing is read back,
        and a masked step leaves every average bit-unchanged (it adds exactly 0).

        ``ema += w * (weights - ema)`` with ``w = applied * (1 - decay)``, as three foreach
        ops: a foreach lerp takes a device-side weight only per element (a slow per-tensor path
        on CUDA), a multiply by a 0-d tensor is one fused kernel."""
        averages, weights = self._locals()
        if not averages:
            return
        weight = applied.to(device=averages[0].device, dtype=torch.float32) * (1.0 - self.decay)
        steps = torch._foreach_sub(weights, averages)
        torch._foreach_mul_(steps, weight)
        torch._foreach_add_(averages, steps)

    def load_from_weights(self) -> None:
        """Start the average again from the weights (a checkpoint without one)."""
        with torch.no_grad():
            averages, weights = self._locals()
            torch._foreach_copy_(averages, weights)

    # ------------------------------------------------------------------------- checkpoint

    def state_dict(self, *, full: bool, is_main: bool) -> dict[str, torch.Tensor]:
        """The checkpoint's ``ema``: whole tensors for the single-file format (gathered from
        the shards: every rank must call; rank 0 gets them), or this rank's own
        values for DCP (each rank writes its shards)."""
        if not full:
            return dict(self.entries())
        whole = {name: _full(average) for name, average in self.entries()}
        return whole if is_main else {}

    def load_state_dict(self, state: Any) -> None:
        """A checkpoint's ``ema`` (whole tensors), checked like the weights: the same names,
        shapes and dtype, else a CheckpointError."""
        checked = check_average(state, {n: (tuple(a.shape), a.dtype) for n, a in self.entries()})
        for name, average in self.entries():
            assign(average, checked[name])

    def entries(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.names, self.average, strict=True)

    # ------------------------------------------------------------------------- evaluation

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again, bit for bit,
        after it (also when the block raises)."""
        with torch.no_grad():
            averages, _ = self._locals()
            weights = [_local(p.detach()) for p in self.params]
            kept = [w.clone() for w in weights]
            torch._foreach_copy_(weights, averages)
        regather(self.model)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(weights, kept)
            regather(self.model)  # the next forward (a sample, a step) runs the weights
