"""``python -m gptexp.export``: safetensors + JSON config + tokenizer that load back into the
same model without gptexp's checkpoint format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import gptexp.export
from gptexp.core.config import ModelConfig
from gptexp.export import load_export
from gptexp.model.gpt import GPT
from tests.conftest import call_main, files_of, run_module


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("eval", "export"))
    return copy


def checkpoint_model(run_dir: Path, step: int) -> GPT:
    """The model of a checkpoint, read the plain way (what export must reproduce)."""
    state = torch.load(
        run_dir / "checkpoints" / f"step_{step:07d}.pt", map_location="cpu", weights_only=True
    )
    model = GPT(ModelConfig(**state["config"]["model"]), state["vocab_size"])
    model.load_state_dict(state["model"])
    return model.eval()


def test_export_round_trip(run_copy: Path) -> None:
    before = files_of(run_copy)
    done = run_module("gptexp.export", f"run={run_copy}", "ckpt=best", cwd=run_copy.parent)
    assert done.returncode == 0, done.stderr
    out = run_copy / "export" / "best"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert files_of(run_copy, skip="export") == before

    # The tied output matrix is stored once, under the embedding's name.
    with safe_open(out / "model.safetensors", framework="pt") as weights:
        names = set(weights.keys())
    assert "wte.weight" in names and "lm_head.weight" not in names
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["step"] == 20 and config["vocab_size"] == 103

    model, tokenizer = load_export(out)
    assert model.lm_head.weight is model.wte.weight  # still tied after loading
    assert tokenizer.to_json() == (run_copy / "tokenizer.json").read_text()
    ids = torch.tensor([tokenizer.encode("def evaluate(run):\n    return")])
    expected, _ = checkpoint_model(run_copy, 20)(ids)
    logits, _ = model(ids)
    assert torch.equal(logits, expected)


def test_export_to_a_chosen_directory(run_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    code, stderr = call_main(gptexp.export.main, f"run={run_copy}", "ckpt=10", f"out={out}")
    assert code == 0, stderr
    model, tokenizer = load_export(out)
    ids = torch.tensor([tokenizer.encode("x = 1")])
    assert torch.equal(model(ids)[0], checkpoint_model(run_copy, 10)(ids)[0])
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 10
    assert not (run_copy / "export").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt=15"], "no checkpoint at step 15 (have: 10, 20)"),
        (["format=onnx"], "format='onnx': must be one of gptexp, hf"),
    ],
)
def test_export_bad_input_changes_nothing(run_copy: Path, args: list[str], message: str) -> None:
    before = files_of(run_copy)
    code, stderr = call_main(gptexp.export.main, f"run={run_copy}", *args)
    assert code == 2
    assert message in stderr
    assert files_of(run_copy) == before


class StopMidWrite(Exception):
    """Stands for a kill while an export is being written."""


def test_an_interrupted_re_export_leaves_the_previous_export_whole(
    run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "exported"
    code, stderr = call_main(gptexp.export.main, f"run={run_copy}", "ckpt=10", f"out={out}")
    assert code == 0, stderr
    before = files_of(out)

    # Re-export step 20 into the same directory, stopped after the weights, before config.json.
    def stop(*args, **kwargs):
        raise StopMidWrite

    monkeypatch.setattr(gptexp.export, "atomic_write_json", stop)
    with pytest.raises(StopMidWrite):
        call_main(gptexp.export.main, f"run={run_copy}", "ckpt=20", f"out={out}")
    assert files_of(out) == before  # step 10's weights beside step 10's config, nothing else
    model, tokenizer = load_export(out)
    ids = torch.tensor([tokenizer.encode("x = 1")])
    assert torch.equal(model(ids)[0], checkpoint_model(run_copy, 10)(ids)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]  # no temporaries

    monkeypatch.undo()  # a re-export of the same run replaces it whole
    code, stderr = call_main(gptexp.export.main, f"run={run_copy}", "ckpt=20", f"out={out}")
    assert code == 0, stderr
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]


@pytest.mark.parametrize("fmt", ["gptexp", "hf"])
def test_export_refuses_a_directory_that_is_not_an_export_of_the_run(
    run_copy: Path, tmp_path: Path, fmt: str
) -> None:
    if fmt == "hf":
        pytest.importorskip("transformers")
    users = tmp_path / "mine"
    users.mkdir()
    (users / "README.md").write_text("my notes\n")
    (users / "config.json").write_text('{"mine": true}\n')
    other = tmp_path / "other-export"  # an export of another run (a copy of this one)
    other_run = tmp_path / "other-run"
    shutil.copytree(run_copy, other_run)
    code, stderr = call_main(gptexp.export.main, f"run={other_run}", f"out={other}")
    assert code == 0, stderr
    for out in (users, other):
        before = files_of(out)
        code, stderr = call_main(
            gptexp.export.main, f"run={run_copy}", f"format={fmt}", f"out={out}"
        )
        assert code == 2, stderr
        assert stderr.count("error:") == 1 and "not an export of" in stderr, stderr
        assert files_of(out) == before


def test_a_hf_re_export_of_the_same_run_replaces_it(run_copy: Path) -> None:
    pytest.importorskip("transformers")
    for ckpt, step in (("10", 10), ("20", 20)):
        code, stderr = call_main(
            gptexp.export.main,
            f"run={run_copy}",
            f"ckpt={ckpt}",
            "format=hf",
            f"out={run_copy / 'export' / 'hf'}",
        )
        assert code == 0, stderr
        with safe_open(run_copy / "export" / "hf" / "model.safetensors", framework="pt") as f:
            assert f.metadata()["gptexp.step"] == str(step)
    assert sorted(p.name for p in (run_copy / "export").iterdir()) == ["hf"]
    card = (run_copy / "export" / "hf" / "README.md").read_text()
    assert f'from_pretrained("{run_copy / "export" / "hf"}")' in card  # not the temporary name
