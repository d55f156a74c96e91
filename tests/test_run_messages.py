"""What a restart says about the records it drops from metrics.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gptexp.observe.rundir import RunDirectory
from gptexp.run.starts import rewind_metrics


def write_records(path: Path, steps: list[int]) -> None:
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in steps))


def test_the_rewind_message_names_the_step_or_says_there_was_no_checkpoint(tmp_path, caplog):
    run = RunDirectory(tmp_path)
    caplog.set_level(logging.INFO, logger="gptexp.run.starts")
    write_records(run.metrics, [1, 2, 3, 4])
    rewind_metrics(run, None)  # no checkpoint: training starts again from step 0
    write_records(run.metrics, [1, 2, 3, 4])
    rewind_metrics(run, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "metrics.jsonl: dropped 4 records (all of them: no checkpoint, training starts again "
        "from step 0)",
        "metrics.jsonl: dropped 2 records (logged after step 2)",
    ]
    assert not any("None" in m for m in messages)
