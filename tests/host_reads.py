"""Count the host reads of tensors that gptexp's own code makes, by training attempt.

    python tests/host_reads.py OUT MODULE [ARGS...]

runs MODULE (``gptexp.train``, under torchrun on every rank) with the counter installed and
writes ``OUT.<rank>.json``: the attempts at an update, the attempts after which the trainer
synced, and every read (method, where, and the phase: ``start`` before the first attempt,
``train_step`` inside attempt n, ``after`` between attempt n and the next).

A read is a call of one of :data:`READS` on a tensor, on the training (main) thread, whose
caller is a file of the gptexp package (torch's own reads are torch's; the background
checkpoint writer checks its own CPU snapshot, not the device's tensors). The patches are
the test side's: the product has no hook for this.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import gptexp
from gptexp.training.trainer import Trainer

READS = ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy")
PACKAGE = str(Path(gptexp.__file__).resolve().parent) + os.sep


class ReadCounter:
    def __init__(self) -> None:
        self.phase: tuple[str, int] = ("start", 0)
        self.attempts = 0
        self.synced: list[int] = []  # attempts after which Trainer.sync read something
        self.reads: list[dict[str, Any]] = []

    def install(self, patch: Callable[[Any, str, Any], None]) -> None:
        """Patch torch.Tensor's read methods and the Trainer's attempt with ``patch(owner,
        name, value)`` (pytest's monkeypatch.setattr, or setattr)."""
        for name in READS:
            patch(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        train_step, sync = Trainer.train_step, Trainer.sync

        def counted_step(trainer: Trainer, *args: Any, **kwargs: Any) -> Any:
            self.attempts += 1
            self.phase = ("train_step", self.attempts)
            try:
                return train_step(trainer, *args, **kwargs)
            finally:
                self.phase = ("after", self.attempts)

        def counted_sync(trainer: Trainer) -> Any:
            if trainer.pending:
                self.synced.append(self.attempts)
            return sync(trainer)

        patch(Trainer, "train_step", counted_step)
        patch(Trainer, "sync", counted_sync)

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            training = threading.current_thread() is threading.main_thread()
            if training and caller.f_code.co_filename.startswith(PACKAGE):
                where = f"{caller.f_code.co_filename[len(PACKAGE) :]}:{caller.f_lineno}"
                self.reads.append({"phase": list(self.phase), "method": name, "where": where})
            return original(tensor, *args, **kwargs)

        return read

    def reads_after(self, attempt: int) -> list[dict[str, Any]]:
        """The reads made inside attempt ``attempt`` and between it and the next one."""
        return [r for r in self.reads if r["phase"][1] == attempt and r["phase"][0] != "start"]

    def unsynced_reads(self) -> list[dict[str, Any]]:
        """Reads inside an attempt, or after one the trainer did not sync at."""
        return [
            r
            for r in self.reads
            if r["phase"][0] == "train_step"
            or (r["phase"][0] == "after" and r["phase"][1] not in self.synced)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "synced": self.synced, "reads": self.reads}


if __name__ == "__main__":
    out, module, *args = sys.argv[1:]
    counter = ReadCounter()
    counter.install(setattr)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        rank = os.environ.get("RANK", "0")
        Path(f"{out}.{rank}.json").write_text(json.dumps(counter.to_dict()))
