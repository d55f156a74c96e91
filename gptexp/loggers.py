"""Metrics: ``metrics.jsonl`` is the record; Weights & Biases mirrors it when asked.

``metrics.jsonl`` holds one JSON object per line, each with an integer ``step`` and flat
metric names (``train/loss``, ``val/loss``, ``lr``, ``throughput/tokens_per_s``). A resumed run
rewinds it to its checkpoint's step, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from gptexp.checkpoint import atomic_write_bytes
from gptexp.config import LoggerConfig

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class MetricsFile:
    """Appends step-stamped records to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def rewind(self, step: int) -> int:
        """Drop every record after ``step`` (atomically); returns how many were dropped."""
        records = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= step]
        if self.path.exists():
            atomic_write_bytes(self.path, "".join(_line(r) for r in kept).encode("utf-8"))
        return len(records) - len(kept)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._file.write(_line(record))
        self._file.flush()  # one line at a time: a crash loses at most the line in flight

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _line(record: dict[str, Any]) -> str:
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    return json.dumps(clean) + "\n"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_layer": 4}}`` -> ``{"model.n_layer": 4}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = value
    return flat


def wandb_mode(requested: str) -> str:
    """``auto`` is online only where W&B credentials are configured: never a hang."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return "online"
    return "offline"


# Trainer.summary() names -> W&B summary names distinct from the per-step metrics.
SUMMARY_NAMES = {
    "best/val/loss": "best/val_loss",
    "best/train/loss": "best/train_loss",
    "throughput/tokens_per_s": "throughput/median_tokens_per_s",
}


class WandbMirror:
    """Mirrors the metrics of one run to a W&B run whose id is kept with the run."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        run_id: str,
        config: dict[str, Any],
        name: str,
        group: str | None,
    ) -> None:
        import wandb

        self.mode = wandb_mode(cfg.mode)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or group,
            name=cfg.name or name,
            tags=list(cfg.tags),
            config=flatten(config),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=self.mode,
            settings=wandb.Settings(init_timeout=60, silent=True, console="off"),
        )
        self.run.define_metric("*", step_metric="trainer/step")
        log.info("W&B run %s (%s) in %s", run_id, self.mode, run_dir / "wandb")

    def log(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log({"trainer/step": record["step"], **values}, step=record["step"])

    def summary(self, values: dict[str, Any]) -> None:
        """The run's figures in W&B's run table; names that a logged metric also uses get their
        own (W&B would otherwise overwrite them with the metric's last value)."""
        for key, value in values.items():
            self.run.summary[SUMMARY_NAMES.get(key, key)] = value

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
