"""``python -m gptexp.resume run=<run dir> [key=value ...]``: continue a run where it stopped.

The run continues in its own directory, with its own stored config (not today's
``gptexp/conf``), from its newest valid checkpoint. Hydra is not relaunched, so ``.hydra/``
stays exactly as the run's launch wrote it. ``key=value`` overrides may change how training
goes on (``training.max_steps=6000`` extends a finished run; ``data.path=<new place>`` finds
a moved corpus, checked by its sha256); changes that cannot apply to the checkpoints (the
model's shape, the data, the tokenizer) are refused with a diff.
"""

from __future__ import annotations

import sys

from gptexp.cli import command_logging, run_command
from gptexp.errors import ConfigError
from gptexp.metrics import FINAL_VAL_LOSS
from gptexp.process_tuning import freeze_imported_objects, reproducible_blas
from gptexp.rundir import require_run
from gptexp.runtime import Distributed
from gptexp.session import already_finished, resume_config, run_training

USAGE = "usage: python -m gptexp.resume run=<run dir> [key=value ...]"


def split_args(argv: list[str]) -> tuple[str, list[str]]:
    """``run=<dir>`` and the config overrides (``key.path=value``) that follow it."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(
            f"{USAGE}\n\nkeys: run (required), then any key of the run's stored config, "
            "e.g. training.max_steps=6000 training.lr=3e-4 data.path=<moved corpus>"
        )
        sys.exit(0)
    runs = [a for a in argv if a.startswith("run=")]
    if len(runs) != 1:
        raise ConfigError(f"run=<dir> is required (once)\n{USAGE}")
    return runs[0].removeprefix("run="), [a for a in argv if not a.startswith("run=")]


def resume(argv: list[str]) -> float | None:
    path, overrides = split_args(argv)
    run = require_run(path)
    cfg, changes = resume_config(run, overrides)
    if already_finished(run, cfg):
        # Nothing to do, so nothing is touched (not even train.log).
        step = run.read_status()["step"]
        print(
            f"{run.path}: already finished at step {step}; extend it with "
            f'make resume RUN={run.path} ARGS="training.max_steps=N"',
            file=sys.stderr,
        )
        return run.read_status().get(FINAL_VAL_LOSS)
    note = {"overrides": overrides, "changes": {k: list(v) for k, v in changes.items()}}
    # The same W&B run again: its id comes from the checkpoint, its group and name from run.json
    # (or, for a run killed before it recorded them, from what its launch changed).
    status = run.read_status()
    wandb_group = status.get("wandb_group")
    wandb_name = status.get("wandb_name", ",".join(run.overrides()) or None)
    with command_logging(run.log_file if Distributed.from_env().is_main else None):
        return run_command(
            lambda: run_training(
                cfg,
                run,
                resume=True,
                resume_note=note,
                wandb_group=wandb_group,
                wandb_name=wandb_name,
            )
        )


def main() -> None:
    reproducible_blas()  # gptexp.process_tuning: before the first matmul, which reads it
    freeze_imported_objects()
    run_command(lambda: resume(sys.argv[1:]))


if __name__ == "__main__":
    main()
