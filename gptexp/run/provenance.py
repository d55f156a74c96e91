"""Provenance: the facts run.json records about where a run was made (host, process, library
versions, the git commit of the gptexp source tree), asked for without slowing its start."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def git_commit() -> str | None:
    """The commit of the gptexp source tree (with ``-dirty`` for local changes), if any."""
    source = Path(__file__).resolve().parents[1]  # the gptexp package
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


class PendingGitCommit:
    """The source tree's commit (:func:`git_commit`), asked for in a background thread when a
    run starts, so that training does not wait for git's subprocesses; one per run."""

    def __init__(self) -> None:
        self._answer: dict[str, str | None] = {}
        self._thread = threading.Thread(target=self._ask, name="gptexp-git-commit", daemon=True)
        self._thread.start()

    def _ask(self) -> None:
        self._answer["commit"] = git_commit()

    def result(self) -> str | None:
        self._thread.join(timeout=15)  # git_commit's own subprocess timeouts are 2 x 5 s
        return self._answer.get("commit")


def environment(git: PendingGitCommit | None = None) -> dict[str, Any]:
    """Host, process and library facts recorded in run.json; the git commit from ``git`` (a
    run's own question, asked when it started) or, without it, asked now."""
    import hydra
    import numpy
    import omegaconf
    import torch

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            "torch": torch.__version__,
            "hydra": hydra.__version__,
            "omegaconf": omegaconf.__version__,
            "numpy": numpy.__version__,
        },
        "git_commit": git.result() if git is not None else git_commit(),
        "argv": sys.argv,
        "mkl_cbwr": os.environ.get("MKL_CBWR"),  # bit-exactness on busy cores: training.speed
    }
