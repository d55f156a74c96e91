"""The loss-spike guard's decisions: which updates are spikes, what to do about them, and which
batches are never used again.

The trainer asks :meth:`SpikeGuard.judge` about every update between the backward pass and the
optimizer step, and carries out the action it gets back (apply, skip, roll back, stop). Every
decision depends only on the losses and gradient norms seen so far and on the guard's own
state, which is plain data (numbers, lists, dicts) in every checkpoint: a resumed run makes the
same decisions as one that was never interrupted. No torch here.

Batches are named by their *index*: the batch of index i is a pure function of (seed, i)
(:func:`gptexp.data.batches.sample_batch`). Without skips the update of step s+1 trains on
batch s; a skipped batch index is never used again, so later updates take the following indices.
"""

from __future__ import annotations

import math
from typing import Any

from gptexp.core.config import GuardConfig

APPLY = "apply"
SKIP = "skip"
ROLLBACK = "rollback"
STOP = "stop"

NONFINITE = "nonfinite"  # the loss or the gradient norm is NaN or infinite
RELATIVE = "rtol"  # the loss is above rtol x the moving average
ABSOLUTE = "atol"  # the loss is above atol


class SpikeGuard:
    """Moving average of the accepted losses, the skip list, and the record of every event."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.average: float | None = None  # exponential moving average of accepted losses
        self.accepted = 0  # losses folded into the average
        self.skipped: list[list[int]] = []  # [first, last] batch ranges, sorted and disjoint
        self.events: list[dict[str, Any]] = []
        self.rollbacks = 0
        self.skips_in_a_row = 0

    # -- which batches

    def next_batch(self, index: int) -> int:
        """The first batch index at or after ``index`` that is not on the skip list."""
        for first, last in self.skipped:  # sorted and disjoint: one pass suffices
            if first <= index <= last:
                index = last + 1
        return index

    def skip_batches(self, first: int, last: int) -> None:
        """Put batches ``first..last`` (inclusive) on the skip list."""
        ranges = sorted([*self.skipped, [first, last]])
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.skipped = merged

    # -- decisions

    def cause(self, loss: float, grad_norm: float) -> str | None:
        """Why this update must not be applied as it is, or None when it may."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return NONFINITE
        if self.cfg.action == "off":
            return None
        if self.cfg.atol is not None and loss > self.cfg.atol:
            return ABSOLUTE
        if (
            self.average is not None
            and self.accepted >= self.cfg.warmup
            and loss > self.cfg.rtol * self.average
        ):
            return RELATIVE
        return None

    def judge(self, loss: float, grad_norm: float) -> tuple[str, str | None]:
        """(action, cause) for an update with this loss and gradient norm. An applied update's
        loss joins the moving average; a rejected one's never does."""
        cause = self.cause(loss, grad_norm)
        if cause is None:
            self._accept(loss)
            return APPLY, None
        if self.cfg.action == "off":
            return STOP, cause
        if self.cfg.action == ROLLBACK:
            return (STOP if self.rollbacks >= self.cfg.max_rollbacks else ROLLBACK), cause
        return self.without_checkpoint(), cause

    def without_checkpoint(self) -> str:
        """The action for a rejected update that cannot roll back (no checkpoint to go to, or
        action=skip): skip it, unless too many updates in a row were skipped already."""
        return STOP if self.skips_in_a_row >= self.cfg.max_skips else SKIP

    def _accept(self, loss: float) -> None:
        decay = self.cfg.ema_decay
        self.average = loss if self.average is None else decay * self.average + (1 - decay) * loss
        self.accepted += 1
        self.skips_in_a_row = 0

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number ``event``, keep it, and count what it did; returns it."""
        event = {"n": len(self.events) + 1, **event}
        self.events.append(event)
        if event["action"] == SKIP:
            self.skips_in_a_row += 1
        elif event["action"] == ROLLBACK:
            self.rollbacks += 1
        return event

    # -- the record

    def report(self) -> dict[str, Any]:
        """What run.json shows: the settings' action, the counts, the skip list, every event."""
        return {
            "action": self.cfg.action,
            "rollbacks": self.rollbacks,
            "skipped_batches": [list(r) for r in self.skipped],
            # JSON has no NaN: a non-finite loss shows as null, as in metrics.jsonl.
            "events": [{k: _finite_or_none(v) for k, v in e.items()} for e in self.events],
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data (weights_only-safe): everything the next decision depends on."""
        return {
            "average": self.average,
            "accepted": self.accepted,
            "skipped": [list(r) for r in self.skipped],
            "events": [dict(e) for e in self.events],
            "rollbacks": self.rollbacks,
            "skips_in_a_row": self.skips_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = state["average"]
        self.accepted = int(state["accepted"])
        self.skipped = [[int(a), int(b)] for a, b in state["skipped"]]
        self.events = [dict(e) for e in state["events"]]
        self.rollbacks = int(state["rollbacks"])
        self.skips_in_a_row = int(state["skips_in_a_row"])


def stop_message(guard: SpikeGuard, event: dict[str, Any], last_checkpoint: int | None) -> str:
    """Why the run stops at ``event``, naming the steps, and what is left to resume from."""
    cfg = guard.cfg
    if event["cause"] == NONFINITE:
        what = f"NaN or inf: train/loss {event['loss']}, grad_norm {event['grad_norm']}"
    else:
        average = "none yet" if event["average"] is None else f"{event['average']:.4g}"
        bound = f"training.guard.atol={cfg.atol}" if event["cause"] == ABSOLUTE else "rtol"
        what = f"loss spike ({bound}): train/loss {event['loss']:.4g}, moving average {average}"
    earlier = [e for e in guard.events if e["n"] < event["n"]]
    if cfg.action == "off":
        why = "training.guard.action=off (skip or rollback would drop such updates)"
    elif cfg.action == ROLLBACK and guard.rollbacks >= cfg.max_rollbacks:
        rolled = [e for e in earlier if e["action"] == ROLLBACK]
        steps = ", ".join(f"{e['step']}->{e['to_step']}" for e in rolled)
        why = (
            f"training.guard.max_rollbacks={cfg.max_rollbacks} rollbacks are spent "
            f"(spike step -> checkpoint step: {steps})"
        )
    else:
        steps = ", ".join(str(e["step"]) for e in earlier[-guard.skips_in_a_row :])
        why = (
            f"training.guard.max_skips={cfg.max_skips} updates in a row were skipped already "
            f"(steps {steps})"
        )
    kept = (
        f"the last valid checkpoint is step {last_checkpoint}"
        if last_checkpoint is not None
        else "no checkpoint was written"
    )
    return (
        f"{what} at step {event['step']} (batch {event['batch']}); the update was not applied "
        f"and training stops: {why}; {kept}"
    )


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
