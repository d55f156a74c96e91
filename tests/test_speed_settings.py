"""Speed settings of a run: training.compile=auto|true|false, malloc's thresholds, the git
provenance collected in the background."""

from __future__ import annotations

import logging
import platform

import pytest

from gptexp.core.config import TrainingConfig, to_train_config
from gptexp.core.errors import ConfigError
from gptexp.training.compile_policy import COMPILE_BREAK_EVEN_STEPS, should_compile
from tests.conftest import compose_config


@pytest.mark.parametrize(
    ("given", "stored"),
    [("auto", "auto"), (True, "true"), (False, "false"), ("true", "true"), ("False", "false")],
)
def test_training_compile_accepts_auto_and_booleans(given, stored):
    assert TrainingConfig(compile=given).compile == stored


def test_training_compile_from_the_command_line_and_from_a_stored_config():
    assert compose_config([]).training.compile == "auto"
    assert compose_config(["training.compile=true"]).training.compile == "true"
    assert compose_config(["training.compile=false"]).training.compile == "false"
    # A run directory's stored config from before the change holds a bool.
    assert to_train_config({"training": {"compile": False}}).training.compile == "false"


def test_training_compile_rejects_other_values():
    with pytest.raises(ConfigError, match="training.compile='maybe': must be one of auto"):
        TrainingConfig(compile="maybe")


def test_auto_compiles_only_when_the_steps_left_repay_the_compile(caplog):
    long = TrainingConfig(compile="auto", max_steps=COMPILE_BREAK_EVEN_STEPS + 100)
    with caplog.at_level(logging.INFO, logger="gptexp.training.compile_policy"):
        assert should_compile(long, step=0) is True
        assert should_compile(long, step=200) is False  # a resumed run has fewer steps left
    assert "training.compile=auto: compiling" in caplog.text
    left = COMPILE_BREAK_EVEN_STEPS - 100
    assert f"training.compile=auto: not compiling ({left} steps to go" in caplog.text
    short = TrainingConfig(compile="auto", max_steps=150)
    assert should_compile(short, step=0) is False
    assert should_compile(TrainingConfig(compile="true", max_steps=150), step=0) is True
    assert should_compile(TrainingConfig(compile="false", max_steps=10**6), step=0) is False


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_keep_freed_memory_stops_the_page_faults_of_each_step():
    """In a child process (the setting is for the whole process): after it, repeating an
    allocation of 8 MB (an activation of model=tiny) faults no pages in."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from gptexp.training.speed import keep_freed_memory\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(20):\n"
        "        torch.ones(2 * 1024 * 1024).sum()\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "default = faults()\n"
        "assert keep_freed_memory()\n"
        "faults()\n"
        "print(default, faults())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    default, kept = map(int, result.stdout.split())
    # glibc's defaults give freed pages back (mmap, then heap trimming): they fault in again.
    assert default > 2000
    assert kept * 10 < default


def test_git_commit_is_collected_from_the_background(monkeypatch):
    from gptexp.run import provenance as run_module

    calls = []
    monkeypatch.setattr(run_module, "git_commit", lambda: calls.append(1) or "abc123-dirty")
    pending = run_module.PendingGitCommit()  # a run asks when it starts
    assert run_module.environment(pending)["git_commit"] == "abc123-dirty"
    assert calls == [1]
    # Each run asks its own question: another run's answer is never reused.
    assert run_module.environment(run_module.PendingGitCommit())["git_commit"] == "abc123-dirty"
    assert calls == [1, 1]
    # Without a question asked at the start, environment() asks git itself.
    assert run_module.environment()["git_commit"] == "abc123-dirty"
    assert calls == [1, 1, 1]
