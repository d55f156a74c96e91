"""``python -m gptexp.eval`` through the real entry point: numbers equal to the trainer's,
determinism, samples, sweeps, interrupted and old runs, and bad input that changes nothing."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import gptexp.eval
from gptexp.core.fsio import sha256_file, xxh3_128_file
from gptexp.data.sources import python_docs_text
from tests.conftest import (
    FAST,
    call_main,
    files_of,
    read_metrics,
    run_module,
    subprocess_env,
    wait_until,
)


def evaluate(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module("gptexp.eval", f"run={run_dir}", *args, cwd=run_dir.parent)


def result(run_dir: Path, label: str) -> dict:
    return json.loads((run_dir / "eval" / f"{label}.json").read_text())


def logged_val_loss(run_dir: Path, step: int) -> float:
    (value,) = [
        r["val/loss"] for r in read_metrics(run_dir) if r["step"] == step and "val/loss" in r
    ]
    return value


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared finished run (steps 10 and 20 checkpointed), to write to."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("eval", "export"))
    return copy


def rewrite_checkpoint(run_dir: Path, step: int, edit) -> None:
    """Apply ``edit`` to a checkpoint's dict and re-list it in the manifest (a run made by
    another version of gptexp, as far as the loader can tell)."""
    path = run_dir / "checkpoints" / f"step_{step:07d}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, path)
    manifest_path = run_dir / "checkpoints" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["checkpoints"]:
        if entry["file"] == path.name:
            entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
            entry["xxh3_128"] = xxh3_128_file(path)
    manifest_path.write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- numbers


def test_eval_loss_equals_logged_val_loss_and_is_deterministic(run_copy: Path) -> None:
    before = files_of(run_copy)
    sampling = ("samples=2", "max_new_tokens=40", "prompt=def ")
    first = evaluate(run_copy, *sampling)
    assert first.returncode == 0, first.stderr
    last = result(run_copy, "last")
    assert last["step"] == 20 and last["checkpoint"] == "step_0000020.pt"
    assert last["loss"] == logged_val_loss(run_copy, 20)  # exactly: same function, batches
    assert last["logged_val_loss"] == last["loss"]
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]))
    # A char tokenizer has one token per character: bits per char = bits per token.
    assert last["bits_per_char"] == pytest.approx(last["loss"] / math.log(2))
    assert "loss" in first.stdout and "(equal)" in first.stdout
    samples = (run_copy / "eval" / "samples_last.txt").read_text()
    assert samples.count(")\ndef ") == 2  # two samples, each continuing the prompt
    assert files_of(run_copy, skip="eval") == before  # only eval/ was written

    # Again, in this process (another process than the first): the same numbers and samples.
    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", *sampling)
    assert code == 0, stderr
    assert result(run_copy, "last")["loss"] == last["loss"]
    assert (run_copy / "eval" / "samples_last.txt").read_text() == samples

    # seed= changes the samples only: the loss is still scored on the trainer's batches.
    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", *sampling, "seed=7")
    assert code == 0, stderr
    assert (run_copy / "eval" / "samples_last.txt").read_text() != samples
    seeded = result(run_copy, "last")
    assert seeded["loss"] == last["loss"] == seeded["logged_val_loss"]
    assert seeded["sampling"]["seed"] == 7 and seeded["seed"] == last["seed"]


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A real two-job multirun: job 0 checkpoints, job 1 runs with checkpoint=none."""
    base = tmp_path_factory.mktemp("sweep")
    sweep = base / "sweep"
    done = run_module(
        "gptexp.train", "-m", *FAST, "checkpoint=default,none", f"hydra.sweep.dir={sweep}", cwd=base
    )
    assert done.returncode == 0, done.stderr
    return sweep


def test_sweep_prints_one_table_and_lists_the_run_without_checkpoint(sweep_dir, capsys) -> None:
    code, stderr = call_main(gptexp.eval.main, f"run={sweep_dir}", cwd=sweep_dir.parent)
    assert code == 0, stderr
    stdout = capsys.readouterr().out
    rows = {line.split()[0]: line for line in stdout.splitlines() if line[:1].isdigit()}
    assert "checkpoint=default" in rows["0"] and "step_0000020.pt" in rows["0"]
    assert f"{result(sweep_dir / '0', 'last')['loss']:.4f}" in rows["0"]
    assert "checkpoint=none" in rows["1"] and "no checkpoint" in rows["1"]
    assert "training=debug" not in stdout  # overrides every run shares are left out
    assert not (sweep_dir / "1" / "eval").exists()


def test_a_damaged_run_json_in_a_sweep_is_listed_and_the_others_evaluated(
    sweep_dir, tmp_path, capsys
) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("eval"))
    (copy / "1" / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    code, stderr = call_main(gptexp.eval.main, f"run={copy}", cwd=tmp_path)
    assert code == 0, stderr
    stdout = capsys.readouterr().out
    rows = {line.split()[0]: line for line in stdout.splitlines() if line[:1].isdigit()}
    assert "step_0000020.pt" in rows["0"]
    assert "run.json: damaged (nested too deep)" in rows["1"]


@pytest.mark.parametrize(
    "content, why",
    [
        (b"[1, 2, 3]", "a JSON list, not an object"),
        (b"\xff\xfe\x00garbage", "damaged ("),
        (b'{"step": ' + b"7" * 5000 + b"}", "damaged ("),
    ],
    ids=["list", "bytes", "long-int"],
)
def test_a_damaged_run_json_is_one_line(run_copy: Path, content: bytes, why: str) -> None:
    (run_copy / "run.json").write_bytes(content)
    before = files_of(run_copy)
    done = evaluate(run_copy)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run.json: damaged" in errors[0] and why in errors[0]
    assert "Traceback" not in done.stderr
    assert files_of(run_copy) == before


def test_run_without_checkpoint_is_an_error(sweep_dir: Path) -> None:
    before = files_of(sweep_dir / "1")
    code, stderr = call_main(gptexp.eval.main, f"run={sweep_dir / '1'}")
    assert code == 2
    assert "no checkpoint" in stderr and "checkpoint.enabled=false" in stderr
    assert files_of(sweep_dir / "1") == before


# ----------------------------------------------------------------------------- runs of any age


def test_interrupted_run_is_evaluated(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "interrupted"
    # A run too long to finish, not compiled (compile=auto would compile one this long: seconds
    # of waiting; test_loop evaluates a compiled run's checkpoint).
    command = [sys.executable, "-m", "gptexp.train", *FAST, "training.max_steps=100000"]
    command += ["training.compile=false"]
    command += ["checkpoint.every_steps=5", f"hydra.run.dir={run_dir}"]
    with open(tmp_path / "train.out", "w") as out:
        training = subprocess.Popen(
            command, cwd=tmp_path, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT
        )
        manifest = run_dir / "checkpoints" / "manifest.json"
        wait_until(
            lambda: manifest.exists() and json.loads(manifest.read_text())["checkpoints"],
            process=training,
            what="a checkpoint",
            output=tmp_path / "train.out",
        )
        training.send_signal(signal.SIGTERM)
        assert training.wait(timeout=120) == 130
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "interrupted"

    code, stderr = call_main(gptexp.eval.main, f"run={run_dir}", cwd=tmp_path)
    assert code == 0, stderr
    assert "--- sample 1" in capsys.readouterr().out
    record = result(run_dir, "last")
    assert record["status"] == "interrupted"
    assert record["step"] == status["step"]  # the checkpoint the signal made
    assert math.isfinite(record["loss"])


def test_run_with_a_config_key_that_no_longer_exists(run_copy: Path) -> None:
    """An older gptexp had a ``training.ema`` option and an ``optimizer`` group."""

    def add_old_keys(config: dict) -> None:
        config["training"]["ema"] = 0.999
        config["optimizer"] = {"name": "lion"}

    rewrite_checkpoint(run_copy, 20, lambda state: add_old_keys(state["config"]))
    status = json.loads((run_copy / "run.json").read_text())
    add_old_keys(status["config"])
    (run_copy / "run.json").write_text(json.dumps(status))
    hydra_config = yaml.safe_load((run_copy / ".hydra" / "config.yaml").read_text())
    add_old_keys(hydra_config)
    (run_copy / ".hydra" / "config.yaml").write_text(yaml.safe_dump(hydra_config))
    overrides = run_copy / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- optimizer=lion\n")

    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", "samples=0")
    assert code == 0, stderr
    record = result(run_copy, "last")
    assert record["loss"] == logged_val_loss(run_copy, 20)
    assert record["ignored_config_keys"] == ["optimizer.name", "training.ema"]
    assert "training.ema" in stderr


def test_changed_text_is_refused_and_a_moved_text_is_found(run_copy: Path, tmp_path: Path) -> None:
    """The run says its text is a file; that file now holds something else."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(python_docs_text()[:-1000], encoding="utf-8")  # edited since training

    def point_at_file(state: dict) -> None:
        state["config"]["data"] |= {"name": "text", "path": str(corpus)}

    rewrite_checkpoint(run_copy, 20, point_at_file)
    before = files_of(run_copy)
    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", "ckpt=20")
    assert code == 2
    assert "differs from the one this run was trained on" in stderr
    assert files_of(run_copy) == before

    original = tmp_path / "original.txt"
    original.write_text(python_docs_text(), encoding="utf-8")
    code, stderr = call_main(
        gptexp.eval.main, f"run={run_copy}", "ckpt=20", f"data.path={original}", "samples=0"
    )
    assert code == 0, stderr
    assert result(run_copy, "step_0000020")["loss"] == logged_val_loss(run_copy, 20)


# ----------------------------------------------------------------------------- bad input


def test_corrupt_checkpoint(run_copy: Path) -> None:
    newest = run_copy / "checkpoints" / "step_0000020.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    before = files_of(run_copy)

    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", "ckpt=20")
    assert code == 2
    assert "step_0000020.pt" in stderr and "corrupted" in stderr
    assert files_of(run_copy) == before

    # last: the damaged newest checkpoint is named and the newest valid one is used.
    code, stderr = call_main(gptexp.eval.main, f"run={run_copy}", "samples=0")
    assert code == 0, stderr
    assert "step_0000020.pt" in stderr
    record = result(run_copy, "last")
    assert record["step"] == 10 and record["skipped_checkpoints"]
    assert record["loss"] == logged_val_loss(run_copy, 10)
    assert files_of(run_copy, skip="eval") == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt=15"], "no checkpoint at step 15 (have: 10, 20)"),
        (["ckpt=newest"], "ckpt='newest': must be last, best or a step number"),
        (["prompt=snow ☃"], "prompt='snow ☃': characters not in the tokenizer's vocabulary"),
        (["batchez=3"], "unknown key 'batchez'"),
        (["batches=many"], "batches='many': must be int"),
    ],
)
def test_bad_arguments(finished_run: Path, args: list[str], message: str) -> None:
    before = files_of(finished_run)
    code, stderr = call_main(gptexp.eval.main, f"run={finished_run}", *args)
    assert code == 2
    assert message in stderr
    assert files_of(finished_run) == before


def test_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a run")
    done = run_module("gptexp.eval", f"run={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"error: {tmp_path}: neither a gptexp run directory" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
