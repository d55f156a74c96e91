"""The trainer's side of the spike guard: the guard (gptexp.training.guard) judges each update;
here its decision is carried out (skip the batch, roll back to the newest valid checkpoint, or
stop the run) and its events are reported."""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from gptexp.checkpoint.format import CheckpointEntry
from gptexp.core.errors import TrainingDiverged
from gptexp.observe.metrics import (
    EVENT,
    SPIKE_EVENT,
    STEP,
)
from gptexp.training.guard import APPLY, NONFINITE, ROLLBACK, SKIP, stop_message

log = logging.getLogger(__name__)


class SpikeResponse:
    """What the Trainer does when its guard refuses an update. A base of
    :class:`gptexp.training.trainer.Trainer`: it uses the trainer's state, optimizer, scaler,
    checkpoints, distributed context, sinks and run directory."""

    def _guard_admits(self, loss: float, norm: float, grad_norm: float, masked: bool) -> bool:
        """Whether the update with this loss (the mean across ranks), guard norm and gradient
        norm is applied, by the host's guard, replaying what the device decided (``masked``:
        gptexp.training.device_guard; the optimizer never saw a masked update). When not, the
        guard's action is carried out: skip the batch, roll back to the newest valid
        checkpoint, or stop the run (TrainingDiverged)."""
        # Every rank decides alike: the loss is the mean, the gradient norm the all-reduced one.
        action, cause = self.state.guard.judge(loss, norm)
        if (action != APPLY) != masked:
            raise RuntimeError(
                f"the spike guard on the device and on the host disagree at step "
                f"{self.state.step + 1} (loss {loss!r}, norm {norm!r}): please report this"
            )
        if action == APPLY:
            return True
        target = self._rollback_target() if action == ROLLBACK else None
        if action == ROLLBACK and target is None:
            action = self.state.guard.without_checkpoint()  # nothing to roll back to: skip
        event = {
            "step": self.state.step + 1,
            "batch": self.state.data_step,
            "loss": loss,
            "average": self.state.guard.average,
            "grad_norm": grad_norm,
            "cause": cause,
            "action": action,
        }
        if action == SKIP:
            self.state.guard.skip_batches(self.state.data_step, self.state.data_step)
            self.state.data_step += 1
            self._guard_event(self.state.guard.record(event))
        elif action == ROLLBACK:
            self._roll_back(event, *target)
        else:
            event = self.state.guard.record(event)
            self._guard_event(event)
            raise TrainingDiverged(
                stop_message(self.state.guard, event, self._last_checkpoint_step())
            )
        return False

    def _rollback_target(self) -> tuple[CheckpointEntry, dict[str, Any]] | None:
        """(entry, state) of the newest valid checkpoint, or None (none written yet)."""
        self.checkpoints.wait()
        if self.dist.enabled:
            dist.barrier()  # rank 0's last save is durable before any rank reads the manifest
        return self.checkpoints.load_latest_valid()

    def _roll_back(
        self, event: dict[str, Any], entry: CheckpointEntry, state: dict[str, Any]
    ) -> None:
        """Load the checkpoint's state (the guard's own state carries on) and put the batches
        from there to the spike, and ``skip_after`` more, on the skip list."""
        spike_batch = self.state.data_step
        guard = self.state.guard
        self.load_state(state)
        self.state.guard = guard
        self.state.guard.skip_batches(
            self.state.data_step, spike_batch + self.cfg.training.guard.skip_after
        )
        event = self.state.guard.record(event | {"to_step": self.state.step})
        log.warning(
            "spike at step %d: rolled back to checkpoint %s; batches %d..%d are skipped",
            event["step"],
            entry.file,
            self.state.data_step,
            spike_batch + self.cfg.training.guard.skip_after,
        )
        if self.dist.is_main:
            # The steps after the checkpoint will be logged again: metrics.jsonl and TensorBoard
            # drop them (they can rewind); W&B keeps its first values.
            for sink in self.sinks:
                if callable(getattr(sink, "rewind", None)):
                    sink.rewind(self.state.step, len(self.state.guard.events))
        self._guard_event(event)

    def _guard_event(self, event: dict[str, Any]) -> None:
        """An event as a metrics.jsonl record (W&B raises an alert for it) and in run.json."""
        if event["action"] == SKIP:
            log.warning(
                "%s at step %d (train/loss %s, average %s): update skipped, batch %d dropped",
                "non-finite update" if event["cause"] == NONFINITE else "loss spike",
                event["step"],
                event["loss"],
                event["average"],
                event["batch"],
            )
        self._log({STEP: event["step"], EVENT: SPIKE_EVENT, **event})
        if self.dist.is_main:
            self.run.update_status(guard=self.state.guard.report())

    def _last_checkpoint_step(self) -> int | None:
        self.checkpoints.wait()
        entries = self.checkpoints.entries()
        return entries[-1].step if entries else None
