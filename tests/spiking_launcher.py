"""Run a gptexp command whose training loss is multiplied by a factor on chosen batches.

    python tests/spiking_launcher.py BATCH:FACTOR[,BATCH:FACTOR...] MODULE [ARGS...]

BATCH is a batch index (the one the trainer's attempt at an update trains on); FACTOR is a
number, ``nan`` or ``inf``. The loss of every micro-batch of that attempt is multiplied, so its
gradient is too: a bad batch, as the guard sees one. MODULE may be another launcher
(``tests.crashing_save``) to combine faults. The spike is forced here, on the test side, by
patching this process before the command starts; the product has no hook for it. Evaluation
batches are never touched.

The factor is chosen by the attempt, not when a batch is built: the trainer builds the next
update's batches ahead (gptexp.data.prefetch), before the evaluation or the sample of the step
in between, and builds all of an update's micro-batches at once.
"""

from __future__ import annotations

import runpy
import sys

import gptexp.model.gpt as model
import gptexp.training.trainer as trainer


def install(factors: dict[int, float], patch=setattr) -> None:
    """Multiply the loss of the batches of ``factors``; ``patch(owner, name, value)`` sets the
    patches (pytest's monkeypatch.setattr in a test's own process)."""
    train_step = trainer.Trainer.train_step
    forward = model.GPT.forward
    factor: list[float] = []  # the factor of the attempt under way, if its batch has one

    def spiking_step(self, *args, **kwargs):
        index = self.state.guard.next_batch(self.state.data_step)  # the batch it trains on
        factor[:] = [factors[index]] if index in factors else []
        try:
            return train_step(self, *args, **kwargs)
        finally:
            factor.clear()

    def spiking_forward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if factor and loss is not None:
            loss = loss * factor[0]
        return logits, loss

    patch(trainer.Trainer, "train_step", spiking_step)
    patch(model.GPT, "forward", spiking_forward)


if __name__ == "__main__":
    spec, module, *args = sys.argv[1:]
    install({int(b): float(f) for b, f in (item.split(":") for item in spec.split(","))})
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
