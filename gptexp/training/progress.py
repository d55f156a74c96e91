"""What a person watching a run sees: a progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

from gptexp.core.cli import FILE_ONLY

log = logging.getLogger("gptexp.training.trainer")


class Progress:
    """A tqdm bar on a terminal; plain log lines (every ``log_every`` steps) elsewhere.

    Only rank 0 reports; ``bar=False`` keeps the plain lines even on a terminal. With a bar the
    plain lines still go to train.log.
    """

    def __init__(self, shown: bool, bar: bool, start: int, total: int) -> None:
        self.shown = shown
        self.bar = None
        if shown and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.start_time = time.perf_counter()
        self.start_step = start
        self.total = total

    @property
    def is_bar(self) -> bool:
        return self.bar is not None

    def update(self, step: int, postfix: dict[str, str]) -> None:
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        fields = " | ".join(f"{k} {v}" for k, v in postfix.items())
        log.info(
            "step %d/%d | %s | eta %s",
            step,
            self.total,
            fields,
            duration(eta),
            extra={FILE_ONLY: self.bar is not None},
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 thread``, ``2 threads`` (``many``: an irregular plural, e.g. processes)."""
    return f"{count} {word if count == 1 else many or word + 's'}"
