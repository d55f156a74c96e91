"""Reading a run's checkpoint directory: the manifest's entries, verifying a checkpoint
against it, choosing one (``last``, ``best``, a step) and loading it safely, also while a live
run replaces them. Nothing here writes; :class:`gptexp.checkpoint.manager.CheckpointManager`
adds saving and retention."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from functools import cmp_to_key
from pathlib import Path
from typing import Any

from gptexp.checkpoint.format import (
    MANIFEST,
    CheckpointEntry,
    load_checkpoint_file,
    parse_entry,
    repair_hint,
    sharded,
    step_of,
)
from gptexp.core.config import CheckpointConfig
from gptexp.core.errors import CheckpointError
from gptexp.core.fsio import (
    sha256_file,
    sha256_of_open_file,
    xxh3_128_of_open_file,
)

log = logging.getLogger(__name__)

# How often a reader starts again when the live run replaced or deleted the checkpoint it chose
# (retention) before it could be read; each try follows a real change of the manifest.
RACE_TRIES = 20


class CheckpointReader:
    """A run's ``checkpoints/`` as a reader sees it; ``policy.mode`` decides which is best."""

    def __init__(self, directory: Path, policy: CheckpointConfig) -> None:
        self.directory = Path(directory)
        self.policy = policy
        self._written: set[str] = set()  # the checkpoints this process wrote (by name)
        # (file, sha256) -> the identity of the file when it last verified: retention checks
        # each listed checkpoint once per process, not at every save.
        self._verified: dict[tuple[str, str], tuple] = {}

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
        required = {sharded().METADATA, sharded().META}
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
