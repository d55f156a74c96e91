"""How the entry points report bad input and stops: one message, one exit code.

User errors (bad config, missing data, unusable checkpoint, busy run) print ``error: ...`` and
exit 2; a clean stop on a signal exits 130. Inside a Hydra multirun the exception is raised
instead, so the sweeper records the job as failed and the other jobs go on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from gptexp.trainer import USER_ERRORS, TrainingInterrupted

log = logging.getLogger("gptexp")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

T = TypeVar("T")


def report_errors(body: Callable[[], T], *, raise_instead: bool = False) -> T:
    """Run ``body``; turn user errors and signal stops into a message and an exit code."""
    try:
        return body()
    except USER_ERRORS as error:
        log.error("error: %s", error)
        if raise_instead:
            raise
        sys.exit(EXIT_USER_ERROR)
    except TrainingInterrupted as stop:
        log.warning("%s", stop)
        if raise_instead:
            raise
        sys.exit(EXIT_INTERRUPTED)
