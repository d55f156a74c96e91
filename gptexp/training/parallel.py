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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from gptexp.core.config import TrainConfig
from gptexp.core.errors import CheckpointError
from gptexp.model.gpt import GPT


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
