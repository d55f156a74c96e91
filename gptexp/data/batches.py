"""Batches: the batch of a step as a pure function of its coordinates, and the data order.

Sampling holds no state: the batch for (seed, split, step, rank, micro-step) is a pure
function of those numbers, so a resumed run draws exactly the batches the uninterrupted run
would have drawn, and nothing about the data needs to be checkpointed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from gptexp.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = {"train": 0, "val": 1}


def sample_batch(
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    *,
    seed: int,
    split: str,
    step: int,
    rank: int = 0,
    micro: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch (x, y), each (B, T), for these coordinates: a pure function of them."""
    rng = np.random.default_rng([seed, SPLITS[split], step, rank, micro])
    starts = torch.from_numpy(rng.integers(0, len(tokens) - block_size, size=batch_size))
    windows = tokens.unfold(0, block_size + 1, 1)[starts]  # (B, T+1) views, then gathered
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


# ----------------------------------------------------------------------------- data order

# How a training step's batches are drawn; stored in every checkpoint as ``data_order``.
#   1: each (rank, micro-batch) draws its own batch (``sample_batch``): the data depends on the
#      world size. Checkpoints without ``data_order`` are of this order and keep it on resume.
#   2: the global batch of a step is drawn once from (seed, step) and every (rank, micro-batch)
#      takes a slice of it (``global_batch_slice``): the data does not depend on how the global
#      batch is split over processes and micro-batches.
DATA_ORDER_VERSION = 2
DATA_ORDERS = (1, 2)


def global_batch_starts(
    n_tokens: int, block_size: int, global_batch: int, *, seed: int, split: str, step: int
) -> np.ndarray:
    """Start offsets, (global_batch,) int64, of the windows of the global batch of ``step``.

    A pure function of its arguments: every process computes the same array and takes its slice.
    The leading version number keeps these streams apart from order 1's.
    """
    rng = np.random.default_rng([2, seed, SPLITS[split], step])
    return rng.integers(0, n_tokens - block_size, size=global_batch)


def global_batch_slice(
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    *,
    seed: int,
    split: str,
    step: int,
    rank: int,
    micro: int,
    grad_accum: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y), each (B, T), of micro-batch ``micro`` of ``rank`` in step ``step``.

    The global batch has ``batch_size * grad_accum * world_size`` windows; rank r's micro-batch
    m is the (r * grad_accum + m)-th run of ``batch_size`` of them. 2 ranks x 2 micro-batches,
    1 rank x 4 and 1 rank x 1 micro-batch of 4 x batch_size thus see the same windows.
    """
    if not (0 <= rank < world_size and 0 <= micro < grad_accum):
        raise ValueError(f"rank {rank} / micro {micro} outside {world_size} x {grad_accum}")
    starts = global_batch_starts(
        len(tokens),
        block_size,
        batch_size * grad_accum * world_size,
        seed=seed,
        split=split,
        step=step,
    )
    first = (rank * grad_accum + micro) * batch_size
    mine = torch.from_numpy(starts[first : first + batch_size])
    windows = tokens.unfold(0, block_size + 1, 1)[mine]  # (B, T+1) views, then gathered
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def train_batch(
    order: int,
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    *,
    seed: int,
    step: int,
    rank: int,
    micro: int,
    grad_accum: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of ``rank`` for training step ``step`` under data order ``order``."""
    if order == 1:
        return sample_batch(
            tokens,
            block_size,
            batch_size,
            seed=seed,
            split="train",
            step=step,
            rank=rank,
            micro=micro,
        )
    if order == 2:
        return global_batch_slice(
            tokens,
            block_size,
            batch_size,
            seed=seed,
            split="train",
            step=step,
            rank=rank,
            micro=micro,
            grad_accum=grad_accum,
            world_size=world_size,
        )
    raise DataError(
        f"data order {order} is unknown to this gptexp (it reads {DATA_ORDERS}); upgrade gptexp"
    )


def resume_grad_accum(global_batch: int, batch_size: int, world_size: int) -> int:
    """The ``grad_accum`` that keeps ``global_batch`` sequences per step on ``world_size``
    processes of ``batch_size`` each; ConfigError (listing the world sizes that work) if none.
    """
    per_rank, rest = divmod(global_batch, batch_size * world_size)
    if rest == 0 and per_rank >= 1:
        return per_rank
    if global_batch % batch_size:
        raise ConfigError(
            f"training.batch_size={batch_size} does not divide the run's global batch of "
            f"{global_batch} sequences; resume with a batch size that does"
        )
    micro_batches = global_batch // batch_size
    working = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
    raise ConfigError(
        f"cannot resume on {world_size} processes: the run's global batch of {global_batch} "
        f"sequences (training.batch_size={batch_size} x grad_accum x processes) does not split "
        f"over them; world sizes that keep it: {', '.join(map(str, working))}"
    )
