"""logger=wandb, offline: the W&B run files hold what a sweep, a PBT and a resume should put
there."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from tests.conftest import run_module, sweep

BLOCK, HEADER = 32768, 7  # W&B's transaction log: LevelDB's log format with its own header


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline ``.wandb`` file."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # the rest of the block is padding
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending += chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 2:  # the first piece
            pending = chunk
    return records


def item_key(item) -> str:
    """W&B stores a name with "/" either whole or split into its parts."""
    return item.key or "/".join(item.nested_key)


def offline_run(run_dir: Path, index: int = 0) -> dict:
    files = sorted(run_dir.glob("wandb/offline-run-*/*.wandb"))
    records = read_records(files[index])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary |= {item_key(i): json.loads(i.value_json) for i in r.summary.update}
    history = [
        {item_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    return {"run": run, "config": config, "summary": summary, "history": history, "n": len(files)}


def test_sweep_jobs_are_grouped_wandb_runs_and_resume_continues_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(
        sweep_dir,
        "logger=wandb",
        "logger.tags=[nano,test]",
        "training.lr=1e-3,3e-4",
        "training.max_steps=10",
        "training.eval_every=5",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    ids = set()
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        status = json.loads((sweep_dir / job / "run.json").read_text())
        got = offline_run(sweep_dir / job)
        run = got["run"]
        assert run.run_id == status["wandb_id"] and run.project == "gptexp"
        assert run.run_group == "sweep"  # the sweep directory's name
        assert "training.lr=" in run.display_name and run.display_name == status["wandb_name"]
        assert list(run.tags) == ["nano", "test"]
        assert got["config"]["training.lr"] == lr and got["config"]["model.n_layer"] == 2
        steps = [row["trainer/step"] for row in got["history"]]
        assert steps == list(range(11))  # step 0 (first eval) .. 10, the step as x-axis
        summary = got["summary"]
        assert summary["final/val_loss"] == status["final/val_loss"]
        assert summary["best/val_loss"] == status["best/val_loss"]
        assert summary["parameters"] == status["parameters"] > 0
        assert summary["throughput/median_tokens_per_s"] > 0
        ids.add(run.run_id)
    assert len(ids) == 2  # one W&B run per job

    # A resume continues the same W&B run, in the same group, under the same name.
    resumed = run_module(
        "gptexp.resume", f"run={sweep_dir / '0'}", "training.max_steps=15", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    again = offline_run(sweep_dir / "0", index=1)
    first = offline_run(sweep_dir / "0", index=0)
    assert again["n"] == 2
    assert again["run"].run_id == first["run"].run_id
    assert again["run"].run_group == "sweep"
    assert again["run"].display_name == first["run"].display_name
    assert [row["trainer/step"] for row in again["history"]][-1] == 15


def test_pbt_members_are_grouped_forks_name_their_parents_and_resumes_keep_their_id(tmp_path):
    # Two members, two rounds of 3 steps: in round 1 the worse member forks the better one, the
    # better one resumes its own run.
    sweep_dir = tmp_path / "pbt"
    result = sweep(
        sweep_dir,
        "experiment=pbt",
        "logger=wandb",
        "hydra.sweeper.population=2",
        "hydra.sweeper.rounds=2",
        "hydra.sweeper.steps_per_round=3",
        "training.warmup_steps=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pbt = json.loads((sweep_dir / "pbt.json").read_text())
    (fork,) = [m for m in pbt["rounds"][1]["members"] if m["parent"]]
    (kept,) = [m for m in pbt["rounds"][1]["members"] if not m["parent"]]
    assert fork["run"] == f"r1-m{fork['member']}" and kept["run"] == fork["parent"]

    runs = {name: offline_run(sweep_dir / name) for name in ("r0-m0", "r0-m1", fork["run"])}
    for name, got in runs.items():
        status = json.loads((sweep_dir / name / "run.json").read_text())
        assert got["run"].run_group == "pbt"  # the sweep directory's name
        assert got["run"].run_id == status["wandb_id"]
        assert got["run"].display_name == name
    # The fork's W&B run names its parent's W&B run and the step it was forked at.
    parent = json.loads((sweep_dir / fork["parent"] / "run.json").read_text())
    config = runs[fork["run"]]["config"]
    assert config["parent_run_id"] == parent["wandb_id"]
    assert config["fork_step"] == 3
    assert "parent_run_id" not in runs["r0-m0"]["config"]
    assert [row["trainer/step"] for row in runs[fork["run"]]["history"]] == [4, 5, 6]
    # The member that goes on resumes its own W&B run in round 1.
    again = offline_run(sweep_dir / kept["run"], index=1)
    assert again["n"] == 2
    assert again["run"].run_id == runs[kept["run"]]["run"].run_id
    assert again["run"].run_group == "pbt"
    assert [row["trainer/step"] for row in again["history"]][-1] == 6
