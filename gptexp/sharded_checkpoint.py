"""The ``dcp`` checkpoint format: a directory that ``torch.distributed.checkpoint`` writes.

``step_0000500.dcp/`` holds one shard file per rank (``__<rank>_0.distcp``), DCP's
``.metadata`` and ``meta.pt``. The tensors nested in dicts (model weights, optimizer moments)
go through DCP, each rank writing its own shards; everything else (step, RNG states, config,
tokenizer, optimizer hyper-parameters) is a plain ``meta.pt`` that rank 0 writes and
``torch.load(..., weights_only=True)`` reads. Keeping every non-tensor out of DCP means no
DCP byte object is ever unpickled; DCP's ``.metadata`` is a pickle (torch's format), so it is
read only after every file of the directory matched the sha256 the manifest lists for it.

This module knows DCP; :mod:`gptexp.checkpoint` owns the manifest, retention and the policy.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from gptexp.errors import CheckpointError
from gptexp.fsio import sha256_file

SUFFIX = ".dcp"
META = "meta.pt"
# In meta.pt: tensors that are another tensor of the state (tied weights), written once.
ALIASES = "dcp_aliases"

# DCP warns on every save without a process group; one process writing alone is intended here.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled", category=UserWarning, module=r"torch\."
)


def split_tensors(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, rest): the tensors nested in dicts, and everything else, as two dicts of the
    same shape. Tensors inside lists (the per-rank RNG states) stay in ``rest``. A tensor
    object met a second time (the token embedding tied to the output layer) is not repeated:
    ``rest[ALIASES]`` maps its path to the first one's."""
    first_path: dict[tuple, list[str]] = {}
    aliases: list[tuple[list[str], list[str]]] = []

    def split(node: dict[str, Any], path: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in node.items():
            here = [*path, key]
            if isinstance(value, torch.Tensor):
                same = _memory(value)
                if same in first_path:
                    aliases.append((here, first_path[same]))
                else:
                    first_path[same] = here
                    tensors[key] = value
            elif isinstance(value, dict):
                inner_tensors, inner_rest = split(value, here)
                if inner_tensors:
                    tensors[key] = inner_tensors
                if inner_rest or not inner_tensors:  # an empty dict stays a dict
                    rest[key] = inner_rest
            else:
                rest[key] = value
        return tensors, rest

    tensors, rest = split(state, [])
    rest[ALIASES] = aliases
    return tensors, rest


def _memory(tensor: torch.Tensor) -> tuple:
    """What makes two tensor objects the same tensor: the memory they view (state_dict()
    returns a new object per name, even for tied weights)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if not local.numel():
        return ("object", id(tensor))
    return (
        local.device,
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(local.shape),
        local.stride(),
        local.dtype,
    )


def merge(rest: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_tensors`."""

    def join(rest_node: dict[str, Any], tensor_node: dict[str, Any]) -> dict[str, Any]:
        merged = dict(rest_node)
        for key, value in tensor_node.items():
            merged[key] = join(merged.get(key, {}), value) if isinstance(value, dict) else value
        return merged

    aliases = rest.get(ALIASES, [])
    merged = join({k: v for k, v in rest.items() if k != ALIASES}, tensors)
    for path, source in aliases:
        _place(merged, path, _lookup(merged, source))
    return merged


def _lookup(node: dict[str, Any], path: list[str] | tuple[str, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


def _place(node: dict[str, Any], path: list[str] | tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


class ShardWriter:
    """Writes the tensor part on every rank; checkpoint collectives run in a gloo group of
    their own, so that a background write never interleaves with training's collectives."""

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None

    def _process_group(self) -> dist.ProcessGroup | None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")  # every rank reaches the first save
        return self._group

    def union(self, places: list[str]) -> list[str]:
        """Every rank's ``places`` joined (on one process: its own)."""
        group = self._process_group()
        if group is None:
            return places
        gathered: list[list[str] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, places, group=group)
        return sorted({place for ranks_places in gathered for place in ranks_places or []})

    def write(self, tensors: dict[str, Any], directory: Path, asynchronous: bool) -> Future | None:
        """Write (or, with ``asynchronous``, copy and start writing) this rank's shards into
        ``directory``. Returns the future of a background write; None when written."""
        group = self._process_group()
        no_dist = group is None
        if asynchronous:
            return dcp.async_save(
                tensors, checkpoint_id=str(directory), process_group=group, no_dist=no_dist
            )
        dcp.save(tensors, checkpoint_id=str(directory), process_group=group, no_dist=no_dist)
        return None


def write_meta(directory: Path, rest: dict[str, Any]) -> None:
    path = directory / META
    with open(path, "wb") as f:
        torch.save(rest, f)
        f.flush()
        os.fsync(f.fileno())


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file of the directory, by name."""
    return {path.name: sha256_file(path) for path in sorted(directory.iterdir()) if path.is_file()}


def listing_digest(files: dict[str, str]) -> str:
    """One sha256 for the whole directory: of its sorted ``name digest`` lines."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def read(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, tensors) of a verified directory, as whole CPU tensors, on this process alone
    (no process group needed; the shards of any world size are joined in memory)."""
    meta = torch.load(directory / META, map_location="cpu", weights_only=True)
    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    flat: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            # gptexp writes tensors only; a pickled object is never loaded.
            raise CheckpointError(f"{directory}: {key} is not a tensor; refused to load")
        flat[key] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(flat, storage_reader=reader, no_dist=True)
    tensors: dict[str, Any] = {}
    for key, tensor in flat.items():
        _place(tensors, metadata.planner_data[key], tensor)  # DCP's flattened name -> path
    return meta, tensors
