"""The optional Weights & Biases mirror of ``metrics.jsonl``.

The run directory is the record; W&B mirrors it and must never cost the run: the online/offline
choice is made in seconds (credentials, then a short connection check), a failing W&B start
falls back to offline with one warning, and a mirror that fails mid-run is switched off with
one warning while training goes on.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gptexp.core.config import LoggerConfig
from gptexp.observe.metrics import EVENT, STEP, flatten, is_number

log = logging.getLogger(__name__)

REACHABILITY_TIMEOUT_S = 3.0


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def server_reachable(timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds: without
    it, wandb.init waits a minute and then fails the run."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: str) -> str:
    """``auto`` is online only where credentials are configured and the server answers;
    ``online`` with no route to the server falls back to offline. Never a hang."""
    mode = os.environ.get("WANDB_MODE") or requested
    if mode == "auto":
        mode = "online" if has_credentials() else "offline"
    if mode == "online" and not server_reachable():
        log.warning(
            "W&B: the server cannot be reached; mirroring offline into the run directory "
            "(upload later with wandb sync)"
        )
        mode = "offline"
    return mode


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
        fork_from: str | None = None,
    ) -> None:
        """``fork_from`` (``"<parent id>?_step=<step>"``): a fork's first start, drawn online
        from its parent's history where the SDK and server support it."""
        import wandb

        self.mode = wandb_mode(cfg.mode)
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or group,
            name=cfg.name or name,
            tags=list(cfg.tags),
            config=flatten(config),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            settings=wandb.Settings(init_timeout=30, silent=True, console="off"),
        )
        self.run = self._start_fork(wandb, fork_from, kwargs) if fork_from else None
        try:
            if self.run is None:
                self.run = wandb.init(mode=self.mode, **kwargs)
        except (wandb.errors.Error, OSError) as error:
            if self.mode == "offline":
                raise
            log.warning("W&B: online start failed (%s); mirroring offline", _first_line(error))
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, **kwargs)
        self.run.define_metric("*", step_metric="trainer/step")
        self._errors = (wandb.errors.Error, OSError)
        self.failed = False
        log.info("W&B run %s (%s) in %s", run_id, self.mode, run_dir / "wandb")

    def _start_fork(self, wandb, fork_from: str, kwargs: dict[str, Any]):
        """The W&B run started with ``fork_from`` (online only), or None: then the fork is an
        ordinary W&B run whose config names its parent."""
        if self.mode != "online":
            return None
        try:
            # fork_from cannot go with resume; a later resume of the fork uses its own id.
            fork_kwargs = {k: v for k, v in kwargs.items() if k != "resume"}
            return wandb.init(mode=self.mode, fork_from=fork_from, **fork_kwargs)
        except (wandb.errors.Error, OSError, TypeError, ValueError) as error:
            log.info("W&B: fork_from not available (%s); a run of its own", _first_line(error))
            return None

    def _guarded(self, action, *args, **kwargs) -> None:
        """Run a W&B call; the first failure switches the mirror off, training goes on."""
        if self.failed:
            return
        try:
            action(*args, **kwargs)
        except self._errors as error:
            self.failed = True
            log.warning("W&B mirror stopped (%s); metrics.jsonl goes on", _first_line(error))

    def log(self, record: dict[str, Any]) -> None:
        if EVENT in record:  # an event (a guard's spike) is an alert, not a metric
            details = ", ".join(f"{k} {v}" for k, v in record.items() if k != EVENT)
            self.alert(f"gptexp: {record[EVENT]} at step {record[STEP]}", details)
            return
        values = {k: v for k, v in record.items() if k != STEP and is_number(v)}
        self._guarded(self.run.log, {"trainer/step": record[STEP], **values}, step=record[STEP])

    def summary(self, values: dict[str, Any]) -> None:
        """The run's figures in W&B's run table (values that are None are left out)."""
        for key, value in values.items():
            if value is not None:
                self._guarded(self.run.summary.__setitem__, key, value)

    def alert(self, title: str, text: str) -> None:
        self._guarded(self.run.alert, title=title, text=text)

    def finish(self, exit_code: int = 0) -> None:
        self._guarded(self.run.finish, exit_code=exit_code)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]
