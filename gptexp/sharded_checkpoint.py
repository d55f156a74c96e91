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
import tempfile
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from gptexp.fsio import sha256_file

SUFFIX = ".dcp"
META = "meta.pt"

# DCP warns on every save without a process group; one process writing alone is intended here.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled", category=UserWarning, module=r"torch\."
)


def split_tensors(node: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, rest): the tensors nested in dicts, and everything else, as two dicts of the
    same shape. Tensors inside lists (the per-rank RNG states) stay in ``rest``."""
    tensors: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict):
            inner_tensors, inner_rest = split_tensors(value)
            if inner_tensors:
                tensors[key] = inner_tensors
            if inner_rest or not inner_tensors:  # an empty dict stays a dict
                rest[key] = inner_rest
        else:
            rest[key] = value
    return tensors, rest


def merge(rest: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_tensors`."""
    merged = dict(rest)
    for key, value in tensors.items():
        if isinstance(value, dict):
            merged[key] = merge(merged.get(key, {}), value)
        else:
            merged[key] = value
    return merged


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
    """(meta, tensors) of a verified directory, as whole tensors, on this process alone (no
    process group needed; the shards of any world size are joined)."""
    meta = torch.load(directory / META, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory(prefix="gptexp-dcp-") as scratch:
        joined = Path(scratch) / "state.pt"
        dcp_to_torch_save(directory, joined)
        tensors = torch.load(joined, map_location="cpu", weights_only=True)
    return meta, tensors
