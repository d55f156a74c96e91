"""``python -m gptexp.tools.bench.probe OUT.json MODULE [args...]``: run
``python -m MODULE args...`` and write the wall-clock instants (``time.time()``) of its phases
to OUT.json.

The bench launches every gptexp command it times through this probe, so that the whole-process
wall time comes with its breakdown. The probe changes no code: it wraps a few functions of the
already imported modules (a wrapper costs about a microsecond per call; one call per phase or
step) and records when each returns. Marks: ``started`` (this module's first line: the
interpreter's own start-up is launch to here), ``torch_imported``, ``entry_imported``, then
``corpus_start``/``corpus_end``, ``trainer_built``, ``status_start``/``status_end`` (run.json
and provenance), ``step_ends`` (one per optimizer step), ``eval_start``/``eval_end``,
``sample_start``/``sample_end``, ``run_end`` and ``exit`` (the interpreter's atexit handlers
run: what is left after it is teardown). ``train_logs`` holds [step, instant] for every train
record written to ``metrics.jsonl``: its loss has been read back from the device, so on a GPU
these are the instants at which the work queued up to that step had finished (the step ends
are the host's, which may run ahead of the GPU).
"""

from __future__ import annotations

import time

STARTED = time.time()

import atexit  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

marks: dict[str, Any] = {"started": STARTED, "step_ends": [], "train_logs": []}


def _mark(name: str) -> None:
    marks.setdefault(name, time.time())  # the first occurrence (a sweep would have several)


def _timed(fn: Callable, start: str | None, end: str | None, steps: bool = False) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if start:
            _mark(start)
        result = fn(*args, **kwargs)
        if steps:
            marks["step_ends"].append(time.time())
        elif end:
            _mark(end)
        return result

    return wrapper


def instrument() -> None:
    """Wrap the phases of a run in the modules the entry points use."""
    # The entry modules run afresh as __main__ and import run_training from gptexp.run.session,
    # so they get the wrappers.
    import gptexp.observe.metrics as metrics
    import gptexp.run.session as session
    import gptexp.run.starts as starts
    import gptexp.training.trainer as trainer

    log = metrics.MetricsFile.log

    @functools.wraps(log)
    def logged(self: Any, record: dict[str, Any]) -> None:
        log(self, record)
        if metrics.TRAIN_LOSS in record:
            marks["train_logs"].append([record[metrics.STEP], time.time()])

    metrics.MetricsFile.log = logged
    session.run_training = _timed(session.run_training, "run_start", "run_end")
    starts.prepare_corpus = _timed(starts.prepare_corpus, "corpus_start", "corpus_end")
    trainer.Trainer.__init__ = _timed(trainer.Trainer.__init__, None, "trainer_built")
    trainer.Trainer.train_step = _timed(trainer.Trainer.train_step, None, None, steps=True)
    session.record_start = _timed(session.record_start, "status_start", "status_end")
    trainer.Trainer.evaluate = _timed(trainer.Trainer.evaluate, "eval_start", "eval_end")
    trainer.Trainer.write_sample = _timed(
        trainer.Trainer.write_sample, "sample_start", "sample_end"
    )


def write(path: str) -> None:
    _mark("exit")
    with open(path, "w") as f:
        json.dump(marks, f)


def main() -> None:
    if len(sys.argv) < 3:
        print(
            "usage: python -m gptexp.tools.bench.probe OUT.json MODULE [args...]", file=sys.stderr
        )
        sys.exit(2)
    out, module = sys.argv[1], sys.argv[2]
    import torch  # noqa: F401  (timed alone: the floor every PyTorch program pays)

    _mark("torch_imported")
    instrument()
    _mark("entry_imported")
    atexit.register(write, out)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
