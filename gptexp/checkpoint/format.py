"""The checkpoint file format: names, manifest entries, snapshots and the safe load.

One file per checkpoint (``step_0000500.pt``), a plain dict of tensors, numbers, strings,
lists and dicts that ``torch.load(..., weights_only=True)`` reads without allow-listing any
class. ``manifest.json`` lists the valid checkpoints with their sha256; a file that is not
listed, or whose bytes do not hash to the listed value, does not exist as far as loading is
concerned.

With ``checkpoint.format=dcp`` a checkpoint is a directory (``step_0000500.dcp/``) in which
every rank writes its own shards (:mod:`gptexp.checkpoint.dcp`); its manifest entry lists
the sha256 of each of its files, and the same rules hold: only a complete, listed directory
whose files all match counts.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shlex
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptexp.core.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A checkpoint's keys, in the order a file holds them: the tensors' states, the training state
# (gptexp.training.state.STATE_KEYS) and the record of what wrote it.
CHECKPOINT_KEYS = (
    "format_version",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "step",
    "tokens_seen",
    "best_metric",
    "metric",
    "monitor",
    "rng",
    "config",
    "tokenizer",
    "data_fingerprint",
    "vocab_size",
    "wandb_id",
    "world_size",
    "data_order",
    "data_step",
    "guard",
    # The weights' moving average (gptexp.training.ema), only in the checkpoints of a run that
    # keeps one (training.ema_decay > 0): a checkpoint without it is one of a run without it.
    "ema",
)
MANIFEST = "manifest.json"  # checkpoints/manifest.json: the valid checkpoints and their sha256
# A checkpoint's name inside checkpoints/: its step (zero-padded to 7 digits) and its format.
CHECKPOINT_NAME = re.compile(r"step_([0-9]{7,})\.(pt|dcp)")


@dataclass
class CheckpointEntry:
    file: str
    step: int
    sha256: str
    bytes: int
    metric: float | None = None
    reasons: list[str] = field(default_factory=list)
    time: float = 0.0
    # A fast checksum of the file (XXH3, 128 bits), what loading verifies: sha256 runs at about
    # a third of the speed torch.load reads a file, XXH3 at several times it. Damage is all a
    # checksum can catch here (whoever can rewrite a file can rewrite the manifest); sha256
    # stays the file's identity (``sha256sum``, ``verify``). None in manifests written before.
    xxh3_128: str | None = None
    files: dict[str, str] | None = None  # a DCP directory: sha256 of each of its files


def listed_fields(entry: CheckpointEntry) -> dict[str, Any]:
    """The entry as the manifest holds it (a single file's entry has no ``files``)."""
    fields = asdict(entry)
    if fields["files"] is None:
        del fields["files"]
    return fields


# The manifest's fields and the JSON types each may have (a bool is never a number here).
_REQUIRED = ("file", "step", "sha256", "bytes")
_TYPES: dict[str, tuple[type, ...]] = {
    "file": (str,),
    "step": (int,),
    "sha256": (str,),
    "bytes": (int,),
    "metric": (int, float, type(None)),
    "reasons": (list,),
    "time": (int, float),
    "xxh3_128": (str, type(None)),
    "files": (dict, type(None)),
}


def _plain_member_name(name: Any) -> bool:
    """A file name directly inside a DCP directory: no path, no parent."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
    )


def parse_entry(raw: Any, directory: Path) -> CheckpointEntry:
    """A manifest entry as a CheckpointEntry, or ValueError saying what is wrong with it.

    Whoever wrote the run directory wrote its manifest: the file must be a plain checkpoint
    name inside ``directory`` (retention deletes it, loading reads it), never a path, a link or
    another step's name, and every field must have its type."""
    if not isinstance(raw, dict):
        raise ValueError(f"not an object but {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_TYPES))
    missing = [key for key in _REQUIRED if key not in raw]
    if unknown or missing:
        raise ValueError(
            ", ".join([*(f"unknown field {k!r}" for k in unknown), *(f"no {k!r}" for k in missing)])
        )
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in _TYPES[key])
            raise ValueError(f"{key} is {json.dumps(value)[:40]}, not {kinds}")
    if raw["step"] < 0 or raw["bytes"] < 0:
        raise ValueError("step and bytes must be >= 0")
    if not all(isinstance(reason, str) for reason in raw.get("reasons", [])):
        raise ValueError("reasons must be strings")
    name = raw["file"]
    if step_of(name) != raw["step"] or not name.startswith(f"step_{raw['step']:07d}."):
        raise ValueError(
            f"file {json.dumps(name)[:80]} is not the name of step {raw['step']}'s checkpoint "
            f"({checkpoint_name(raw['step'])} or its .dcp directory, directly in checkpoints/)"
        )
    files = raw.get("files")
    if (files is not None) != name.endswith(".dcp"):
        raise ValueError("a .dcp directory lists its files, a .pt file none")
    if files is not None and not all(
        _plain_member_name(k) and isinstance(v, str) for k, v in files.items()
    ):
        raise ValueError("files must map plain file names to sha256 digests")
    if (directory / name).is_symlink():
        raise ValueError(f"{name} is a symbolic link (a checkpoint is a file of checkpoints/)")
    return CheckpointEntry(**raw)


def remove_file(path: Path) -> None:
    """Delete a checkpoint file or a DCP directory (a link: the link alone, never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def file_identity(path: Path) -> tuple:
    """What changes when a file (or a file of a directory) is replaced or rewritten."""
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        return tuple(
            sorted((child.name, file_identity(Path(child.path))) for child in os.scandir(path))
        )
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def step_of(name: Any) -> int | None:
    """The step a checkpoint's name says (``step_0000500.pt`` or ``.dcp``), or None when the
    name is not a checkpoint's."""
    match = CHECKPOINT_NAME.fullmatch(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def repair_hint(directory: Path) -> str:
    """The command that rebuilds the manifest of the run whose checkpoint directory this is."""
    return f"python -m gptexp.repair run={shlex.quote(str(Path(directory).parent))}"


def snapshot(obj: Any, buffers: dict[tuple, torch.Tensor] | None = None) -> Any:
    """A deep copy of a state dict whose tensors are CPU clones, safe to write later.

    Training mutates parameters and optimizer state in place; the background writer must see
    the values of the moment the checkpoint was taken. Tensors that are views of the same
    memory (tied embeddings: ``state_dict()`` returns one tensor object per name) are copied
    once and stay shared, so they are written once.

    ``buffers``, kept by the caller from one snapshot to the next, holds the copies by their
    place in the state; a tensor whose place already has a buffer of its shape, dtype and
    layout is copied into that buffer. Copying into memory that is already mapped is several
    times faster than into fresh memory, whose page faults dominate the copy of a large state.
    The caller must not pass the buffers again while a snapshot made in them is still read.
    """
    pool: dict[tuple, torch.Tensor] = {} if buffers is None else buffers
    copies: dict[tuple, torch.Tensor] = {}  # one copy per distinct view of memory
    devices: set[torch.device] = set()

    def copy(tensor: torch.Tensor, place: tuple) -> torch.Tensor:
        tensor = tensor.detach()
        view = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.dtype,
            tuple(tensor.shape),
            tensor.stride(),
        )
        if tensor.numel() and view in copies:
            return copies[view]
        buffer = pool.get(place)
        if buffer is None or (buffer.dtype, buffer.shape, buffer.stride()) != (
            tensor.dtype,
            tensor.shape,
            tensor.stride(),
        ):
            # Page-locked memory for a GPU tensor: the device copies into it directly (DMA),
            # without a staging buffer; allocating it is slow, which is why buffers are reused.
            buffer = torch.empty_strided(
                tensor.shape,
                tensor.stride(),
                dtype=tensor.dtype,
                device="cpu",
                pin_memory=tensor.is_cuda,
            )
            pool[place] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda and buffer.is_pinned())
        devices.add(tensor.device)
        copies[view] = buffer
        return buffer

    def walk(node: Any, place: tuple) -> Any:
        if isinstance(node, torch.Tensor):
            return copy(node, place)
        if isinstance(node, dict):
            return {key: walk(value, (*place, key)) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(value, (*place, i)) for i, value in enumerate(node))
        return node

    frozen = walk(obj, ())
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the non-blocking copies have landed
    return frozen


def sharded():
    """gptexp.checkpoint.dcp, imported on first use: it pulls in torch.distributed's
    tensor and checkpoint stacks (most of a second), which runs without DCP never need."""
    from gptexp.checkpoint import dcp as sharded_checkpoint

    return sharded_checkpoint


def _dtensor_type() -> type | None:
    """DTensor, where torch.distributed.tensor has been imported (none exist otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def nonfinite_tensors(state: Any) -> list[str]:
    """The places (``model.lm_head.weight``, ``optimizer.state.3.exp_avg_sq``) of the
    floating-point tensors in ``state`` that hold a NaN or an infinity."""
    found: list[tuple[str, torch.Tensor]] = []
    dtensor = _dtensor_type()

    def walk(node: Any, place: str) -> None:
        if isinstance(node, torch.Tensor):
            if dtensor is not None and isinstance(node, dtensor):  # a shard: this rank's part
                node = node.to_local()
            if node.is_floating_point():
                found.append((place, node))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{place}.{key}" if place else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{place}.{i}" if place else str(i))

    walk(state, "")
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for place, tensor in found:
        by_device.setdefault(tensor.device, []).append((place, tensor))
    bad = []
    for tensors in by_device.values():
        # A sum is NaN or inf when a value is (and ~20x cheaper to compute than isfinite on
        # every value); it is read back once per device. A sum can also overflow from finite
        # values alone, so a tensor whose sum is not finite is checked value by value.
        sums = torch.stack([_sum(t.detach()) for _, t in tensors]).isfinite().tolist()
        bad += [
            place
            for (place, tensor), ok in zip(tensors, sums, strict=True)
            if not ok and not torch.isfinite(tensor.detach()).all()
        ]
    return bad


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def average_layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a checkpoint's ``ema`` of ``model`` holds: each parameter's name and whole shape, in
    fp32 (a tied parameter once, under its first name)."""
    return {name: (tuple(p.shape), torch.float32) for name, p in model.named_parameters()}


def check_average(average: Any, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
    """A checkpoint's ``ema`` (gptexp.training.ema), checked as the weights are before they
    are loaded: a dict of exactly the ``expected`` names, each a tensor of its shape and dtype;
    a CheckpointError saying what differs."""
    if not isinstance(average, dict):
        raise CheckpointError(
            f"the checkpoint's ema is {type(average).__name__}, not a dict of tensors by name"
        )
    missing = sorted(set(expected) - set(average))
    unknown = sorted(map(str, set(average) - set(expected)))
    if missing or unknown:
        what = [f"missing {', '.join(missing[:3])}"] if missing else []
        what += [f"unknown {', '.join(unknown[:3])}"] if unknown else []
        raise CheckpointError(f"the checkpoint's ema does not fit the model ({'; '.join(what)})")
    for name, (shape, dtype) in expected.items():
        tensor = average[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"the checkpoint's ema.{name} is not a tensor")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(
                f"the checkpoint's ema.{name} is {tensor.dtype}{list(tensor.shape)}, the model "
                f"needs {dtype}{list(shape)}"
            )
    return average


def load_checkpoint_file(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: no code in the file can run.

    With ``mmap`` the tensors are views of the file's pages (private: writing to one copies
    the page, never the file) instead of copies read into fresh memory. A DCP directory
    (already verified against the manifest) is read into the same plain dict.
    """
    try:
        if path.is_dir():
            meta, tensors = sharded().read(path)
            state = sharded().merge(meta, tensors)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:  # the DCP reader's own message names the file and the problem
        raise
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than plain data "
            f"({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a gptexp checkpoint (no model/step)")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {state['format_version']} is newer than this gptexp "
            f"reads ({FORMAT_VERSION}); upgrade gptexp"
        )
    return state
