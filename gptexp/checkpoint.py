"""The checkpoint format and a run's checkpoint directory.

One file per checkpoint (``step_0000500.pt``), a plain dict of tensors, numbers, strings,
lists and dicts that ``torch.load(..., weights_only=True)`` reads without allow-listing any
class. ``manifest.json`` lists the valid checkpoints with their sha256; a file that is not
listed, or whose bytes do not hash to the listed value, does not exist as far as loading is
concerned.

With ``checkpoint.format=dcp`` a checkpoint is a directory (``step_0000500.dcp/``) in which
every rank writes its own shards (:mod:`gptexp.sharded_checkpoint`); its manifest entry lists
the sha256 of each of its files, and the same rules hold: only a complete, listed directory
whose files all match counts.

Every write is crash-safe: a temporary file in the same directory, flushed and fsynced, renamed
over its final name, and the directory fsynced; the manifest is rewritten the same way.
Retention deletes files only after the new checkpoint and the manifest that lists it are
durable. Writes may run in a background thread from a snapshot of the state, so training
stalls only for the copy.

The directory is input someone else may have written (a copy, a hand edit, a shared run), so
nothing in it is trusted before it is checked: a manifest entry names a plain
``step_NNNNNNN.pt`` / ``.dcp`` inside ``checkpoints/`` with fields of the right types (else the
whole manifest is damaged); retention counts, keeps and deletes only entries that verify, and
takes a damaged one off the manifest, keeping its file under another name; a save never
overwrites a file the manifest does not vouch for (it is set aside the same way); a directory
of checkpoint files without a manifest is refused, pointing to ``python -m gptexp.repair``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cmp_to_key
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gptexp.config import CheckpointConfig
from gptexp.errors import CheckpointError, TrainingDiverged
from gptexp.fsio import (
    TMP_SUFFIX,
    HashingWriter,
    atomic_write_json,
    fsync_dir,
    sha256_file,
    sha256_of_open_file,
    xxh3_128_of_open_file,
)
from gptexp.rundir import RunDirectory, stored_config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A checkpoint's keys, in the order a file holds them: the tensors' states, the training state
# (gptexp.state.STATE_KEYS) and the record of what wrote it.
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
)
MANIFEST = "manifest.json"
# The reason listed for a fork's first checkpoint (its parent's state at the fork step): the
# anchor of the fork's lineage, which retention always keeps (as it keeps the best ones).
FORK_START = "fork"
# A checkpoint's name inside checkpoints/: its step (zero-padded to 7 digits) and its format.
CHECKPOINT_NAME = re.compile(r"step_([0-9]{7,})\.(pt|dcp)")
# How often a reader starts again when the live run replaced or deleted the checkpoint it chose
# (retention) before it could be read; each try follows a real change of the manifest.
RACE_TRIES = 20


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


def _listed(entry: CheckpointEntry) -> dict[str, Any]:
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


def _remove(path: Path) -> None:
    """Delete a checkpoint file or a DCP directory (a link: the link alone, never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _identity(path: Path) -> tuple:
    """What changes when a file (or a file of a directory) is replaced or rewritten."""
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        return tuple(
            sorted((child.name, _identity(Path(child.path))) for child in os.scandir(path))
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


def _sharded():
    """gptexp.sharded_checkpoint, imported on first use: it pulls in torch.distributed's
    tensor and checkpoint stacks (most of a second), which runs without DCP never need."""
    from gptexp import sharded_checkpoint

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


def load_checkpoint_file(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: no code in the file can run.

    With ``mmap`` the tensors are views of the file's pages (private: writing to one copies
    the page, never the file) instead of copies read into fresh memory. A DCP directory
    (already verified against the manifest) is read into the same plain dict.
    """
    try:
        if path.is_dir():
            meta, tensors = _sharded().read(path)
            state = _sharded().merge(meta, tensors)
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


# ----------------------------------------------------------------------------- the directory


class CheckpointManager:
    """Owns ``<run>/checkpoints``: save policy, crash-safe writes, retention and loading."""

    def __init__(self, directory: Path, policy: CheckpointConfig) -> None:
        self.directory = Path(directory)
        self.policy = policy
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._lock = threading.Lock()
        self.save_seconds: list[float] = []  # time training stalled per save (snapshot)
        self.write_seconds: list[float] = []  # time each write took in the writer
        # The copies of the last snapshot, reused by the next one (see snapshot()): training
        # then stalls for a copy into mapped memory instead of a fresh allocation.
        self._snapshot_buffers: dict[tuple, torch.Tensor] = {}
        self._shards = _sharded().ShardWriter() if policy.format == "dcp" else None
        self._written: set[str] = set()  # the checkpoints this process wrote (by name)
        # (file, sha256) -> the identity of the file when it last verified: retention checks
        # each listed checkpoint once per process, not at every save.
        self._verified: dict[tuple[str, str], tuple] = {}

    @property
    def collective(self) -> bool:
        """DCP: every rank calls ``save`` (each writes its shards); file: rank 0 alone."""
        return self.policy.format == "dcp"

    # -- manifest

    def entries(self) -> list[CheckpointEntry]:
        """The manifest's checkpoints, oldest first (their files are not verified here).

        A manifest that is not what gptexp writes (an entry that names a path, a link or
        another step's file, a field of the wrong type, a step twice) is damaged: a
        CheckpointError, so that nothing acts on it. So is a missing manifest beside
        checkpoint files this process did not write (a copy without it): starting afresh
        would overwrite them."""
        path = self.directory / MANIFEST
        if not path.is_file():
            self._refuse_unlisted_directory()
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:  # bad JSON, bad UTF-8, absurd nesting
            raise CheckpointError(
                f"{path}: damaged manifest ({str(error)[:120]}); rebuild it from the "
                f"checkpoint files with: {repair_hint(self.directory)}"
            ) from None
        except OSError as error:
            raise CheckpointError(f"{path}: unreadable ({error.strerror})") from None
        raw = data.get("checkpoints") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            raise CheckpointError(
                f"{path}: damaged manifest (no list of checkpoints); rebuild it with: "
                f"{repair_hint(self.directory)}"
            )
        entries: list[CheckpointEntry] = []
        for index, item in enumerate(raw):
            try:
                entry = parse_entry(item, self.directory)
                if any(e.step == entry.step for e in entries):
                    raise ValueError(f"step {entry.step} is listed twice")
            except ValueError as error:
                raise CheckpointError(
                    f"{path}: damaged manifest: entry {index} ({str(error)}); nothing is "
                    f"loaded or deleted through it; rebuild it with: {repair_hint(self.directory)}"
                ) from None
            entries.append(entry)
        return sorted(entries, key=lambda e: e.step)

    def _refuse_unlisted_directory(self) -> None:
        """No manifest: fine for a run that has written nothing yet (or only this process's
        first save), refused when checkpoints lie there that this process did not write."""
        if not self.directory.is_dir():
            return
        found = sorted(
            child.name
            for child in self.directory.iterdir()
            if step_of(child.name) is not None and child.name not in self._written
        )
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise CheckpointError(
                f"{self.directory} holds {len(found)} checkpoint(s) ({shown}) but no {MANIFEST}, "
                f"so none is trusted, loaded or overwritten; rebuild the manifest from the files "
                f"that load with: {repair_hint(self.directory)}"
            )

    def replace_manifest(self, entries: list[CheckpointEntry]) -> None:
        """List exactly ``entries`` (``gptexp.repair``, which has checked each one's file)."""
        with self._lock:
            self._write_manifest(entries)

    def _write_manifest(self, entries: list[CheckpointEntry]) -> None:
        entries = sorted(entries, key=lambda e: e.step)
        atomic_write_json(
            self.directory / MANIFEST,
            {"format_version": FORMAT_VERSION, "checkpoints": [_listed(e) for e in entries]},
        )

    def remove_stale_temporaries(self) -> None:
        """Temporary files (and DCP directories) are what a crash in the middle of a write
        leaves behind; only gptexp's own names go (a checkpoint's or the manifest's)."""
        for tmp in self.directory.glob(f"*{TMP_SUFFIX}"):
            name = tmp.name.removesuffix(TMP_SUFFIX)
            if step_of(name) is not None or name == MANIFEST:
                _remove(tmp)

    # -- policy

    def is_better(self, a: float, b: float) -> bool:
        """Whether metric ``a`` beats ``b`` in the policy's mode (min or max): the one
        ordering of metrics that best-k retention, ``ckpt=best`` and the best metric use."""
        return a < b if self.policy.mode == "min" else a > b

    def best_first(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        """The entries that carry a metric, best first (ties: the earlier step first)."""

        def order(a: CheckpointEntry, b: CheckpointEntry) -> int:
            if self.is_better(a.metric, b.metric):
                return -1
            return 1 if self.is_better(b.metric, a.metric) else a.step - b.step

        return sorted((e for e in entries if e.metric is not None), key=cmp_to_key(order))

    def ranks_among_best(self, metric: float, entries: list[CheckpointEntry]) -> bool:
        if self.policy.keep_best == 0:
            return False
        scored = [e.metric for e in entries if e.metric is not None]
        beaten_by = sum(1 for other in scored if not self.is_better(metric, other))
        return beaten_by < self.policy.keep_best

    def wants(self, step: int, metric: float | None, final: bool) -> list[str]:
        """Why a checkpoint should be written at ``step`` (empty: it should not)."""
        p = self.policy
        if not p.enabled:
            return []
        reasons = []
        if final:
            reasons.append("final")
        if p.every_steps and step % p.every_steps == 0:
            reasons.append("periodic")
        if p.keep_every and step % p.keep_every == 0:
            reasons.append("milestone")
        if metric is not None and p.keep_best:
            self.wait()  # ranking needs the manifest of every earlier save
            if self.ranks_among_best(metric, self.entries()):
                reasons.append("best")
        return reasons

    def retained(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        """The checkpoints the policy keeps: the newest ``keep_last`` periodic ones, the
        ``keep_best`` best, every ``keep_every``-th step, a fork's start, and always the newest
        checkpoint of any kind (resume needs it). ``entries`` are the verified ones."""
        p = self.policy
        by_step = sorted(entries, key=lambda e: e.step)
        periodic = [e for e in by_step if "periodic" in e.reasons]
        keep = {by_step[-1].step} if by_step else set()
        keep |= {e.step for e in by_step if FORK_START in e.reasons}
        if p.keep_last:
            keep |= {e.step for e in periodic[-p.keep_last :]}
        keep |= {e.step for e in self.best_first(by_step)[: p.keep_best]}
        if p.keep_every:
            keep |= {e.step for e in by_step if e.step % p.keep_every == 0}
        return [e for e in by_step if e.step in keep]

    # -- saving

    def prepare(self, state: dict[str, Any]) -> None:
        """Allocate the snapshot buffers of an asynchronous save for ``state`` now (at the start
        of training) so that the first save copies into memory that is already mapped (pinned
        for GPU tensors) instead of stalling training for the allocation. ``state`` may be a
        part of what ``save`` will get (model and optimizer): buffers are matched by the place
        of a tensor in the state."""
        if not (self.policy.enabled and self.policy.async_save):
            return
        self.wait()  # the buffers are not being written from
        snapshot(state, self._snapshot_buffers)

    def save(
        self,
        state: dict[str, Any],
        step: int,
        metric: float | None,
        reasons: list[str],
        *,
        asynchronous: bool | None = None,
    ) -> None:
        """Write ``state`` as the checkpoint of ``step``.

        With ``asynchronous`` (the policy's ``async_save`` by default) the state is copied and
        written by a background thread; the call returns after the copy. Errors of a
        background write surface at the next ``save`` or ``wait``.
        """
        asynchronous = self.policy.async_save if asynchronous is None else asynchronous
        self.wait()
        in_background = asynchronous and not self.collective
        if not in_background:  # the background writer checks its snapshot before writing
            self.refuse_nonfinite(state, step)
        self.directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if self.collective:
            self._save_dcp(state, step, metric, reasons, asynchronous)
            self.save_seconds.append(time.perf_counter() - started)
        elif in_background:
            # wait() above has joined the previous writer, so its buffers are free again.
            frozen = snapshot(state, self._snapshot_buffers)
            self._pending = threading.Thread(
                target=self._write_in_background,
                args=(frozen, step, metric, reasons),
                name=f"checkpoint-{step}",
                daemon=False,
            )
            self._pending.start()
            self.save_seconds.append(time.perf_counter() - started)
        else:
            self._write(state, step, metric, reasons)
            self.save_seconds.append(time.perf_counter() - started)

    def refuse_nonfinite(self, state: dict[str, Any], step: int) -> None:
        """Raise TrainingDiverged, writing nothing, when a tensor of ``state`` is NaN or inf:
        a state that cannot be trained on is never written, so the last good one stays."""
        bad = nonfinite_tensors(state)
        if self.collective:  # each rank checked its shards; all must refuse alike
            bad = self._shards.union(bad)
        if not bad:
            return
        entries = self.entries()
        last = f"{entries[-1].file} is the last valid one" if entries else "none was written"
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingDiverged(
            f"refused to write the checkpoint of step {step}: {shown} hold NaN or inf; {last}"
        )

    def wait(self) -> None:
        """Block until the background write (if any) is durable; re-raise its error."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error

    def _write_in_background(self, state, step, metric, reasons) -> None:
        try:
            # The finite check reads every value: here it costs training no time (a refusal
            # surfaces at the next save or wait, and nothing is written).
            self.refuse_nonfinite(state, step)
            self._write(state, step, metric, reasons)
        except BaseException as error:  # handed to the training thread by wait()
            self._pending_error = error

    def _save_dcp(self, state, step: int, metric, reasons: list[str], asynchronous: bool) -> None:
        """Every rank: its shards into ``step_N.dcp.tmp/``; then rank 0 adds ``meta.pt``,
        hashes every file, renames the directory into place and lists it in the manifest.
        DCP's own end-of-save step makes rank 0 wait until every rank's shards are written."""
        name = f"step_{step:07d}{_sharded().SUFFIX}"
        tmp = self.directory / (name + TMP_SUFFIX)
        tensors, meta = _sharded().split_tensors(state)
        try:
            future = self._shards.write(tensors, tmp, asynchronous)
        except (OSError, RuntimeError) as error:
            raise self._write_error(self.directory / name, error) from None
        if future is None:
            self._finish_dcp(None, tmp, meta, step, metric, reasons)
            return

        def finish() -> None:
            try:
                self._finish_dcp(future, tmp, meta, step, metric, reasons)
            except BaseException as error:  # handed to the training thread by wait()
                self._pending_error = error

        self._pending = threading.Thread(target=finish, name=f"checkpoint-{step}", daemon=False)
        self._pending.start()

    def _finish_dcp(self, future, tmp: Path, meta, step: int, metric, reasons) -> None:
        started = time.perf_counter()
        name = tmp.name.removesuffix(TMP_SUFFIX)
        final_path = self.directory / name
        try:
            if future is not None:
                future.result()
            if not self._is_coordinator():
                return
            _sharded().write_meta(tmp, meta)
            fsync_dir(tmp)
            files = _sharded().file_hashes(tmp)
            size = sum((tmp / f).stat().st_size for f in files)
            digest = _sharded().listing_digest(files)
            entry = CheckpointEntry(
                name, step, digest, size, metric, reasons, time.time(), files=files
            )
            self._make_room(final_path)  # e.g. an unlisted directory of an interrupted try
            self._list_before_rename(entry)
            os.replace(tmp, final_path)
            self._written.add(name)
            fsync_dir(self.directory)
        except CheckpointError:  # the directory's manifest is damaged or missing: said as is
            raise
        except (OSError, RuntimeError) as error:
            raise self._write_error(final_path, error) from None
        self._record(entry)
        self.write_seconds.append(time.perf_counter() - started)

    @staticmethod
    def _is_coordinator() -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    @staticmethod
    def _write_error(path: Path, error: BaseException) -> CheckpointError:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        return CheckpointError(
            f"could not write checkpoint {path} ({reason}); the earlier checkpoints are intact"
        )

    def _write(self, state: dict[str, Any], step: int, metric, reasons: list[str]) -> None:
        started = time.perf_counter()
        name = checkpoint_name(step)
        final_path = self.directory / name
        tmp = self.directory / (name + TMP_SUFFIX)
        writer = None
        self.entries()  # a damaged or missing manifest is refused before anything is written
        try:
            with open(tmp, "wb") as f:
                writer = HashingWriter(f)
                torch.save(state, writer)
                f.flush()
                os.fsync(f.fileno())
            size, digest, fast = writer.count, writer.sha.hexdigest(), writer.fast.hexdigest()
            entry = CheckpointEntry(name, step, digest, size, metric, reasons, time.time(), fast)
            self._make_room(final_path)
            self._list_before_rename(entry)
            os.replace(tmp, final_path)
            self._written.add(name)
            fsync_dir(self.directory)
        except CheckpointError:  # the directory's manifest is damaged or missing: said as is
            tmp.unlink(missing_ok=True)
            raise
        except (OSError, RuntimeError) as error:
            tmp.unlink(missing_ok=True)
            cause = writer.error if writer is not None and writer.error is not None else error
            reason = getattr(cause, "strerror", None) or str(cause).splitlines()[0]
            raise CheckpointError(
                f"could not write checkpoint {final_path} ({reason}); "
                "the earlier checkpoints are intact"
            ) from None
        self._record(entry)
        self.write_seconds.append(time.perf_counter() - started)

    def _list_before_rename(self, entry: CheckpointEntry) -> None:
        """List the new checkpoint before its file takes its name. A crash between the two
        leaves a listed entry whose file is missing (skipped when loading, un-listed by the
        next save) and a temporary (removed at the next start), never a checkpoint file that
        no manifest lists: that would look like a copy without its manifest, which resume
        refuses, so a crash in a run's first save would stop the run until a repair."""
        with self._lock:
            others = [e for e in self.entries() if e.step != entry.step]
            self._write_manifest([*others, entry])

    def _make_room(self, path: Path) -> None:
        """Before a save renames its file (or directory) to ``path``: what is there already is
        replaced only when it is this run's listed, intact checkpoint file of the step; anything
        else (unlisted: an interrupted save or not gptexp's; damaged; a DCP directory, which a
        rename cannot replace) is set aside, never overwritten."""
        if not os.path.lexists(path):
            return
        listed = next((e for e in self.entries() if e.file == path.name), None)
        if listed is not None:
            problem = self._check(listed)
            if problem is None and not path.is_dir():
                return  # os.replace swaps the file atomically
            if problem is None:  # a rename cannot replace a directory that holds files
                self._set_aside(path, "replaced", "listed, and saved again at its step")
            else:
                self._set_aside(path, "damaged", f"listed, but {problem}")
        else:
            self._set_aside(path, "unlisted", "not in the manifest")

    def _set_aside(self, path: Path, label: str, why: str) -> None:
        """Rename ``path`` out of the way (``step_0000500.pt.damaged``, ``-2``...): gptexp
        deletes only the checkpoints its manifest lists and that verify."""
        target, n = path.with_name(f"{path.name}.{label}"), 1
        while os.path.lexists(target):
            n += 1
            target = path.with_name(f"{path.name}.{label}-{n}")
        os.rename(path, target)
        fsync_dir(self.directory)
        log.warning("%s: %s; kept as %s, not used or deleted", path, why, target.name)

    def _check(self, entry: CheckpointEntry) -> str | None:
        """``verify`` once per file and process: a file unchanged since it verified (or since
        this process wrote it) is not read again."""
        try:
            identity = _identity(self.directory / entry.file)
        except OSError:
            return "missing"
        if self._verified.get((entry.file, entry.sha256)) == identity:
            return None
        problem = self.verify(entry)
        if problem is None:
            self._verified[(entry.file, entry.sha256)] = identity
        return problem

    def _record(self, entry: CheckpointEntry) -> None:
        """List the durable new checkpoint, then apply retention (un-list, then delete).

        Only listed checkpoints that verify count: a damaged one is never the newest or the
        best, so it can never cause a valid one (or this save) to be deleted; it is taken off
        the manifest and its file set aside."""
        self._verified[(entry.file, entry.sha256)] = _identity(self.directory / entry.file)
        with self._lock:
            others = [e for e in self.entries() if e.step != entry.step]
            problems = {e.file: self._check(e) for e in others}
            damaged = [e for e in others if problems[e.file] is not None]
            entries = [e for e in others if problems[e.file] is None] + [entry]
            self._write_manifest(entries)  # the new checkpoint is durable and listed
            for bad in damaged:  # un-listed just now; its file (if any) goes aside
                if os.path.lexists(self.directory / bad.file):
                    self._set_aside(self.directory / bad.file, "damaged", problems[bad.file])
                else:
                    log.warning("%s: missing; taken off the manifest", self.directory / bad.file)
            kept = self.retained(entries)
            if entry not in kept:  # never delete the checkpoint just saved (and announced)
                kept.append(entry)
            if len(kept) < len(entries):
                self._write_manifest(kept)  # un-list first, then delete
                kept_files = {e.file for e in kept}
                for dropped in entries:
                    if dropped.file not in kept_files:
                        _remove(self.directory / dropped.file)

    # -- loading

    def verify(self, entry: CheckpointEntry) -> str | None:
        """None when the file matches its manifest entry, else what is wrong with it (the
        checksum that loading checks: XXH3 where listed, else sha256)."""
        path = self.directory / entry.file
        try:
            if entry.files is not None:
                return self._verify_directory(path, entry)
            if not path.is_file():
                return "missing"
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.bytes:
                    return f"truncated or extended ({size} bytes, listed {entry.bytes})"
                if entry.xxh3_128 is not None:
                    if xxh3_128_of_open_file(f) != entry.xxh3_128:
                        return "corrupted (its XXH3 checksum differs from the manifest)"
                elif sha256_of_open_file(f) != entry.sha256:
                    return "corrupted (sha256 differs from the manifest)"
        except FileNotFoundError:
            return "missing"
        except OSError as error:
            return f"unreadable ({error.strerror})"
        return None

    @staticmethod
    def _verify_directory(path: Path, entry: CheckpointEntry) -> str | None:
        """Every file of a DCP directory, before any is read: the entry lists exactly the
        files there are (DCP's ``.metadata`` and ``meta.pt`` among them), each a plain file
        whose sha256 matches. An empty listing verifies nothing, so it is damage too."""
        listed = entry.files
        required = {_sharded().METADATA, _sharded().META}
        if not isinstance(listed, dict) or not required <= listed.keys():
            names = " and ".join(sorted(required))
            return f"damaged manifest entry (its files do not list {names})"
        if not path.is_dir():
            return "missing"
        present = {member.name for member in path.iterdir()}
        unlisted = sorted(present - listed.keys())
        if unlisted:
            return f"damaged ({unlisted[0]} is in the directory but not in the manifest)"
        for name, digest in sorted(listed.items()):
            member = path / name
            if name not in present:
                return f"incomplete ({name} is missing)"
            if member.is_symlink() or not member.is_file():
                return f"damaged ({name} is not a plain file)"
            if sha256_file(member) != digest:
                return f"corrupted ({name}: sha256 differs from the manifest)"
        return None

    def load(self, entry: CheckpointEntry) -> dict[str, Any]:
        """The checkpoint's state, verified against the manifest; a CheckpointError when it
        cannot be had (also when it disappears while it is read)."""
        path = self.directory / entry.file
        try:
            return self._load_verified(entry)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except OSError as error:
            raise CheckpointError(f"{path}: unreadable ({error.strerror})") from None

    def _load_verified(self, entry: CheckpointEntry) -> dict[str, Any]:
        """The checkpoint's state, verified against the manifest.

        The file is read once: checksumming it through a memory mapping brings it into the
        page cache, and ``torch.load(mmap=True)`` maps those same pages, so tensors are not
        copied out of the file (a consumer such as ``load_state_dict`` makes the one copy it
        needs). The checksum is the entry's XXH3 where the manifest has one, else its sha256.
        """
        path = self.directory / entry.file
        if entry.files is not None:  # a DCP directory: every file against its sha256 first
            problem = self._verify_directory(path, entry)
            if problem is not None:
                raise CheckpointError(f"{path}: {problem}")
            return load_checkpoint_file(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        with open(path, "rb") as f:
            identity = os.fstat(f.fileno())
            if identity.st_size != entry.bytes:
                raise CheckpointError(
                    f"{path}: truncated or extended ({identity.st_size} bytes, "
                    f"listed {entry.bytes})"
                )
            if entry.xxh3_128 is not None:
                if xxh3_128_of_open_file(f) != entry.xxh3_128:
                    raise CheckpointError(
                        f"{path}: corrupted (its XXH3 checksum differs from the manifest)"
                    )
            elif sha256_of_open_file(f) != entry.sha256:
                raise CheckpointError(f"{path}: corrupted (sha256 differs from the manifest)")
            state = load_checkpoint_file(path, mmap=True)
            now_there = os.stat(path)
        # Checkpoints are replaced by rename only: the same inode means the bytes loaded are the
        # bytes hashed.
        if (now_there.st_dev, now_there.st_ino) != (identity.st_dev, identity.st_ino):
            raise CheckpointError(f"{path}: replaced while it was being read; load it again")
        return state

    def find(self, which: str | int) -> CheckpointEntry:
        """The manifest entry for ``last``, ``best`` or a step number (not verified)."""
        entries = self.entries()
        if not entries:
            raise CheckpointError(f"{self.directory}: no checkpoint")
        if which == "last":
            return entries[-1]
        if which == "best":
            ranked = self.best_first(entries)
            return ranked[0] if ranked else entries[-1]
        for entry in entries:
            if entry.step == int(which):
                return entry
        steps = ", ".join(str(e.step) for e in entries)
        raise CheckpointError(f"{self.directory}: no checkpoint at step {which} (have: {steps})")

    def load_requested(self, which: str | int) -> tuple[CheckpointEntry, dict[str, Any]]:
        """(entry, state) of ``best`` or a step, verified; never another checkpoint than the
        one asked for. When the live run deletes or replaces it while it is read (retention),
        the manifest is read again and the request answered from that."""
        for _ in range(RACE_TRIES):
            entry = self.find(which)  # a step retention took is "no checkpoint at step N"
            try:
                return entry, self.load(entry)
            except CheckpointError:
                if entry in self.entries():  # still listed as it was: really damaged
                    raise
        raise self._race_error()

    def load_latest_valid(
        self, warn: Callable[[str], None] = log.warning
    ) -> tuple[CheckpointEntry, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads; damaged ones are skipped, with a
        message. None when there is no valid checkpoint at all.

        A run may be saving while this reads (eval or export of a live run): when the entry
        chosen is no longer listed as it was after it failed to load, retention took it, and
        the search starts again from the newest entry of the manifest as it is now."""
        # The directory before the manifest: a file a live run saves meanwhile is listed by then.
        found = sorted(self.directory.iterdir()) if self.directory.is_dir() else []
        entries = self.entries()
        listed = {e.file for e in entries}
        for path in found:
            if step_of(path.name) is not None and path.name not in listed and path.exists():
                warn(
                    f"ignoring {path}: not in the manifest (a save interrupted before it "
                    "was listed, or not written by this run)"
                )
        damaged: list[CheckpointEntry] = []
        for _ in range(RACE_TRIES):
            for entry in reversed(entries):
                if entry in damaged:
                    continue
                try:
                    return entry, self.load(entry)
                except CheckpointError as error:
                    now = self.entries()
                    if entry not in now:  # deleted or replaced under the reader: start again
                        entries = now
                        break
                    warn(f"skipping checkpoint: {error}; falling back to an older one")
                    damaged.append(entry)
            else:
                return None
        raise self._race_error()

    def _race_error(self) -> CheckpointError:
        return CheckpointError(
            f"{self.directory}: the live run replaced or deleted each checkpoint chosen before "
            f"it could be read ({RACE_TRIES} tries); try again, or when the run has stopped"
        )


def run_checkpoints(run: RunDirectory, policy: CheckpointConfig | None = None) -> CheckpointManager:
    """The one way to a run's checkpoint manager.

    ``policy``: the ``checkpoint.*`` config a start of the run trains under (its overrides
    included): it decides what a save writes and keeps. Without it, a reader's manager: the
    run's own stored policy, whose ``mode`` decides which checkpoint is ``best`` (eval,
    export, fork, diff, repair); listing and loading verify against the manifest alone."""
    if policy is None:
        stored = stored_config(run).get("checkpoint")
        known = {f.name for f in dataclasses.fields(CheckpointConfig)}
        values = {k: v for k, v in stored.items() if k in known} if isinstance(stored, dict) else {}
        policy = CheckpointConfig(**values)
    return CheckpointManager(run.checkpoints, policy)
