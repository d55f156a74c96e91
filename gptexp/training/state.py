"""A run's training state beside its tensors: where it is (step, tokens, the next batch), what
it has seen (the best metric, the spike guard's record), who it is (the W&B id) and which
batch order it trains in.

:class:`TrainState` is the one object the Trainer keeps them in, the checkpoint stores
(:meth:`TrainState.to_dict` gives its keys, unchanged since before this class existed), a
resume and the diff replay load (:meth:`TrainState.from_dict`) and a fork derives its own
from (gptexp.run.forking). A checkpoint is input someone else may have written (README, "What a
run directory may contain"): ``from_dict`` checks every value's type and range, and a bad one
is a CheckpointError naming the key, never a wrong number carried into training.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from gptexp.core.config import GuardConfig
from gptexp.core.errors import CheckpointError
from gptexp.data.batches import DATA_ORDER_VERSION
from gptexp.training.guard import SpikeGuard

# The checkpoint keys this state is stored under (the rest of a checkpoint is tensors and the
# record of what wrote it: gptexp.checkpoint.manager.CHECKPOINT_KEYS).
STATE_KEYS = (
    "step",
    "tokens_seen",
    "best_metric",
    "wandb_id",
    "data_order",
    "data_step",
    "guard",
)


def new_wandb_id() -> str:
    """The id of a new W&B run (a fresh run's, a fork's)."""
    return uuid.uuid4().hex[:12]


@dataclass
class TrainState:
    """Everything a run carries on from, beside the model, optimizer, schedule, scaler and RNG.

    ``step`` counts completed updates, ``data_step`` is the index of the next batch (ahead of
    ``step`` by the batches the guard skipped). ``from_checkpoint``: the state was loaded from
    a checkpoint, whose step 0 (an imported model's baseline) was evaluated when it was made;
    it is not stored."""

    guard: SpikeGuard
    step: int = 0
    tokens_seen: int = 0
    data_step: int = 0
    best_metric: float | None = None
    wandb_id: str = field(default_factory=new_wandb_id)
    data_order: int = DATA_ORDER_VERSION
    from_checkpoint: bool = False

    @classmethod
    def fresh(cls, guard: GuardConfig) -> TrainState:
        """A run's state before its first update."""
        return cls(guard=SpikeGuard(guard))

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's entries of this state (plain data, weights_only-safe)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_metric": self.best_metric,
            "wandb_id": self.wandb_id,
            "data_order": self.data_order,
            "data_step": self.data_step,
            "guard": self.guard.state_dict(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], guard: GuardConfig) -> TrainState:
        """The state a checkpoint stores, checked. Checkpoints written before a key existed
        read as they always did: no ``data_order`` is order 1, no ``data_step`` is ``step``
        (no batch skipped), no ``guard`` is a guard that has seen nothing."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"checkpoint state: a dict expected, found {type(raw).__name__}")
        step = _count(raw, "step")
        state = cls(
            guard=_guard(raw.get("guard"), guard),
            step=step,
            tokens_seen=_count(raw, "tokens_seen"),
            data_step=_count(raw, "data_step", default=step),
            best_metric=_metric(raw.get("best_metric")),
            wandb_id=_text(raw, "wandb_id"),
            data_order=_count(raw, "data_order", default=1),
            from_checkpoint=True,
        )
        if not 1 <= state.data_order <= DATA_ORDER_VERSION:
            raise CheckpointError(
                f"checkpoint data_order={state.data_order}: this gptexp knows orders 1 to "
                f"{DATA_ORDER_VERSION} (a checkpoint of a newer version?)"
            )
        if state.data_step < state.step:
            raise CheckpointError(
                f"checkpoint data_step={state.data_step} is behind its step {state.step}"
            )
        return state


def _damaged(key: str, value: Any, wanted: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {key}={value!r:.60}: {wanted} expected")


def _count(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if type(value) is not int or value < 0:  # (bool is an int, and no count)
        raise _damaged(key, value, "a count (an integer >= 0)")
    return value


def _text(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise _damaged(key, value, "a non-empty string")
    return value


def _metric(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _damaged("best_metric", value, "a finite number or None")
    return value


def _guard(value: Any, cfg: GuardConfig) -> SpikeGuard:
    guard = SpikeGuard(cfg)
    if value is None:
        return guard
    try:
        if not isinstance(value, dict) or not all(isinstance(e, dict) for e in value["events"]):
            raise TypeError("not the guard's state")
        if value["average"] is not None and type(value["average"]) not in (int, float):
            raise TypeError("average is not a number")
        guard.load_state_dict(value)
    except (KeyError, TypeError, ValueError) as error:
        raise _damaged("guard", value, f"the spike guard's state ({error})") from None
    return guard
