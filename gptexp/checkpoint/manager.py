"""A run's checkpoint directory: ``<run>/checkpoints`` and its manifest (the files are
gptexp.checkpoint.format's).

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
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gptexp.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST,
    CheckpointEntry,
    checkpoint_name,
    file_identity,
    listed_fields,
    nonfinite_tensors,
    remove_file,
    sharded,
    snapshot,
    step_of,
)
from gptexp.checkpoint.reader import CheckpointReader
from gptexp.core.config import CheckpointConfig
from gptexp.core.errors import CheckpointError, TrainingDiverged
from gptexp.core.fsio import (
    TMP_SUFFIX,
    HashingWriter,
    atomic_write_json,
    fsync_dir,
)
from gptexp.observe.rundir import RunDirectory, stored_config

log = logging.getLogger(__name__)

# The reason listed for a fork's first checkpoint (its parent's state at the fork step): the
# anchor of the fork's lineage, which retention always keeps (as it keeps the best ones).
FORK_START = "fork"


class CheckpointManager(CheckpointReader):
    """Owns ``<run>/checkpoints``: save policy, crash-safe writes and retention; reading and
    loading are the reader's (:class:`gptexp.checkpoint.reader.CheckpointReader`)."""

    def __init__(self, directory: Path, policy: CheckpointConfig) -> None:
        super().__init__(directory, policy)
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._lock = threading.Lock()
        self.save_seconds: list[float] = []  # time training stalled per save (snapshot)
        self.write_seconds: list[float] = []  # time each write took in the writer
        # The copies of the last snapshot, reused by the next one (see snapshot()): training
        # then stalls for a copy into mapped memory instead of a fresh allocation.
        self._snapshot_buffers: dict[tuple, torch.Tensor] = {}
        self._shards = sharded().ShardWriter() if policy.format == "dcp" else None

    @property
    def collective(self) -> bool:
        """DCP: every rank calls ``save`` (each writes its shards); file: rank 0 alone."""
        return self.policy.format == "dcp"

    # -- manifest

    def replace_manifest(self, entries: list[CheckpointEntry]) -> None:
        """List exactly ``entries`` (``gptexp.repair``, which has checked each one's file)."""
        with self._lock:
            self._write_manifest(entries)

    def _write_manifest(self, entries: list[CheckpointEntry]) -> None:
        entries = sorted(entries, key=lambda e: e.step)
        atomic_write_json(
            self.directory / MANIFEST,
            {"format_version": FORMAT_VERSION, "checkpoints": [listed_fields(e) for e in entries]},
        )

    def remove_stale_temporaries(self) -> None:
        """Temporary files (and DCP directories) are what a crash in the middle of a write
        leaves behind; only gptexp's own names go (a checkpoint's or the manifest's)."""
        for tmp in self.directory.glob(f"*{TMP_SUFFIX}"):
            name = tmp.name.removesuffix(TMP_SUFFIX)
            if step_of(name) is not None or name == MANIFEST:
                remove_file(tmp)

    # -- policy

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
        name = f"step_{step:07d}{sharded().SUFFIX}"
        tmp = self.directory / (name + TMP_SUFFIX)
        tensors, meta = sharded().split_tensors(state)
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
            sharded().write_meta(tmp, meta)
            fsync_dir(tmp)
            files = sharded().file_hashes(tmp)
            size = sum((tmp / f).stat().st_size for f in files)
            digest = sharded().listing_digest(files)
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
            identity = file_identity(self.directory / entry.file)
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
        self._verified[(entry.file, entry.sha256)] = file_identity(self.directory / entry.file)
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
                        remove_file(self.directory / dropped.file)


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
