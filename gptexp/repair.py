"""``python -m gptexp.repair run=<run dir>``: rebuild a run's ``checkpoints/manifest.json`` from
the checkpoint files that are there (``make repair RUN=<dir>``).

For a run whose manifest is gone (a copy of its ``.pt`` files without it) or damaged, which
resume, eval, export and fork refuse. A ``step_NNNNNNN.pt`` is listed again only when it loads
with ``torch.load(weights_only=True)``, holds what the trainer saves (model, optimizer, LR
schedule, step, RNG states, config, tokenizer, data fingerprint), its ``step`` is the one its
name says and its data fingerprint is the run's. Every other file is reported and left as it
is. An entry of the old manifest that still reads and whose file is unchanged keeps its
reasons and metric; the others get them from the run's checkpoint policy and the file. Nothing
is deleted: an existing manifest is kept as ``manifest.json.bak-<time>``. A run that a live
process is training is refused (its lock is held while repairing).

DCP directories (``step_NNNNNNN.dcp``) are not rebuilt: checking their shards means reading
DCP's pickled metadata, which a hand-made directory could abuse. They are reported and left
alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptexp.checkpoint.format import (
    MANIFEST,
    CheckpointEntry,
    checkpoint_name,
    load_checkpoint_file,
    parse_entry,
    step_of,
)
from gptexp.checkpoint.manager import FORK_START, CheckpointManager, run_checkpoints
from gptexp.core.cli import command_logging, parse_options, run_command
from gptexp.core.errors import CheckpointError, resume_hint
from gptexp.core.fsio import atomic_write_bytes, sha256_of_open_file, xxh3_128_of_open_file
from gptexp.observe.lineage import fork_parent
from gptexp.observe.rundir import RunDirectory, require_run

log = logging.getLogger(__name__)

USAGE = "usage: python -m gptexp.repair run=<run dir>"

# What every checkpoint the trainer writes holds (Trainer.state_dict), with its type.
REQUIRED: dict[str, type] = {
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "step": int,
    "rng": list,
    "config": dict,
    "tokenizer": str,
    "data_fingerprint": str,
}
REPAIRED = "repaired"  # a reason of every entry repair lists: where the entry came from


@dataclass
class RepairOptions:
    run: str


def structure_problem(state: dict[str, Any], step: int, fingerprint: Any) -> str | None:
    """What makes a loaded file not this run's checkpoint of ``step``, or None."""
    for key, kind in REQUIRED.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"not a gptexp checkpoint ({key} is missing or not a {kind.__name__})"
    if not all(isinstance(t, torch.Tensor) for t in state["model"].values()):
        return "not a gptexp checkpoint (its model holds something other than tensors)"
    if state["step"] != step:
        return f"it holds step {state['step']}, its name says {step}"
    if isinstance(fingerprint, str) and state["data_fingerprint"] != fingerprint:
        return "from another run (its data fingerprint is not this run's)"
    return None


def fork_start_step(run: RunDirectory) -> int | None:
    """The step of a fork's first checkpoint (its parent's state), None for a run that is not
    a fork."""
    status = run.read_status()
    parent = fork_parent(status)
    if parent is None:
        return None
    return 0 if "step" in (status.get("reset") or []) else parent["step"]


def previous_entries(directory: Path) -> dict[str, CheckpointEntry]:
    """The entries of the manifest being replaced that still read as entries, by file."""
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    raw = data.get("checkpoints") if isinstance(data, dict) else None
    found = {}
    for item in raw if isinstance(raw, list) else []:
        try:
            entry = parse_entry(item, directory)
        except ValueError:
            continue
        found[entry.file] = entry
    return found


def rebuild_entry(
    path: Path,
    manager: CheckpointManager,
    fingerprint: Any,
    fork_step: int | None,
    previous: CheckpointEntry | None = None,
) -> CheckpointEntry:
    """The manifest entry of the checkpoint file ``path``; CheckpointError saying why not."""
    step = step_of(path.name)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        sha256, fast = sha256_of_open_file(f), xxh3_128_of_open_file(f)
    state = load_checkpoint_file(path, mmap=True)
    problem = structure_problem(state, step, fingerprint)
    if problem is not None:
        raise CheckpointError(problem)
    if previous is not None and (previous.sha256, previous.bytes) == (sha256, size):
        return CheckpointEntry(
            path.name, step, sha256, size, previous.metric, previous.reasons, previous.time, fast
        )
    policy = manager.policy
    reasons = [REPAIRED]
    if policy.every_steps and step % policy.every_steps == 0:
        reasons.append("periodic")
    if policy.keep_every and step % policy.keep_every == 0:
        reasons.append("milestone")
    if step == fork_step:
        reasons.append(FORK_START)
    metric = state.get("metric")
    if (
        isinstance(metric, bool)
        or not isinstance(metric, (int, float))
        or not math.isfinite(metric)
    ):
        metric = None
    return CheckpointEntry(
        path.name, step, sha256, size, metric, reasons, path.stat().st_mtime, fast
    )


def keep_previous(manifest: Path) -> Path | None:
    """A copy of the manifest being replaced, next to it (``manifest.json.bak-<time>``)."""
    if not manifest.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = manifest.with_name(f"{MANIFEST}.bak-{stamp}"), 1
    while os.path.lexists(backup):
        n += 1
        backup = manifest.with_name(f"{MANIFEST}.bak-{stamp}-{n}")
    atomic_write_bytes(backup, manifest.read_bytes())
    return backup


def repair(options: RepairOptions) -> list[CheckpointEntry]:
    run = require_run(options.run)
    directory = run.checkpoints
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory; there is nothing to repair")
    with run.lock():  # a live run is refused; no run starts while the manifest is rebuilt
        manager = run_checkpoints(run)
        fingerprint = run.read_status().get("data_fingerprint")
        fork_step = fork_start_step(run)
        previous = previous_entries(directory)
        entries: list[CheckpointEntry] = []
        left: list[str] = []
        for path in sorted(directory.iterdir()):
            step = step_of(path.name)
            if step is None:
                continue
            if path.is_symlink():
                left.append(f"{path.name}: a symbolic link (gptexp writes files)")
            elif path.is_dir():
                left.append(f"{path.name}: a DCP directory (repair lists .pt files only)")
            elif path.name != checkpoint_name(step):
                left.append(f"{path.name}: not the name gptexp gives step {step}'s checkpoint")
            else:
                try:
                    entry = rebuild_entry(
                        path, manager, fingerprint, fork_step, previous.get(path.name)
                    )
                    entries.append(entry)
                except (CheckpointError, OSError) as error:
                    why = getattr(error, "strerror", None) or str(error).removeprefix(f"{path}: ")
                    left.append(f"{path.name}: {why}")
        for line in left:
            log.warning("left untouched, not listed: %s", line)
        if not entries:
            raise CheckpointError(
                f"{directory}: no checkpoint file loads as this run's checkpoint; nothing written"
            )
        backup = keep_previous(directory / MANIFEST)
        manager.replace_manifest(entries)
    steps = ", ".join(str(e.step) for e in entries)
    log.info(
        "rebuilt %s: %d checkpoint(s) listed (steps %s)", directory / MANIFEST, len(entries), steps
    )
    if backup is not None:
        log.info("the previous manifest is kept as %s", backup)
    log.info("continue with: %s", resume_hint(run.path))
    return entries


def main() -> None:
    with command_logging(None):
        run_command(lambda: repair(parse_options(sys.argv[1:], RepairOptions, USAGE)))


if __name__ == "__main__":
    main()
