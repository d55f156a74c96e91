"""The spike guard's decision on the device, and the update it masks: no host read per step.

:class:`gptexp.training.guard.SpikeGuard` stays the record (events, skip list, checkpoints) and
the authority; this is its mirror for the steps between two reads. It holds the guard's numbers
as device scalars and decides each update with tensor ops that repeat ``SpikeGuard.cause`` and
``judge`` operation for operation in float64 (the same EMA formula, the same order), so the host
and the device agree bit for bit. The trainer loads it from the host's guard when a window of
unread steps opens (:meth:`DeviceGuard.load`), and at the end of the window the host replays
the window's losses through ``SpikeGuard`` and checks that both decided alike.

What the device decides alone:

- ``off``: a non-finite update sets ``halted``; from then on every update is masked (nothing
  after it changes) until the host reads the window and stops the run at that update's step.
- ``skip``: a non-finite loss or gradient norm, a loss above ``atol``, or above ``rtol`` times
  the moving average once ``warmup`` losses are in it, masks the update; after ``max_skips``
  skips in a row the next rejection sets ``halted`` (the host's STOP).
- ``rollback``: the same tests as ``skip``; the host reads every step and rolls back itself.

The masked update (:func:`masked_step`) is fused AdamW's ``found_inf`` path, the one the
GradScaler uses: a rejected update leaves the parameters, the moments and the optimizer's step
count unchanged. MPS has no float64: the guard's scalars are float32 there (untested).
"""

from __future__ import annotations

import torch

from gptexp.core.config import GuardConfig
from gptexp.training.guard import ROLLBACK, SpikeGuard


def guard_dtype(device: torch.device) -> torch.dtype:
    """float64, as Python's floats in SpikeGuard; float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class DeviceGuard:
    """SpikeGuard's numbers as device scalars, and its decision as tensor ops."""

    def __init__(self, cfg: GuardConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.dtype = guard_dtype(device)

        def scalar(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        self.average = scalar(self.dtype)  # meaningful where has_average
        self.has_average = scalar(torch.bool)  # SpikeGuard.average is not None
        self.accepted = scalar(torch.int64)
        self.skips_in_a_row = scalar(torch.int64)
        self.halted = scalar(torch.bool)  # off / skip's STOP: every later update is masked
        self.epoch = scalar(torch.int64)  # the schedule's step: applied updates since load

    def load(self, guard: SpikeGuard, epoch: int) -> None:
        """Start from the host's record (fills: nothing is read back)."""
        self.average.fill_(0.0 if guard.average is None else guard.average)
        self.has_average.fill_(guard.average is not None)
        self.accepted.fill_(guard.accepted)
        self.skips_in_a_row.fill_(guard.skips_in_a_row)
        self.halted.fill_(False)
        self.epoch.fill_(epoch)

    def judge(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked, the norm the guard judged) for an update with this loss (the mean across
        ranks) and gradient norm, both 0-d tensors of ``self.dtype``. ``scaled`` (fp16): an
        overflowing gradient is the GradScaler's, so with a finite loss the guard sees norm 0.
        Advances the average, the counts and ``epoch`` as SpikeGuard.judge/record would."""
        cfg = self.cfg
        if scaled:
            grad_norm = torch.where(torch.isfinite(loss), torch.zeros_like(grad_norm), grad_norm)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        rejected = ~finite  # SpikeGuard.cause: NONFINITE
        if cfg.action != "off":
            if cfg.atol is not None:
                rejected = rejected | (loss > cfg.atol)  # ABSOLUTE
            relative = loss > cfg.rtol * self.average  # RELATIVE (rtol * average, in float64)
            rejected = rejected | (self.has_average & (self.accepted >= cfg.warmup) & relative)
        if cfg.action == "off":
            stops = rejected
        elif cfg.action == ROLLBACK:
            stops = torch.zeros_like(rejected)  # the host reads this step and acts itself
        else:  # skip: SpikeGuard.without_checkpoint
            stops = rejected & (self.skips_in_a_row >= cfg.max_skips)
        live = ~self.halted
        accept = live & ~rejected
        decay = cfg.ema_decay
        blended = decay * self.average + (1 - decay) * loss  # SpikeGuard._accept, same order
        self.average = torch.where(
            accept, torch.where(self.has_average, blended, loss), self.average
        )
        self.has_average = self.has_average | accept
        self.accepted = self.accepted + accept
        skipped = live & rejected & ~stops  # SpikeGuard.record counts a SKIP
        self.skips_in_a_row = torch.where(
            accept, torch.zeros_like(self.skips_in_a_row), self.skips_in_a_row + skipped
        )
        self.halted = self.halted | (live & stops)
        self.epoch = self.epoch + accept
        return ~accept, grad_norm

    def learning_rates(self, table: torch.Tensor) -> torch.Tensor:
        """Row ``epoch`` of ``table`` (groups x schedule steps): each group's lr for this
        update, read on the device (index_select: no host read)."""
        index = self.epoch.clamp(max=table.shape[1] - 1).reshape(1)
        return table.index_select(1, index).reshape(-1)


def masked_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    masked: torch.Tensor,
    lrs: torch.Tensor | None,
) -> None:
    """Step a fused ``optimizer`` unless ``masked`` (a 0-d bool on the device), with ``lrs``
    (one 0-d tensor per param group) in place of the groups' float lr when given. With fp16
    the GradScaler's own overflow masks too, and a guard rejection leaves its scale and growth
    tracker as they were (as ``update(new_scale=get_scale())`` did, without reading it)."""
    found_inf = masked.to(torch.float32)
    if scaler.is_enabled():
        # unscale_ has recorded the overflow per device (GradScaler.step would read it here).
        overflow = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        for value in overflow.values():
            found_inf = torch.maximum(found_inf, value.to(found_inf.device))
        kept = scaler._scale.clone(), scaler._growth_tracker.clone()
    floats = [group["lr"] for group in optimizer.param_groups]
    optimizer.grad_scale, optimizer.found_inf = None, found_inf  # fused AdamW reads these
    try:
        if lrs is not None:
            for group, lr in zip(optimizer.param_groups, lrs.unbind(), strict=True):
                group["lr"] = lr
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
        for group, lr in zip(optimizer.param_groups, floats, strict=True):
            group["lr"] = lr  # a float on disk, as ever
    if scaler.is_enabled():
        scaler.update()
        scaler._scale.copy_(torch.where(masked, kept[0], scaler._scale))
        scaler._growth_tracker.copy_(torch.where(masked, kept[1], scaler._growth_tracker))
