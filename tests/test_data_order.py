"""Data order 2: the global batch of a step is one draw that ranks and micro-batches slice, so
the data and the gradient of a step do not depend on how the batch is split over processes."""

from __future__ import annotations

import logging

import pytest
import torch

from gptexp.core.errors import ConfigError, DataError
from gptexp.data.batches import (
    DATA_ORDER_VERSION,
    global_batch_slice,
    resume_grad_accum,
    sample_batch,
    train_batch,
)
from gptexp.model.gpt import GPT
from gptexp.training.runtime import Distributed
from gptexp.training.trainer import Trainer
from tests.conftest import FAST, compose_config, make_trainer

TOKENS = torch.arange(5000) % 97
BLOCK, BATCH = 16, 3

# (world_size, grad_accum, batch_size): three splits of one global batch of 12 sequences.
SPLITS = {
    "2 ranks x accum 2": (2, 2, BATCH),
    "1 x accum 4": (1, 4, BATCH),
    "1 x 4x batch": (1, 1, 4 * BATCH),
}


def micro_batches(world: int, accum: int, batch: int, step: int = 7):
    """{rank: [(x, y) per micro-batch]} of one step under data order 2."""
    return {
        rank: [
            global_batch_slice(
                TOKENS,
                BLOCK,
                batch,
                seed=5,
                split="train",
                step=step,
                rank=rank,
                micro=micro,
                grad_accum=accum,
                world_size=world,
            )
            for micro in range(accum)
        ]
        for rank in range(world)
    }


def test_every_split_of_the_global_batch_sees_the_same_windows():
    seen = {}
    for name, split in SPLITS.items():
        parts = micro_batches(*split)
        seen[name] = torch.cat([x for rank in sorted(parts) for x, _ in parts[rank]])
    reference = seen.pop("1 x accum 4")
    assert reference.shape == (4 * BATCH, BLOCK)
    for name, x in seen.items():
        assert torch.equal(x, reference), name


def test_the_global_batch_depends_on_seed_and_step_only():
    (a, _), (b, _) = micro_batches(1, 1, 8)[0][0], micro_batches(1, 1, 8)[0][0]
    assert torch.equal(a, b)
    (other, _) = micro_batches(1, 1, 8, step=8)[0][0]
    assert not torch.equal(a, other)
    x, y = micro_batches(1, 1, 8)[0][0]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_a_slice_outside_the_split_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        global_batch_slice(
            TOKENS,
            BLOCK,
            BATCH,
            seed=0,
            split="train",
            step=0,
            rank=2,
            micro=0,
            grad_accum=1,
            world_size=2,
        )


def test_order_1_is_the_old_per_rank_sampling():
    coords = dict(seed=3, step=4, rank=1, micro=1)
    x, y = train_batch(1, TOKENS, BLOCK, BATCH, **coords, grad_accum=2, world_size=2)
    ox, oy = sample_batch(TOKENS, BLOCK, BATCH, split="train", **coords)
    assert torch.equal(x, ox) and torch.equal(y, oy)
    with pytest.raises(DataError, match="data order 3"):
        train_batch(3, TOKENS, BLOCK, BATCH, **coords, grad_accum=2, world_size=2)


def step_gradient(model: GPT, world: int, accum: int, batch: int) -> dict[str, torch.Tensor]:
    """The gradient of one update as DDP computes it: (loss / accum) summed over a rank's
    micro-batches, then averaged over the ranks (each rank simulated in turn here)."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for batches in micro_batches(world, accum, batch).values():
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            _, loss = model(x, y)
            (loss / accum).backward()
        for name, p in model.named_parameters():
            total[name] += p.grad / world
    return total


def test_gradients_agree_across_splits_of_the_global_batch():
    torch.manual_seed(0)
    cfg = compose_config(FAST).model
    model = GPT(cfg, vocab_size=97)
    grads = {name: step_gradient(model, *split) for name, split in SPLITS.items()}
    reference = grads.pop("1 x accum 4")
    for name, grad in grads.items():
        for key, value in reference.items():
            torch.testing.assert_close(grad[key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")
    assert any(value.abs().max() > 1e-3 for value in reference.values())  # a real gradient


@pytest.mark.parametrize(("world", "expected"), [(1, 4), (2, 2), (4, 1)])
def test_grad_accum_follows_the_world_size(world, expected):
    assert resume_grad_accum(4 * 8, 8, world) == expected


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_with_the_ones_that_can():
    with pytest.raises(ConfigError, match=r"3 processes.*world sizes that keep it: 1, 2, 4"):
        resume_grad_accum(4 * 8, 8, 3)
    with pytest.raises(ConfigError, match="training.batch_size=5"):
        resume_grad_accum(4 * 8, 5, 1)


# ----------------------------------------------------------------------------- in the trainer


def checkpoint_state(tmp_path, *overrides: str) -> dict:
    """The state a checkpoint would hold for a fresh run with these overrides."""
    cfg = compose_config([*FAST, *overrides])
    trainer = make_trainer(cfg, tmp_path / "written")
    return trainer.state_dict(None)


def resumed(tmp_path, state: dict, world: int = 1, *overrides: str) -> Trainer:
    cfg = compose_config([*FAST, *overrides])
    return make_trainer(cfg, tmp_path / "resumed", Distributed(world_size=world), state)


def test_a_new_checkpoint_records_the_data_order(tmp_path):
    assert checkpoint_state(tmp_path)["data_order"] == DATA_ORDER_VERSION == 2


def test_resuming_on_fewer_processes_raises_grad_accum(tmp_path, caplog):
    state = checkpoint_state(tmp_path, "training.grad_accum=1")
    state["world_size"] = 4  # written by 4 ranks x accum 1
    with caplog.at_level(logging.INFO, logger="gptexp.training.parallel"):
        trainer = resumed(tmp_path, state, 1, "training.grad_accum=1")
    assert trainer.cfg.training.grad_accum == 4 and trainer.state.data_order == 2
    assert "training.grad_accum 1 -> 4" in caplog.text


def test_resuming_on_a_world_size_that_cannot_keep_the_batch_is_refused(tmp_path):
    state = checkpoint_state(tmp_path, "training.grad_accum=2")  # 1 rank x accum 2
    with pytest.raises(ConfigError, match="world sizes that keep it: 1, 2"):
        resumed(tmp_path, state, 3, "training.grad_accum=2")


def test_a_checkpoint_from_before_data_order_2_keeps_the_old_order(tmp_path, caplog):
    state = checkpoint_state(tmp_path, "training.grad_accum=1")
    del state["data_order"]  # as every checkpoint written before the change
    state["world_size"] = 2
    trainer = resumed(tmp_path, state, 1, "training.grad_accum=1")
    assert trainer.state.data_order == 1 and trainer.cfg.training.grad_accum == 1
    assert trainer.state_dict(None)["data_order"] == 1  # and its next checkpoint says so
    assert "no longer bit-identical" in caplog.text
