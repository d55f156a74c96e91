"""``python -m gptexp.resume run=<run dir> [key=value ...]``: continue a run where it stopped.

The run continues in its own directory, with its own stored config (not today's
``gptexp/conf``), from its newest valid checkpoint. Hydra is not relaunched, so ``.hydra/``
stays exactly as the run's launch wrote it. ``key=value`` overrides may change how training
goes on (``training.max_steps=6000`` extends a finished run; ``data.path=<new place>`` finds
a moved corpus, checked by its sha256); changes that cannot apply to the checkpoints (the
model's shape, the data, the tokenizer) are refused with a diff.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from gptexp.core.cli import command_logging, parse_options, run_command
from gptexp.core.config import CONFIG_KEYS
from gptexp.core.errors import resume_hint
from gptexp.observe.metrics import FINAL_VAL_LOSS
from gptexp.observe.rundir import require_run
from gptexp.run.session import already_finished, resume_config, run_training
from gptexp.run.starts import Resume
from gptexp.training.runtime import Distributed
from gptexp.training.speed import prepare_command_process

USAGE = "usage: python -m gptexp.resume run=<run dir> [key=value ...]"


@dataclass
class ResumeOptions:
    CONFIG_KEYS: ClassVar[frozenset[str]] = CONFIG_KEYS  # model=small: an override (refused)

    run: str = field(metadata={"help": "the run directory"})
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "help": "any key of the run's stored config, e.g. training.max_steps=6000 "
            "training.lr=3e-4 data.path=<moved corpus>"
        },
    )


def resume(argv: list[str]) -> float | None:
    options = parse_options(argv, ResumeOptions, USAGE)
    overrides = options.overrides
    run = require_run(options.run)
    cfg, changes = resume_config(run, overrides)
    if already_finished(run, cfg):
        # Nothing to do, so nothing is touched (not even train.log).
        step = run.read_status()["step"]
        print(
            f"{run.path}: already finished at step {step}; extend it with "
            + resume_hint(run.path, "training.max_steps=N"),
            file=sys.stderr,
        )
        return run.read_status().get(FINAL_VAL_LOSS)
    note = {"overrides": overrides, "changes": {k: list(v) for k, v in changes.items()}}
    # The same W&B run again: its id comes from the checkpoint, its group and name from run.json
    # (or, for a run killed before it recorded them, from what its launch changed).
    status = run.read_status()
    wandb_group = status.get("wandb_group")
    wandb_name = status.get("wandb_name", ",".join(run.overrides()) or None)
    is_main = Distributed.from_env().is_main
    # The lock first: a busy or read-only run is refused before train.log is touched.
    with (
        run.lock() if is_main else contextlib.nullcontext(),
        command_logging(run.log_file if is_main else None),
    ):
        return run_command(
            lambda: run_training(
                cfg,
                run,
                Resume(note),
                wandb_group=wandb_group,
                wandb_name=wandb_name,
                locked=True,
            )
        )


def main() -> None:
    prepare_command_process()  # gptexp.training.speed: reproducible matmuls, a quiet collector
    run_command(lambda: resume(sys.argv[1:]))


if __name__ == "__main__":
    main()
