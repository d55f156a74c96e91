"""Run ``python -m gptexp.train ARGS...`` and press Ctrl-C twice: SIGINT at step 3, and again
while the checkpoint the first one asked for is being saved.

    python tests/double_interrupt.py ARGS...

The signals are sent from here, on the test side, by patching the trainer's progress report
and the checkpoint manager's save in this process before the command starts; the product has
no hook for it.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

import gptexp.checkpoint.manager as checkpoint
import gptexp.training.trainer as trainer

FIRST_AT_STEP = 3


def press_ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


report = trainer.Trainer._report


def report_then_interrupt(self, *args, **kwargs):
    report(self, *args, **kwargs)
    if self.state.step == FIRST_AT_STEP:
        press_ctrl_c()


save = checkpoint.CheckpointManager.save


def save_interrupted(self, state, step, metric, reasons, **kwargs):
    if "signal" in reasons:
        press_ctrl_c()  # the second Ctrl-C, during the save the first one asked for
    return save(self, state, step, metric, reasons, **kwargs)


trainer.Trainer._report = report_then_interrupt
checkpoint.CheckpointManager.save = save_interrupted
sys.argv = ["gptexp.train", *sys.argv[1:]]
runpy.run_module("gptexp.train", run_name="__main__", alter_sys=True)
