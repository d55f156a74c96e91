"""The ``dcp`` checkpoint format: a directory that ``torch.distributed.checkpoint`` writes.

``step_0000500.dcp/`` holds one shard file per rank (``__<rank>_0.distcp``), DCP's
``.metadata`` and ``meta.pt``. The tensors nested in dicts (model weights, optimizer moments)
go through DCP, each rank writing its own shards; everything else (step, RNG states, config,
tokenizer, optimizer hyper-parameters) is a plain ``meta.pt`` that rank 0 writes and
``torch.load(..., weights_only=True)`` reads. Keeping every non-tensor out of DCP means no
DCP byte object is ever unpickled. DCP's ``.metadata`` is a pickle, and whoever wrote a run
directory also wrote the manifest that lists its sha256, so matching hashes prove nothing
about intent: it is read by an unpickler that admits only DCP's metadata classes and the
torch values they hold (as ``weights_only=True`` does for tensors), then checked field by
field before DCP is given it; the shard files are read with ``weights_only=True`` too.

This module knows DCP; :mod:`gptexp.checkpoint.manager` owns the manifest, retention and the policy.
"""

from __future__ import annotations

import enum
import hashlib
import os
import pathlib
import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.tensor import DTensor

from gptexp.core.errors import CheckpointError
from gptexp.core.fsio import sha256_file

SUFFIX = ".dcp"
META = "meta.pt"
METADATA = ".metadata"  # DCP's own name for it
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


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file of the directory, by name."""
    return {path.name: sha256_file(path) for path in sorted(directory.iterdir()) if path.is_file()}


def listing_digest(files: dict[str, str]) -> str:
    """One sha256 for the whole directory: of its sorted ``name digest`` lines."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# What a .metadata of a tensors-only DCP checkpoint names, found by reading
# torch/distributed/checkpoint/metadata.py and by unpickling real ones: DCP's dataclasses, the
# per-entry storage info of its file-system writer, and the torch values inside them (a Size,
# a dtype, a layout by name). Nothing else is importable from the file.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", cls.__name__): cls
    for cls in (
        Metadata,
        TensorStorageMetadata,
        TensorProperties,
        ChunkStorageMetadata,
        dcp_metadata.BytesStorageMetadata,  # empty; admitted to be named, then refused
        MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_metadata._MEM_FORMAT_ENCODING,  # an Enum: TensorProperties' memory format
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
}
# StorageMeta.checkpoint_id: the path DCP wrote to, kept as a path that touches no file system.
_PATHS = {
    "PosixPath": pathlib.PurePosixPath,
    "PurePosixPath": pathlib.PurePosixPath,
    "WindowsPath": pathlib.PureWindowsPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
}


_ENUMS = tuple(cls for cls in _DCP_CLASSES.values() if isinstance(cls, enum.EnumMeta))


class _NotMetadata(pickle.UnpicklingError):
    """A global that DCP metadata never names."""


def _enum_member(cls: Any, name: Any) -> Any:
    """``getattr(cls, name)`` as some Pythons pickle an Enum member (3.11.2 does; 3.11.7 pickles
    it by value): only a member, by its name, of an Enum admitted above. A getattr of anything
    else could reach any callable of an admitted class (``__subclasses__``, ``__init__``...)."""
    admitted = isinstance(cls, type) and issubclass(cls, enum.Enum) and cls in _ENUMS
    if admitted and isinstance(name, str) and name in cls.__members__:
        return cls.__members__[name]
    raise _NotMetadata(f"getattr({cls!r:.60}, {name!r:.60}) is not DCP metadata")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` admitting only the globals above and torch's dtypes;
    any other global (``os.system``, ``builtins.eval``...) is refused before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _DCP_CLASSES.get((module, name))
        if found is not None:
            return found
        if (module, name) == ("builtins", "getattr"):
            return _enum_member  # an Enum member by name, nothing else
        if module in ("pathlib", "pathlib._local") and name in _PATHS:
            return _PATHS[name]
        dtype = vars(torch).get(name) if module == "torch" else None  # no lazy imports
        if isinstance(dtype, torch.dtype):
            return dtype
        raise _NotMetadata(f"{module}.{name} is not DCP metadata")


def read_metadata(directory: Path) -> Metadata:
    """The directory's ``.metadata``, through :class:`_MetadataUnpickler`, checked to describe
    tensors stored in plain files of ``directory`` (what gptexp writes, nothing more)."""
    path = directory / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _NotMetadata as error:
        raise CheckpointError(f"{path}: refused to load ({error})") from None
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror or error})") from None
    except Exception as error:  # a damaged pickle fails in as many ways as it has opcodes
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__})") from None
    try:
        problem = _metadata_problem(metadata, directory)
    except AttributeError as error:  # an object unpickled without the fields of its class
        problem = f"an entry without its fields: {error}"
    if problem is not None:
        raise CheckpointError(f"{path}: refused to load ({problem})")
    return metadata


def _metadata_problem(metadata: Any, directory: Path) -> str | None:
    """What in the unpickled ``metadata`` is not what gptexp writes, or None."""
    if not isinstance(metadata, Metadata):
        return f"a {type(metadata).__name__}"
    items, places, storage = (
        metadata.state_dict_metadata,
        metadata.planner_data,
        metadata.storage_data,
    )
    if not (isinstance(items, dict) and isinstance(places, dict) and isinstance(storage, dict)):
        return "its tables are not dicts"
    if not isinstance(metadata.storage_meta, (dcp_metadata.StorageMeta, type(None))):
        return "malformed storage_meta"
    for key, item in items.items():
        if not isinstance(item, TensorStorageMetadata):
            # gptexp writes tensors only; DCP would unpickle anything else without restriction.
            return f"{key} is not a tensor"
        if not (
            isinstance(item.properties, TensorProperties)
            and isinstance(item.properties.dtype, torch.dtype)
            and isinstance(item.size, torch.Size)
            and isinstance(item.chunks, list)
            and all(isinstance(chunk, ChunkStorageMetadata) for chunk in item.chunks)
        ):
            return f"{key}: malformed tensor entry"
        place = places.get(key)
        if not (
            isinstance(place, (tuple, list)) and place and all(isinstance(p, str) for p in place)
        ):
            return f"{key}: no place in the state"
    names = {path.name for path in directory.iterdir() if _is_plain_file(path)}
    for index, info in storage.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo)):
            return "malformed storage entry"
        file = info.relative_path
        # A plain file of this directory (never a path out of it), stored without transforms.
        if not (isinstance(file, str) and file in names):
            return f"{index.fqn}: stored in {file!r}, not a file of the directory"
        if info.transform_descriptors:
            return f"{index.fqn}: stored through transforms gptexp never writes"
    return None


class _CheckedReader(dcp.FileSystemReader):
    """DCP's file-system reader, handed the metadata :func:`read_metadata` already read and
    checked instead of unpickling ``.metadata`` itself."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__(str(directory))
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = dcp_metadata.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def read(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, tensors) of a verified directory, as whole CPU tensors, on this process alone
    (no process group needed; the shards of any world size are joined in memory)."""
    meta = torch.load(directory / META, map_location="cpu", weights_only=True)
    metadata = read_metadata(directory)
    flat = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
    }
    try:
        dcp.load(flat, storage_reader=_CheckedReader(directory, metadata), no_dist=True)
    except dcp.CheckpointException as error:  # a BaseException: each rank's failure inside
        failures = [failure for failure, _ in error.failures.values()]
        reason = str(failures[0]).splitlines()[0] if failures else "no reason given"
        raise CheckpointError(f"{directory}: unreadable ({reason})") from None
    tensors: dict[str, Any] = {}
    for key, tensor in flat.items():
        _place(tensors, metadata.planner_data[key], tensor)  # DCP's flattened name -> path
    return meta, tensors
