"""logger=wandb, offline: the W&B run files hold what a sweep and a resume should put there."""

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
