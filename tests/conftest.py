"""Shared test helpers: real configs composed with Hydra, real entry points as subprocesses.

Everything runs on the CPU, offline, with one torch thread (bit-exactness depends on the
thread count), and writes only under pytest's tmp_path.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptexp.core.config import CONF_DIR, compose_config  # noqa: F401 (tests import them from here)

ROOT = Path(__file__).resolve().parent.parent

# A run of a few seconds: nano model, tiny batches, frequent evaluation and checkpoints.
FAST = [
    "model=nano",
    "training=debug",
    "training.num_threads=1",
    "training.device=cpu",
]


@pytest.fixture(autouse=True)
def _offline_and_isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("GPTEXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def make_trainer(cfg, run_dir: Path, dist_ctx=None, state=None, sinks=()):
    """A Trainer in this process for ``cfg``, its corpus prepared as the session does."""
    from gptexp.observe.rundir import RunDirectory
    from gptexp.run.starts import run_corpus
    from gptexp.training.runtime import Distributed
    from gptexp.training.trainer import Trainer

    run = RunDirectory(run_dir)
    corpus = run_corpus(cfg, run, state)
    return Trainer(cfg, run, dist_ctx or Distributed(), corpus, state, sinks=sinks)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        WANDB_MODE=env.get("WANDB_MODE", "offline"),
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def run_module(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` in ``cwd``; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train(
    run_dir: Path, *overrides: str, cwd: Path, env=None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """A real ``python -m gptexp.train`` into ``run_dir`` with the FAST settings."""
    return run_module(
        "gptexp.train",
        *FAST,
        *overrides,
        f"hydra.run.dir={run_dir}",
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def wait_until(
    condition,
    *,
    timeout: float = 120,
    process: subprocess.Popen | None = None,
    what: str = "",
    output: Path | None = None,
) -> None:
    """Poll ``condition()`` until it holds; fail when ``process`` ends first or after
    ``timeout`` seconds (a guard against a hang, not a speed requirement). ``output``: the file
    ``process`` writes to, whose tail a failure shows."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            tail = output.read_text(errors="replace")[-3000:] if output else ""
            raise AssertionError(f"process ended (rc {process.returncode}) before {what}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        time.sleep(0.05)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


FINISHED_RUN_OVERRIDES = ["checkpoint.every_steps=10"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """One finished FAST run shared by read-only tests (eval, export, compare).

    20 steps, evaluated at 10 and 20, with periodic checkpoints at steps 10 and 20.
    """
    base = tmp_path_factory.mktemp("shared_run")
    run_dir = base / "run"
    result = train(run_dir, *FINISHED_RUN_OVERRIDES, cwd=base)
    assert result.returncode == 0, result.stderr
    return run_dir


def call_main(main, *args: str, cwd: Path | None = None) -> tuple[int, str]:
    """An entry point's ``main()`` in this process (no interpreter start-up): exit code and
    stderr. Each entry point keeps tests with a process of their own (bad input included).

    ``cwd``: the directory the command runs in. What a command sets for its whole process
    (the root logger's handlers and level, which Hydra configures; torch's thread count; the
    environment; the objects frozen for the garbage collector) is put back afterwards: the
    tests after it see this process as it was."""
    import torch

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads, environ = torch.get_num_threads(), dict(os.environ)
    frozen_before = gc.get_freeze_count()
    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        patch.setattr(sys, "argv", ["gptexp", *args])
        stderr = io.StringIO()
        patch.setattr(sys, "stderr", stderr)
        try:
            main()
        except SystemExit as stop:
            return int(stop.code or 0), stderr.getvalue()
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            torch.set_num_threads(threads)
            for key in os.environ.keys() - environ.keys():
                del os.environ[key]
            os.environ.update(environ)
            if frozen_before == 0:
                gc.unfreeze()  # frozen objects would never be collected as cycles
    return 0, stderr.getvalue()


def files_of(run_dir: Path, skip: str | None = None) -> dict[str, str]:
    """Every file of the run with its sha256 (``skip``: a top-level folder left out)."""
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.relative_to(run_dir).parts[0] != skip
    }


def torchrun(module: str, *args: str, env=None, crash: str | None = None):
    """torchrun over ``module``; ``crash`` ("STEP:PHASE"): through tests/crashing_save.py."""
    target = ["-m", module]
    if crash:
        step, phase = crash.split(":")
        target = [str(ROOT / "tests" / "crashing_save.py"), step, phase, module]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *target,
            *args,
        ],
        cwd=ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


# PyTorch's teardown can, rarely, abort a rank after its work is done (a C++ thread destroyed
# while joinable). gptexp drops the DDP wrapper and passes a barrier before destroying the
# process group, the known remedy; should the abort still happen, it is
# told apart from a failure by the run having finished and recorded it.
EXIT_ABORT = "terminate called without an active exception"


def assert_finished(result: subprocess.CompletedProcess, run_dir: Path) -> None:
    if result.returncode != 0:
        status = json.loads((run_dir / "run.json").read_text()).get("status")
        assert EXIT_ABORT in result.stderr and status == "finished", result.stderr[-3000:]


def sweep(sweep_dir: Path, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """A real ``python -m gptexp.train -m`` multirun into ``sweep_dir`` (FAST settings)."""
    return run_module(
        "gptexp.train", "-m", *FAST, *overrides, f"hydra.sweep.dir={sweep_dir}", cwd=cwd
    )


def policy(**overrides):
    """A checkpoint policy for the checkpoint tests: every 10 steps, 2 kept, best 1, sync."""
    from gptexp.core.config import CheckpointConfig

    base = dict(every_steps=10, keep_last=2, keep_best=1, keep_every=0, async_save=False)
    return CheckpointConfig(**(base | overrides))


def fake_state(step: int) -> dict:
    """A small checkpoint-shaped state whose tensors encode ``step``."""
    import torch

    return {
        "format_version": 1,
        "model": {"w": torch.full((4, 4), float(step)), "b": torch.arange(step + 1.0)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3) * step}}, "param_groups": []},
        "step": step,
        "rng": [{"torch": torch.get_rng_state()}],
        "config": {"model": {"n_layer": 2}},
    }
