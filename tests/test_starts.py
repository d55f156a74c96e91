"""The start protocol (gptexp.run.starts): each kind of start gives the session what it needs (the
corpus, the starting state, imported weights, run.json's fields, W&B's fork point), and a new
kind of start is a new class that the session runs without a change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gptexp.run.starts as starts
from gptexp.checkpoint.stored import load_run_checkpoint
from gptexp.core.config import to_train_config
from gptexp.fork import ForkOptions, prepare
from gptexp.model.hf import ImportedModel
from gptexp.observe.rundir import RunDirectory, stored_config
from gptexp.run.session import run_training
from gptexp.run.starts import Fresh, Import, Resume, Start, new_run
from tests.conftest import FAST, compose_config, make_trainer, read_metrics


def copy_of(run_dir: Path, tmp_path: Path) -> RunDirectory:
    shutil.copytree(run_dir, tmp_path / "run")
    return RunDirectory(tmp_path / "run")


def test_a_new_run_starts_at_step_zero_on_its_own_text(tmp_path):
    cfg = to_train_config(compose_config(FAST))
    start = new_run(cfg)
    assert isinstance(start, Fresh)
    beginning = start.begin(cfg, RunDirectory(tmp_path))
    assert beginning.checkpoint is None and beginning.weights is None
    assert beginning.corpus.train.numel() > 0
    assert start.resume_note is None and start.wandb_fork_from() is None


def test_a_resume_carries_on_from_its_newest_checkpoint_and_rewinds_its_records(
    tmp_path, finished_run
):
    run = copy_of(finished_run, tmp_path)
    cfg = to_train_config(stored_config(run))
    start = Resume({"overrides": []})
    beginning = start.begin(cfg, run)
    assert beginning.checkpoint["step"] == 20 and beginning.weights is None
    assert beginning.corpus.fingerprint == beginning.checkpoint["data_fingerprint"]
    manifest = run.checkpoints / "manifest.json"
    listed = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(listed | {"checkpoints": listed["checkpoints"][:1]}))
    beginning = start.begin(cfg, run)  # the newest listed is now step 10
    trainer = make_trainer(cfg, run.path, state=beginning.checkpoint)
    assert trainer.state.step == 10 and trainer.state.from_checkpoint
    assert start.record(run, trainer) == {}
    assert max(r["step"] for r in read_metrics(run.path)) == 10  # logged again from 11
    assert start.resume_note == {"overrides": []}


def test_a_resume_without_a_checkpoint_starts_as_a_new_run(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    shutil.rmtree(run.checkpoints)
    cfg = to_train_config(stored_config(run))
    start = Resume(None)
    beginning = start.begin(cfg, run)
    assert beginning.checkpoint is None and isinstance(start.instead, Fresh)
    trainer = make_trainer(cfg, run.path)
    start.record(run, trainer)
    assert read_metrics(run.path) == []  # every record will be logged again


def test_an_import_gives_the_models_weights_and_tokenizer_and_records_its_source(
    tmp_path, finished_run, monkeypatch
):
    cfg = to_train_config(stored_config(RunDirectory(finished_run)))
    state = load_run_checkpoint(RunDirectory(finished_run), "last").state
    tokenizer = make_trainer(cfg, tmp_path / "t", state=state).corpus.tokenizer
    imported = ImportedModel(tokenizer, state["model"], {"source": "somewhere", "sha256": "ab"})
    monkeypatch.setattr(starts, "import_source", lambda model_cfg: imported)
    cfg.model.init_from = "somewhere"
    start = new_run(cfg)
    assert isinstance(start, Import)
    beginning = start.begin(cfg, RunDirectory(tmp_path / "new"))
    assert beginning.weights is state["model"] and beginning.checkpoint is None
    assert beginning.corpus.tokenizer.to_json() == tokenizer.to_json()
    assert start.record(RunDirectory(tmp_path / "new"), None) == {"init_from": imported.record}


def test_a_fork_gives_its_parents_state_lineage_curve_and_wandb_fork_point(tmp_path, finished_run):
    cfg, start = prepare(ForkOptions(run=str(finished_run), ckpt="10"), ["training.max_steps=30"])
    beginning = start.begin(cfg, RunDirectory(tmp_path))
    assert beginning.checkpoint["step"] == 10 and beginning.corpus is start.corpus
    trainer = make_trainer(cfg, tmp_path, state=beginning.checkpoint)
    parent_id = trainer.state.wandb_id
    start.adopt(trainer)
    assert trainer.state.step == 10 and trainer.state.wandb_id != parent_id
    fields = start.record(RunDirectory(tmp_path), trainer)
    assert fields["parent"]["step"] == 10 and fields["fork_overrides"] == ["training.max_steps=30"]
    assert {r["step"] for r in read_metrics(tmp_path)} <= set(range(11))
    assert start.wandb_fork_from() == f"{parent_id}?_step=10"
    assert start.resume_note is None


class Warmed(Start):
    """A kind of start the session does not know: a new run whose first step is 5."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self, cfg, run):
        self.calls.append("begin")
        return Fresh().begin(cfg, run)

    def adopt(self, trainer):
        self.calls.append("adopt")
        state = trainer.state
        state.step = state.data_step = 5
        trainer.restart((), state)

    def record(self, run, trainer):
        self.calls.append("record")
        return {"warmed": True}

    def after_record(self, trainer):
        self.calls.append("after_record")


def test_a_new_kind_of_start_is_a_new_class(tmp_path):
    cfg = to_train_config(compose_config([*FAST, "training.max_steps=7"]))
    start = Warmed()
    run_training(cfg, RunDirectory(tmp_path), start)
    assert start.calls == ["begin", "adopt", "record", "after_record"]
    status = json.loads((tmp_path / "run.json").read_text())
    assert status["warmed"] is True and status["step"] == 7 and status["status"] == "finished"
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r][0] > 5
