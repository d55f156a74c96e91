"""FSDP2 and sharded (DCP) checkpoints on CPU: two gloo ranks under torchrun train, are killed in
the middle of a save, and resume exactly; one process resumes, evaluates and exports the same
sharded checkpoints."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from gptexp.checkpoint import dcp as sharded_checkpoint
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.checkpoint.stored import load_run_checkpoint
from gptexp.core.config import CheckpointConfig
from gptexp.core.errors import CheckpointError, ConfigError
from gptexp.core.fsio import sha256_file
from gptexp.eval import main as eval_main
from gptexp.export import main as export_main
from gptexp.observe.rundir import RunDirectory
from tests.conftest import (
    FAST,
    ROOT,
    assert_finished,
    call_main,
    compose_config,
    read_metrics,
    run_module,
    subprocess_env,
    torchrun,
    train,
)

EMA = "training.ema_decay=0.9"
SETTINGS = [
    "model.dropout=0.1",
    "training.max_steps=16",
    "checkpoint.every_steps=5",
    "training.parallel=fsdp",
    "checkpoint.format=dcp",
]


def final_state(run_dir) -> dict:
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig(format="dcp"))
    return manager.load(manager.find("last"))


def losses(run_dir) -> list:
    return [
        (r["step"], r.get("train/loss"), r.get("val/loss"), r.get("val/loss_ema"))
        for r in read_metrics(run_dir)
    ]


def test_config_names_a_bad_parallel_or_format():
    with pytest.raises(ConfigError, match="training.parallel='zero3': must be one of ddp, fsdp"):
        compose_config(["training.parallel=zero3"])
    with pytest.raises(ConfigError, match="checkpoint.format='zip': must be one of file, dcp"):
        compose_config(["checkpoint.format=zip"])


@pytest.mark.slow
def test_fsdp_dcp_killed_mid_save_resumes_exactly_on_two_ranks_and_on_one(tmp_path):
    """Also the weight average (training.ema_decay): each rank averages its own shards, the DCP
    checkpoint holds them per rank, and it resumes exactly like the weights."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    result = torchrun("gptexp.train", *FAST, *SETTINGS, EMA, f"hydra.run.dir={straight}")
    assert_finished(result, straight)
    listed = json.loads((straight / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert [e["file"] for e in listed] == [
        "step_0000010.dcp",
        "step_0000015.dcp",
        "step_0000016.dcp",
    ]
    # Two ranks wrote their own shards; every file is listed with its sha256.
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} == set(listed[-1]["files"])
    assert not (straight / "checkpoints" / "step_0000005.dcp").exists()  # retention
    metadata = pickle.loads(
        (straight / "checkpoints" / "step_0000016.dcp" / ".metadata").read_bytes()
    )
    assert len(metadata.state_dict_metadata["ema.wpe.weight"].chunks) == 2  # a shard per rank

    # The same seed starts from the same model on one process as on two FSDP ranks (whose
    # seeds differ and which FSDP itself does not make agree): step 0's val/loss, bit for bit.
    alone = tmp_path / "alone"
    one_step = [s for s in SETTINGS if not s.startswith("training.max_steps")]
    result = train(alone, *one_step, EMA, "training.max_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        read_metrics(alone)[0]
        == read_metrics(straight)[0]
        == {
            "step": 0,
            "val/loss": ANY,
            "val/loss_ema": ANY,
        }
    )

    # Rank 0 dies (SIGKILL) at step 10: every shard is written, the directory is not complete.
    result = torchrun(
        "gptexp.train", *FAST, *SETTINGS, EMA, f"hydra.run.dir={crashed}", crash="10:write"
    )
    assert result.returncode != 0
    assert (crashed / "checkpoints" / "step_0000010.dcp.tmp").is_dir()
    one_rank = tmp_path / "one_rank"
    shutil.copytree(crashed, one_rank)

    result = torchrun("gptexp.resume", f"run={crashed}")
    assert_finished(result, crashed)
    assert "resuming from step_0000005.dcp" in result.stderr
    a, b = final_state(crashed), final_state(straight)
    assert a["step"] == b["step"] == 16 and a["world_size"] == 2
    for part in ("model", "ema"):
        for key, tensor in b[part].items():
            assert torch.equal(a[part][key], tensor), (part, key)
    assert losses(crashed) == losses(straight)

    # One process reads the two ranks' shards (resharded to a world of one) and carries on.
    result = run_module("gptexp.resume", f"run={one_rank}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step_0000005.dcp" in result.stderr
    alone = final_state(one_rank)
    assert alone["step"] == 16 and alone["world_size"] == 1
    assert [step for step, *_ in losses(one_rank)] == list(range(17))  # 6..16 trained once

    # eval and export read a DCP checkpoint on one process.
    code, err = call_main(eval_main, f"run={straight}", "ckpt=15", "samples=0")
    assert code == 0, err
    assert json.loads((straight / "eval" / "step_0000015.json").read_text())["step"] == 15
    code, err = call_main(export_main, f"run={straight}", f"out={tmp_path / 'export'}")
    assert code == 0, err
    assert (tmp_path / "export" / "model.safetensors").is_file()

    # A damaged shard: ckpt=last names it and falls back to the previous checkpoint.
    shard = straight / "checkpoints" / "step_0000016.dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    loaded = load_run_checkpoint(RunDirectory(straight), "last")
    assert loaded.entry.step == 15
    assert "__1_0.distcp: sha256 differs from the manifest" in loaded.skipped[0]


@pytest.mark.slow
def test_the_sharded_weight_average_is_evaluated_and_saved_whole_and_changes_no_weight(tmp_path):
    """training.ema_decay under FSDP with checkpoint.format=file: val/loss_ema is the loss of
    the average itself (eval's weights=ema on the checkpoint gives the logged number: FSDP2
    keeps the root's gathered weights after a forward, and a swap must not be hidden by them),
    rank 0 writes the average as whole tensors, and the samples and the training after an
    evaluation of the average are those without one, bit for bit. (That the average is
    sharded and resumes exactly: the DCP test above.)"""
    fsdp = [*FAST, *SETTINGS[:1], "training.parallel=fsdp", "checkpoint.every_steps=4"]
    fsdp += ["training.lr_schedule=constant", "training.eval_every=4", "training.max_steps=8"]
    fsdp += ["training.sample_every=4"]  # a sample right after each evaluation of the average
    averaged, plain = tmp_path / "averaged", tmp_path / "plain"
    assert_finished(torchrun("gptexp.train", *fsdp, EMA, f"hydra.run.dir={averaged}"), averaged)
    assert_finished(torchrun("gptexp.train", *fsdp, f"hydra.run.dir={plain}"), plain)
    manager = CheckpointManager(averaged / "checkpoints", CheckpointConfig())
    state = manager.load(manager.find("last"))
    assert state["ema"].keys() == state["model"].keys() - {"lm_head.weight"}
    for name, tensor in state["ema"].items():
        assert tensor.shape == state["model"][name].shape, name  # whole tensors in the file
    manager = CheckpointManager(plain / "checkpoints", CheckpointConfig())
    for name, tensor in manager.load(manager.find("last"))["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    assert (averaged / "samples.txt").read_text() == (plain / "samples.txt").read_text()
    code, err = call_main(eval_main, f"run={averaged}", "ckpt=4", "weights=ema", "samples=0")
    assert code == 0, err
    logged = [r["val/loss_ema"] for r in read_metrics(averaged) if r["step"] == 4]
    evaluated = json.loads((averaged / "eval" / "step_0000004_ema.json").read_text())["loss"]
    assert evaluated == logged[-1]


@pytest.mark.slow
def test_dcp_on_one_process_resumes_bit_identical_to_the_single_file_format(tmp_path):
    """checkpoint.format=dcp without torchrun (a world of one) and killed mid-save: the resumed
    run ends with the weights of an uninterrupted run that used the single-file format."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    settings = [*FAST, "model.dropout=0.1", "training.max_steps=12", "checkpoint.every_steps=4"]
    result = run_module("gptexp.train", *settings, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    crash = [str(ROOT / "tests" / "crashing_save.py"), "8", "rename", "gptexp.train"]
    result = subprocess.run(
        [sys.executable, *crash, *settings, "checkpoint.format=dcp", f"hydra.run.dir={crashed}"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode != 0
    # listed, never renamed into place
    assert (crashed / "checkpoints" / "step_0000008.dcp.tmp").is_dir()
    assert not (crashed / "checkpoints" / "step_0000008.dcp").exists()
    result = run_module("gptexp.resume", f"run={crashed}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_0000008.dcp: missing; falling back" in result.stderr
    assert "resuming from step_0000004.dcp" in result.stderr
    a, b = final_state(crashed), final_state(straight)  # a DCP directory, a single file
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), key
    assert losses(crashed) == losses(straight)


def test_a_dcp_directory_holding_a_pickled_object_is_refused(tmp_path):
    """gptexp writes only tensors through DCP; a directory that holds anything else (which
    DCP would unpickle) is refused before any of it is loaded."""
    directory = tmp_path / "step_0000001.dcp"
    dcp.save({"model": {"w": torch.ones(2)}, "payload": "not a tensor"}, checkpoint_id=directory)
    sharded_checkpoint.write_meta(directory, {"step": 1})
    with pytest.raises(CheckpointError, match="refused to load .payload is not a tensor"):
        sharded_checkpoint.read(directory)


# ----------------------------------------------------------------------------- hostile DCP runs


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory) -> Path:
    """A finished one-process run whose checkpoints are DCP directories (steps 3 and 4)."""
    base = tmp_path_factory.mktemp("dcp_run")
    run_dir = base / "run"
    settings = ["checkpoint.format=dcp", "training.max_steps=4", "checkpoint.every_steps=3"]
    result = train(run_dir, *settings, cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def dcp_copy(dcp_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(dcp_run, copy)
    return copy


def relist(run_dir: Path, edit) -> None:
    """Apply ``edit`` to the step-4 entry of the manifest, as whoever wrote the run could."""
    path = run_dir / "checkpoints" / "manifest.json"
    manifest = json.loads(path.read_text())
    (entry,) = [e for e in manifest["checkpoints"] if e["step"] == 4]
    edit(entry)
    entry["sha256"] = sharded_checkpoint.listing_digest(entry["files"])
    path.write_text(json.dumps(manifest))


def assert_refused(run_dir: Path, message: str) -> None:
    code, err = call_main(eval_main, f"run={run_dir}", "ckpt=4", "samples=0")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err[-3000:]
    assert not (run_dir / "eval").exists()


class SystemCall:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_dcp_metadata_that_runs_code_is_refused_though_the_manifest_lists_it(dcp_copy):
    """Whoever wrote a run controls its manifest: a .metadata whose pickle calls os.system,
    listed with its true sha256, is refused without running anything."""
    directory = dcp_copy / "checkpoints" / "step_0000004.dcp"
    marker = dcp_copy.parent / "code-ran"
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    metadata.version = SystemCall(f"touch {marker}")  # the rest still loads as a checkpoint
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    relist(
        dcp_copy,
        lambda entry: entry["files"].update({".metadata": sha256_file(directory / ".metadata")}),
    )

    assert_refused(dcp_copy, "system is not DCP metadata")
    assert not marker.exists()


def test_a_dcp_metadata_that_points_out_of_its_directory_is_refused(dcp_copy):
    """Every shard a .metadata names is a file of its own directory: one that reads another
    checkpoint's shard (or any file) through a relative path is refused."""
    directory = dcp_copy / "checkpoints" / "step_0000004.dcp"
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../step_0000003.dcp/__0_0.distcp"  # the same layout, step 3's
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    relist(
        dcp_copy,
        lambda entry: entry["files"].update({".metadata": sha256_file(directory / ".metadata")}),
    )

    assert_refused(dcp_copy, "not a file of the directory")


@pytest.mark.parametrize(
    "content, message",
    [
        (pickle.dumps({"not": "metadata"}), "refused to load (a dict)"),
        (pickle.dumps(object.__new__(Metadata)), "an entry without its fields"),
        (b"\x80\x04random bytes", "unreadable"),
    ],
    ids=["another object", "no fields", "random bytes"],
)
def test_a_malformed_dcp_metadata_is_one_error_line(dcp_copy, content, message):
    directory = dcp_copy / "checkpoints" / "step_0000004.dcp"
    (directory / ".metadata").write_bytes(content)
    relist(
        dcp_copy,
        lambda entry: entry["files"].update({".metadata": sha256_file(directory / ".metadata")}),
    )
    assert_refused(dcp_copy, message)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("an empty listing", "its files do not list .metadata and meta.pt"),
        ("no .metadata listed", "its files do not list .metadata and meta.pt"),
        ("an unlisted file", "extra.pt is in the directory but not in the manifest"),
    ],
)
def test_a_dcp_entry_that_does_not_list_every_file_is_damaged(dcp_copy, damage, message):
    directory = dcp_copy / "checkpoints" / "step_0000004.dcp"
    if damage == "an empty listing":
        relist(dcp_copy, lambda entry: entry["files"].clear())
    elif damage == "no .metadata listed":
        relist(dcp_copy, lambda entry: entry["files"].pop(".metadata"))
    else:
        (directory / "extra.pt").write_bytes(b"not listed")
    assert_refused(dcp_copy, message)


class _ByName:
    """An object that pickles as ``getattr(owner, name)`` (how Python 3.11.2 pickles an Enum
    member, DCP's memory-format encoding among them)."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_dcp_metadata_may_name_an_enum_member_by_getattr_and_nothing_else():
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    def load(obj):
        return sharded_checkpoint._MetadataUnpickler(io.BytesIO(pickle.dumps(obj))).load()

    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    assert load(_ByName(_MEM_FORMAT_ENCODING, member.name)) is member
    for owner, name in [
        (_MEM_FORMAT_ENCODING, "__class__"),  # not a member
        (torch.Size, "__subclasses__"),  # an admitted class, but no Enum
        (pathlib.PurePosixPath, "__init__"),
    ]:
        with pytest.raises(pickle.UnpicklingError, match="is not DCP metadata"):
            load(_ByName(owner, name))
