"""TrainState: what a checkpoint stores beside its tensors, read back exactly, and a hostile
value refused by name (a CheckpointError: exit 2, one line)."""

from __future__ import annotations

import pytest

from gptexp.core.config import GuardConfig
from gptexp.core.errors import CheckpointError
from gptexp.training.guard import SKIP
from gptexp.training.state import STATE_KEYS, TrainState


def a_state() -> TrainState:
    state = TrainState.fresh(GuardConfig())
    state.guard.skip_batches(7, 9)
    state.guard.record({"step": 8, "action": SKIP, "loss": 9.5})
    state.step, state.tokens_seen, state.data_step, state.best_metric = 20, 5120, 23, 2.5
    return state


def test_to_dict_from_dict_round_trip():
    state = a_state()
    stored = state.to_dict()
    assert tuple(stored) == STATE_KEYS
    back = TrainState.from_dict(stored, GuardConfig())
    assert back.to_dict() == stored
    assert back.from_checkpoint and not state.from_checkpoint
    assert back.guard.next_batch(7) == 10  # the skip list works, not only compares


def test_checkpoints_older_than_a_key_read_as_they_always_did():
    stored = {"step": 12, "tokens_seen": 96, "best_metric": None, "wandb_id": "abc"}
    state = TrainState.from_dict(stored, GuardConfig())
    assert (state.data_order, state.data_step, state.guard.events) == (1, 12, [])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("step", "20"),
        ("step", -1),
        ("step", True),
        ("step", 20.0),
        ("tokens_seen", None),
        ("data_step", 3),  # behind step 20: batches would be trained twice
        ("best_metric", "low"),
        ("best_metric", float("nan")),
        ("wandb_id", 5),
        ("wandb_id", ""),
        ("data_order", 99),
        ("guard", "none"),
        ("guard", {"average": None}),
        ("guard", {**a_state().guard.state_dict(), "skipped": [["a", "b"]]}),
        ("guard", {**a_state().guard.state_dict(), "events": ["x"]}),
        ("guard", {**a_state().guard.state_dict(), "average": "1.0"}),
    ],
)
def test_a_hostile_value_is_refused_by_name(key, value):
    stored = a_state().to_dict() | {key: value}
    with pytest.raises(CheckpointError, match=f"checkpoint {key}"):
        TrainState.from_dict(stored, GuardConfig())


def test_a_missing_key_is_refused():
    stored = a_state().to_dict()
    del stored["wandb_id"]
    with pytest.raises(CheckpointError, match="wandb_id"):
        TrainState.from_dict(stored, GuardConfig())
    with pytest.raises(CheckpointError):
        TrainState.from_dict(["not", "a", "dict"], GuardConfig())  # type: ignore[arg-type]
