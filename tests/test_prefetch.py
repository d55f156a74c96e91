"""The prefetched micro-batches of a step are the batch function's, for the index asked for."""

from __future__ import annotations

import functools

import pytest
import torch

from gptexp.data.batches import train_batch
from gptexp.data.prefetch import Prefetcher
from tests.conftest import FAST, compose_config, make_trainer

TOKENS = torch.arange(5000, dtype=torch.long) % 97
BLOCK, BATCH, SEED = 16, 4, 1337


def make_batch(order: int, grad_accum: int, index: int, micro: int):
    return train_batch(
        order, TOKENS, BLOCK, BATCH, seed=SEED, step=index, rank=0, micro=micro,
        grad_accum=grad_accum, world_size=1,
    )  # fmt: skip


def assert_batches_of(batches, order: int, grad_accum: int, index: int) -> None:
    assert len(batches) == grad_accum
    for micro, (x, y) in enumerate(batches):
        want_x, want_y = make_batch(order, grad_accum, index, micro)
        assert torch.equal(x, want_x) and torch.equal(y, want_y), (index, micro)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_prefetched_batches_are_the_batch_functions(order, grad_accum):
    make = functools.partial(make_batch, order, grad_accum)
    prefetcher = Prefetcher(make, grad_accum, torch.device("cpu"))
    for index in range(4):
        prefetcher.prefetch(index)
        assert_batches_of(prefetcher.take(index), order, grad_accum, index)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_mismatched_index_is_built_now_never_the_prefetched_one(grad_accum):
    built: list[tuple[int, int]] = []

    def make(index: int, micro: int):
        built.append((index, micro))
        return make_batch(2, grad_accum, index, micro)

    prefetcher = Prefetcher(make, grad_accum, torch.device("cpu"))
    micros = list(range(grad_accum))
    prefetcher.prefetch(7)  # the step after 6; then a rollback sends the run back to 3
    assert_batches_of(prefetcher.take(3), 2, grad_accum, 3)
    assert built == [(7, m) for m in micros] + [(3, m) for m in micros]
    built.clear()
    assert_batches_of(prefetcher.take(7), 2, grad_accum, 7)  # the prefetch was dropped
    assert built == [(7, m) for m in micros]
    built.clear()
    assert_batches_of(prefetcher.take(8), 2, grad_accum, 8)  # nothing prefetched: built now
    prefetcher.prefetch(9)
    prefetcher.discard()  # another state was loaded
    assert_batches_of(prefetcher.take(9), 2, grad_accum, 9)
    assert built == [(8, m) for m in micros] + [(9, m) for m in micros] * 2


def test_on_a_cpu_the_batches_are_the_built_tensors_without_a_copy():
    made = []

    def make(index: int, micro: int):
        made.append(make_batch(2, 2, index, micro))
        return made[-1]

    prefetcher = Prefetcher(make, 2, torch.device("cpu"))
    prefetcher.prefetch(0)
    taken = prefetcher.take(0)
    assert all(x is mx and y is my for (x, y), (mx, my) in zip(taken, made, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, non-blocking path is CUDA's")
def test_on_cuda_the_batches_arrive_on_the_device_unchanged():
    device = torch.device("cuda")
    prefetcher = Prefetcher(functools.partial(make_batch, 2, 2), 2, device)
    for index in range(3):
        prefetcher.prefetch(index)
        taken = prefetcher.take(index)
        assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in taken)
        assert_batches_of([(x.cpu(), y.cpu()) for x, y in taken], 2, 2, index)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_trainer_takes_every_batch_it_prefetched(tmp_path, monkeypatch, grad_accum):
    """Each update after the first trains on the batches prefetched during the one before;
    a rollback-free run builds each batch once (plus the one after the last update)."""
    built: list[int] = []
    build = Prefetcher._build

    def counting_build(self, index):
        built.append(index)
        return build(self, index)

    monkeypatch.setattr(Prefetcher, "_build", counting_build)
    cfg = compose_config([*FAST, f"training.grad_accum={grad_accum}"])
    (tmp_path / "run").mkdir()
    trainer = make_trainer(cfg, tmp_path / "run")
    trainer.fit()
    steps = cfg.training.max_steps
    assert trainer.state.step == steps
    assert built == list(range(steps + 1))
