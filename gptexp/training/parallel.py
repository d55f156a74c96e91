"""How the processes of a torchrun share the model, and its state as a checkpoint holds it.

``training.parallel=ddp`` keeps a whole replica on every rank (the trainer wraps it in
DistributedDataParallel). ``training.parallel=fsdp`` shards parameters, gradients and optimizer
state across the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``): each Block is
one unit, gathered just before it runs and freed after, and the root holds the rest
(embeddings, final norm). On one process there is nothing to shard and the model stays whole.

The state of a sharded model is read and written through
``torch.distributed.checkpoint.state_dict``; its optimizer state is keyed by parameter name
("named" layout) rather than by position, which is what lets a checkpoint move between world
sizes. Checkpoints of ``parallel=ddp`` runs in the single-file format keep the plain layout of
``optimizer.state_dict()``.

A run resumed on another world size keeps its global batch (``training.grad_accum`` follows)
and says what that means for its data order (:func:`keep_global_batch`, :func:`say_world_change`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from gptexp.core.config import TrainConfig, TrainingConfig
from gptexp.core.errors import CheckpointError
from gptexp.data.batches import resume_grad_accum
from gptexp.model.gpt import GPT
from gptexp.training.progress import plural

log = logging.getLogger(__name__)


def shard_model(model: GPT) -> None:
    """FSDP2 in place: every Block a unit, then the root. Call before building the optimizer
    (its parameters become the sharded DTensors).

    Every rank first takes rank 0's weights, as DDP does when it wraps a model: each rank
    built its model from a seed of its own (``seed + rank``), and ``fully_shard`` keeps each
    rank's slice of its own model, so without this the same seed would start from another
    model at each world size."""
    from torch.distributed.fsdp import fully_shard  # imported here: most of a second

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.detach(), src=0)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def uses_named_state(cfg: TrainConfig) -> bool:
    """Whether the run's checkpoints hold the named layout (see the module docstring)."""
    return cfg.training.parallel == "fsdp" or cfg.checkpoint.format == "dcp"


def named_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, full: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state) in the named layout; every rank must call it.

    ``full``: whole tensors on the CPU, on rank 0 only (other ranks get empty dicts), for the
    single-file format. Otherwise each rank's own shards, for a DCP checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_state_dict(model, optimizer, options=options)


def is_named_layout(optimizer_state: dict[str, Any]) -> bool:
    groups = optimizer_state.get("param_groups") or [{}]
    params = groups[0].get("params") or [None]
    return isinstance(params[0], str)


def load_named_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load whole tensors (every rank holds them) into a whole or a sharded model: each rank
    keeps the slices of its own shards, so any world size reads any checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )


def refuse_positional_state(sharded: bool) -> None:
    """A sharded model cannot take the positional optimizer layout of a DDP checkpoint."""
    if sharded:
        raise CheckpointError(
            "the checkpoint was written by a training.parallel=ddp run (single-file format): "
            "resume it with training.parallel=ddp"
        )


# ----------------------------------------------------------------------------- another world size


def keep_global_batch(
    t: TrainingConfig, saved: dict[str, Any], saved_world: int, world_size: int
) -> None:
    """Set ``t.grad_accum`` so that a step has the checkpoint's global batch on
    ``world_size`` (ConfigError when it cannot); the stored config of this start records the
    value."""
    global_batch = int(saved["batch_size"]) * int(saved["grad_accum"]) * saved_world
    grad_accum = resume_grad_accum(global_batch, t.batch_size, world_size)
    if grad_accum != t.grad_accum:
        log.info(
            "training.grad_accum %d -> %d: keeps the run's global batch of %d sequences "
            "(batch_size %d x grad_accum %d x %d processes)",
            t.grad_accum,
            grad_accum,
            global_batch,
            t.batch_size,
            grad_accum,
            world_size,
        )
        t.grad_accum = grad_accum


def say_world_change(saved_world: int, world_size: int, data_order: int) -> None:
    log.warning(
        "checkpoint was written by %s, resuming with %d: %s",
        plural(saved_world, "process", "processes"),
        world_size,
        "the data stay the same, the losses match an uninterrupted run up to float "
        "reduction order (with dropout, also not its random numbers, which cannot follow "
        "a change of world size)"
        if data_order >= 2
        else "training continues correctly but, in this run's old data order, is no "
        "longer bit-identical to an uninterrupted run",
    )
