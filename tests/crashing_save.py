"""Run a gptexp command that SIGKILLs its own process in the middle of one checkpoint save.

    python tests/crashing_save.py STEP PHASE MODULE [ARGS...]

PHASE ``write``: after the first 4 KiB of step STEP's temporary file are on disk (a DCP
checkpoint: after every rank's shards are written, before rank 0 completes the directory).
PHASE ``rename``: at the rename, once the manifest lists step STEP's complete temporary file
(or DCP directory) and before it takes its name: the manifest lists a checkpoint that is
missing (a save lists before it renames, so that no crash leaves an unlisted checkpoint).
The fault is injected here, on the test side, by patching the checkpoint writer in this
process before the command starts; the product has no hook for it. Works under torchrun
(every rank patches itself; the rank that writes checkpoints dies).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

import gptexp.checkpoint.manager as checkpoint

CRASH_AFTER_BYTES = 4096


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DyingWriter(checkpoint.HashingWriter):
    def write(self, data) -> int:
        written = super().write(data)
        if self.count >= CRASH_AFTER_BYTES:
            self.flush()
            die()
        return written


def die_once_listed(manager: checkpoint.CheckpointManager) -> None:
    """The manager's next manifest write (the one that lists the new checkpoint) is its last."""
    write_manifest = manager._write_manifest

    def write_then_die(entries):
        write_manifest(entries)
        die()

    manager._write_manifest = write_then_die


def install(step: int, phase: str) -> None:
    original = checkpoint.CheckpointManager._write

    def write(self, state, at_step, metric, reasons):
        if at_step != step:
            return original(self, state, at_step, metric, reasons)
        if phase == "write":
            checkpoint.HashingWriter = DyingWriter
        else:
            die_once_listed(self)
        return original(self, state, at_step, metric, reasons)

    checkpoint.CheckpointManager._write = write

    finish_dcp = checkpoint.CheckpointManager._finish_dcp

    def finish(self, future, tmp, meta, at_step, metric, reasons):
        if at_step == step:
            if phase == "write":
                checkpoint.sharded_checkpoint.write_meta = lambda directory, rest: die()
            else:
                die_once_listed(self)
        return finish_dcp(self, future, tmp, meta, at_step, metric, reasons)

    checkpoint.CheckpointManager._finish_dcp = finish


if __name__ == "__main__":
    step, phase, module, *args = sys.argv[1:]
    if phase not in ("write", "rename"):
        sys.exit(f"unknown phase {phase!r}")
    install(int(step), phase)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
