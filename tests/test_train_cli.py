"""``python -m gptexp.train`` end to end: the run directory of DESIGN, and learning.

The read-only checks share the session's ``finished_run`` (a real subprocess run with the
FAST settings of conftest); the finer checks call the trainer in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from gptexp import train as train_entry
from gptexp.core.config import register_configs, to_train_config
from gptexp.data.tokenizers import tokenizer_from_json
from gptexp.observe.rundir import RunDirectory
from gptexp.run.session import run_training
from gptexp.run.starts import new_run
from tests.conftest import (
    CONF_DIR,
    FAST,
    FINISHED_RUN_OVERRIDES,
    ROOT,
    call_main,
    compose_config,
    read_metrics,
    subprocess_env,
    train,
)

RUN_FILES = [
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    "run.json",
    "metrics.jsonl",
    "checkpoints/manifest.json",
    "tokenizer.json",
    "train.log",
    "samples.txt",
]
# What a tqdm bar draws; plain log lines have none of it.
BAR_MARKS = ("\r", "█", "▏", "▎", "▍", "▌", "▋", "▊", "▉", "it/s]", "step/s]", "%|")


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_directory_has_every_file_of_design(finished_run, name):
    path = finished_run / name
    assert path.is_file(), f"{name} missing from the run directory"
    assert path.stat().st_size > 0


def test_hydra_files_record_the_config_and_the_overrides(finished_run):
    launched_with = [*FAST, *FINISHED_RUN_OVERRIDES]
    assert OmegaConf.load(finished_run / ".hydra/overrides.yaml") == launched_with
    stored = to_train_config(OmegaConf.load(finished_run / ".hydra/config.yaml"))
    assert stored == compose_config(launched_with)


def test_run_json_records_status_versions_commit_and_seed(finished_run):
    status = json.loads((finished_run / "run.json").read_text())
    assert status["status"] == "finished"
    assert status["seed"] == 1337
    assert "git_commit" in status  # None outside a git checkout, a commit here
    # these tests run gptexp from ROOT: its commit is the one to find, lost provenance fails
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # ROOT is no git checkout (an unpacked sdist)
        assert status["git_commit"] is None
    else:
        commit = re.escape(head.stdout.strip())
        assert re.fullmatch(rf"{commit}(-dirty)?", status["git_commit"] or ""), status["git_commit"]
    assert status["versions"]["torch"] == torch.__version__
    assert {"hydra", "omegaconf"} <= status["versions"].keys()
    assert status["started"] and status["ended"]
    assert status["step"] == status["max_steps"] == 20
    assert status["world_size"] == 1
    assert status["config"]["model"]["n_layer"] == 2


def test_metrics_are_step_stamped_flat_records(finished_run):
    records = read_metrics(finished_run)
    assert all(isinstance(r["step"], int) for r in records)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) == list(range(21))  # log_every=1: no gap, no repeat
    keys = set().union(*records)
    assert {"train/loss", "val/loss", "lr", "throughput/tokens_per_s"} <= keys
    for record in records:
        assert all(not isinstance(value, dict) for value in record.values())  # flat
    train_records = [r for r in records if "train/loss" in r]
    assert all(r["throughput/tokens_per_s"] > 0 and r["lr"] > 0 for r in train_records)


def test_validation_loss_goes_down(finished_run):
    val = {r["step"]: r["val/loss"] for r in read_metrics(finished_run) if "val/loss" in r}
    assert 0 in val and 20 in val
    assert val[20] < val[0] - 0.3


def test_checkpoint_manifest_lists_valid_checkpoints(finished_run):
    manifest = json.loads((finished_run / "checkpoints/manifest.json").read_text())
    entries = manifest["checkpoints"]
    assert entries and entries[-1]["step"] == 20  # the final step is always saved
    for entry in entries:
        path = finished_run / "checkpoints" / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    state = torch.load(finished_run / "checkpoints" / entries[-1]["file"], weights_only=True)
    assert state["step"] == 20
    assert "model" in state and state["config"]["model"]["n_layer"] == 2


def test_saved_tokenizer_reloads_and_decodes_the_samples(finished_run):
    tokenizer = tokenizer_from_json((finished_run / "tokenizer.json").read_text("utf-8"))
    assert tokenizer.vocab_size == json.loads((finished_run / "run.json").read_text())["vocab_size"]
    samples = (finished_run / "samples.txt").read_text(encoding="utf-8")
    assert samples.startswith("=== step 20\n")
    generated = samples.split("\n", 1)[1].rstrip("\n")
    assert tokenizer.decode(tokenizer.encode(generated)) == generated


def test_train_log_holds_the_progress_lines(finished_run):
    log = (finished_run / "train.log").read_text(encoding="utf-8")
    assert "step 0: val/loss" in log
    assert re.search(r"step 20/20 \| loss [\d.]+ \| val [\d.]+ \| tok/s [\d,]+ \| eta", log)


@pytest.mark.slow
def test_plain_log_lines_when_output_is_not_a_terminal(tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir, "training.max_steps=6", "training.log_every=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    lines = re.findall(
        r"^step (\d+)/6 \| loss [\d.]+ \| val [\d.]+ \| tok/s [\d,]+ \| eta \S+$",
        output,
        flags=re.MULTILINE,
    )
    assert lines == ["2", "4", "6"]
    for mark in BAR_MARKS:
        assert mark not in output


# ----------------------------------------------------------------------------- in-process


def test_run_training_returns_the_final_validation_loss(tmp_path):
    cfg = compose_config([*FAST, "training.max_steps=4", "training.eval_every=2"])
    run = RunDirectory(tmp_path / "run")
    result = run_training(cfg, run, new_run(cfg))
    records = read_metrics(run.path)
    assert isinstance(result, float)
    assert result == records[-1]["val/loss"]
    assert records[-1]["step"] == 4
    assert json.loads(run.run_json.read_text())["final/val_loss"] == result


def test_hydra_task_returns_the_validation_loss_for_sweepers(tmp_path):
    """What a Hydra sweeper (Optuna) receives from ``gptexp.train.train``."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            config_name="train",
            overrides=[*FAST, "training.max_steps=3", "checkpoint=none"],
            return_hydra_config=True,
        )
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # Hydra creates the run directory before it calls the task
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        result = train_entry.train(train_entry.task_config(cfg))  # Hydra drops its own node
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    assert isinstance(result, float) and math.isfinite(result)
    assert result == read_metrics(run_dir)[-1]["val/loss"]


def test_bf16_precision_trains_on_cpu(tmp_path):
    cfg = compose_config([*FAST, "training.precision=bf16", "training.max_steps=3"])
    run = RunDirectory(tmp_path / "run")
    result = run_training(cfg, run, new_run(cfg))
    assert math.isfinite(result)
    records = read_metrics(run.path)
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert json.loads(run.run_json.read_text())["status"] == "finished"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    code, stderr = call_main(
        train_entry.main, *FAST, "training.device=cuda", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert code == 2
    assert "training.device='cuda'" in stderr and "no CUDA device" in stderr
    assert "Traceback" not in stderr
    assert not run_dir.exists()


def test_a_launch_that_loses_the_race_for_a_new_directory_removes_nothing(tmp_path, monkeypatch):
    """Two launches into one new hydra.run.dir, interleaved deterministically: both pass
    validation, then the winner (this test) makes the directory, writes its files and takes
    the lock before the loser (``main`` in this process) reaches it."""
    run_dir = tmp_path / "run"
    winner = RunDirectory(run_dir)
    held = contextlib.ExitStack()
    validate = train_entry.ValidateBeforeRun.validate

    def winner_gets_there_first(config):
        validate(config)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("winner: true\n")
        winner.log_file.write_text("the winner's log\n")
        held.enter_context(winner.lock())

    monkeypatch.setattr(
        train_entry.ValidateBeforeRun, "validate", staticmethod(winner_gets_there_first)
    )
    with held:
        code, stderr = call_main(train_entry.main, *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert code == 2, stderr
        assert stderr.count("error:") == 1 and "being trained by a live process" in stderr
        assert winner.lock_file.is_file() and winner.is_locked()
        assert winner.log_file.read_text().startswith("the winner's log\n")
        assert winner.config_yaml.is_file()  # (Hydra's copy of the loser's config, not ours)
        assert not winner.has_started()
        # The winner goes on and finishes in the directory the loser left alone.
        cfg = compose_config([*FAST, "training.max_steps=2", "checkpoint=none"])
        run_training(cfg, winner, new_run(cfg), locked=True)
    assert json.loads(winner.run_json.read_text())["status"] == "finished"


def test_two_launches_into_one_new_directory_one_trains_one_is_refused(tmp_path):
    """The same, for real: two processes launched at once (whichever way they interleave)."""
    run_dir = tmp_path / "run"
    args = [*FAST, "training.max_steps=4", f"hydra.run.dir={run_dir}"]
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "gptexp.train", *args],
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    stderrs = [launch.communicate(timeout=180)[1] for launch in launches]
    results = sorted(
        (launch.returncode, err) for launch, err in zip(launches, stderrs, strict=True)
    )
    (won, _), (lost, refusal) = results
    assert (won, lost) == (0, 2), results
    assert refusal.count("error:") == 1 and "Traceback" not in refusal, refusal
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 4
    for name in (".hydra/config.yaml", "train.log", ".lock", "checkpoints/manifest.json"):
        assert (run_dir / name).is_file(), name


def test_the_write_check_of_one_rank_removes_no_folder_another_rank_made(tmp_path, monkeypatch):
    """Under torchrun every rank checks that .hydra/ can be written, at once: a rank that finds
    the run directory made by another one in between neither fails nor removes it."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from gptexp.train import ValidateBeforeRun

    run_dir = tmp_path / "run"
    config = OmegaConf.create(
        {"hydra": {"run": {"dir": str(run_dir)}, "output_subdir": ".hydra"}, "model": {}}
    )
    real_mkdir = Path.mkdir

    def other_rank_first(self, *args, **kwargs):
        if self == run_dir:  # the other rank made it just after this one looked
            real_mkdir(self, *args, **kwargs)
            raise FileExistsError(str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_rank_first)
    ValidateBeforeRun.check_writable(config)
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert run_dir.is_dir() and (run_dir / ".hydra").is_dir()
    assert list((run_dir / ".hydra").iterdir()) == []  # the probe is gone
