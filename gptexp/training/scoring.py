"""Scoring and sampling a model: the validation loss over fixed batches, and generated text.

The trainer's ``val/loss``, ``python -m gptexp.eval`` and the benchmark all score with
:func:`evaluate_loss`, so the same checkpoint gives the same number in each.
"""

from __future__ import annotations

import logging

import torch

from gptexp.data.batches import sample_batch
from gptexp.model.gpt import GPT
from gptexp.training.runtime import autocast_context

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    block_size: int,
    batch_size: int,
    seed: int,
    split: str,
    batches: int,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """Mean loss of ``model`` over the fixed evaluation batches 0..batches-1 of ``split``.

    The batch losses stay on the device and are read back once, at the end (the device is
    not waited for after every batch); their sum is Python's, in batch order, as it was."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(batches):
        x, y = sample_batch(tokens, block_size, batch_size, seed=seed, split=split, step=i)
        with autocast_context(device, precision):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.float())
    model.train(was_training)
    values = torch.stack(losses).tolist()  # the one read
    return sum(values) / len(values)


@torch.no_grad()
def generate_text(
    model: GPT,
    prompt_ids: list[int],
    count: int,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
) -> list[list[int]]:
    """``count`` continuations of ``prompt_ids`` from one seeded generator (the training RNG
    is untouched): the same seed gives the same tokens. Returns the new tokens only."""
    generator = torch.Generator(device=device).manual_seed(seed)
    start = torch.tensor([prompt_ids] * count, dtype=torch.long, device=device)  # (N, T0)
    was_training = model.training
    model.eval()
    with autocast_context(device, precision):
        ids = model.generate(
            start, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator
        )
    model.train(was_training)
    return [row[len(prompt_ids) :].tolist() for row in ids]


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- the model
