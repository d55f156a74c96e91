"""Run a gptexp command whose training loss is multiplied by a factor on chosen batches.

    python tests/spiking_launcher.py BATCH:FACTOR[,BATCH:FACTOR...] MODULE [ARGS...]

BATCH is a batch index (the ``step`` argument the trainer passes to ``train_batch``); FACTOR
is a number, ``nan`` or ``inf``. The loss of every micro-batch drawn for that index is
multiplied, so its gradient is too: a bad batch, as the guard sees one. MODULE may be another
launcher (``tests.crashing_save``) to combine faults. The
spike is forced here, on the test side, by patching this process before the command starts;
the product has no hook for it. Evaluation batches are never touched.
"""

from __future__ import annotations

import runpy
import sys

import gptexp.model.gpt as model
import gptexp.training.trainer as trainer


def install(factors: dict[int, float], patch=setattr) -> None:
    """Multiply the loss of the batches of ``factors``; ``patch(owner, name, value)`` sets the
    patches (pytest's monkeypatch.setattr in a test's own process)."""
    train_batch = trainer.train_batch
    forward = model.GPT.forward
    pending: list[float] = []  # the factor for the next forward pass (a training batch's)

    def sample(*args, **kwargs):
        pending[:] = [factors[kwargs["step"]]] if kwargs["step"] in factors else []
        return train_batch(*args, **kwargs)

    def spiking_forward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if pending and loss is not None:
            loss = loss * pending.pop()
        return logits, loss

    patch(trainer, "train_batch", sample)
    patch(model.GPT, "forward", spiking_forward)


if __name__ == "__main__":
    spec, module, *args = sys.argv[1:]
    install({int(b): float(f) for b, f in (item.split(":") for item in spec.split(","))})
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
