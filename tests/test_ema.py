"""The weights' moving average (training.ema_decay, gptexp.training.ema): its update and the
device-side mask, the bit-exact swap for val/loss_ema, the checks of a checkpoint's average,
and eval / export / fork with weights=ema. (Its exact resume: tests/test_resume.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import gptexp.compare
import gptexp.eval
import gptexp.export
import gptexp.fork
import gptexp.resume
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.checkpoint.stored import load_run_checkpoint, rebuild_model
from gptexp.core.config import CheckpointConfig, ModelConfig
from gptexp.core.errors import CheckpointError
from gptexp.model.gpt import GPT
from gptexp.observe.rundir import RunDirectory
from gptexp.training.ema import WeightAverage
from tests.conftest import call_main, files_of, read_metrics, subprocess_env, train
from tests.test_eval import rewrite_checkpoint
from tests.test_wandb import offline_run


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), 30)


def perturb(model: GPT, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator))


def test_the_average_follows_its_formula_and_a_masked_update_changes_no_bit():
    model = small_model()
    ema = WeightAverage(model, decay=0.9)
    start = [a.clone() for a in ema.average]
    perturb(model, 1)
    ema.update(applied=torch.tensor(False))  # masked by the guard: bit-unchanged
    assert all(torch.equal(a, b) for a, b in zip(ema.average, start, strict=True))
    ema.update(applied=torch.tensor(True))
    for average, first, param in zip(ema.average, start, model.parameters(), strict=True):
        assert not torch.equal(average, first)
        torch.testing.assert_close(average, 0.9 * first + 0.1 * param.detach())
    # The tied output layer is the embedding: averaged once, under its first name.
    assert "lm_head.weight" not in ema.names and "wte.weight" in ema.names


def test_the_average_swaps_in_and_the_weights_come_back_bit_for_bit():
    model = small_model()
    ema = WeightAverage(model, decay=0.5)
    perturb(model, 2)
    ema.update(applied=torch.tensor(True))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError), ema.swapped_in():  # also when evaluation raises
        for name, param in model.named_parameters():
            assert torch.equal(param, ema.average[ema.names.index(name)])
        assert model.lm_head.weight is model.wte.weight
        raise RuntimeError("evaluation failed")
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ema: ema.pop("wpe.weight"), "the checkpoint's ema does not fit the model (missing"),
        (lambda ema: ema.update(extra=torch.zeros(1)), "does not fit the model (unknown extra)"),
        (lambda ema: ema.update({"wpe.weight": torch.zeros(3)}), "ema.wpe.weight is torch.float"),
        (
            lambda ema: ema.update({"wpe.weight": ema["wpe.weight"].double()}),
            "ema.wpe.weight is torch.float64[8, 16], the model needs torch.float32[8, 16]",
        ),
        (lambda ema: ema.update({"wpe.weight": "zeros"}), "ema.wpe.weight is not a tensor"),
    ],
)
def test_a_checkpoints_average_is_checked_like_the_weights(edit, message):
    model = small_model()
    state = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    edit(state)
    with pytest.raises(CheckpointError) as error:
        WeightAverage(model, 0.9).load_state_dict(state)
    assert message in str(error.value)
    with pytest.raises(CheckpointError, match="not a dict"):
        WeightAverage(model, 0.9).load_state_dict([1, 2])


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """A finished 20-step run with an average, checkpoints at 10 and 20, mirrored to W&B."""
    base = tmp_path_factory.mktemp("ema")
    env = subprocess_env(GPTEXP_CACHE=str(base / "cache"), WANDB_MODE="offline")
    args = ("training.ema_decay=0.9", "checkpoint.every_steps=10", "logger=wandb")
    result = train(base / "run", *args, cwd=base, env=env)
    assert result.returncode == 0, result.stderr
    return base / "run"


def checkpoint(run_dir: Path, which: str | int = "last") -> dict:
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    return manager.load(manager.find(which))


def test_the_summary_and_compare_give_the_averages_final_val_loss(
    ema_run, finished_run, tmp_path, capsys
):
    (logged,) = [r["val/loss_ema"] for r in read_metrics(ema_run) if r["step"] == 20]
    status = json.loads((ema_run / "run.json").read_text())
    assert status["final/val_loss_ema"] == logged != status["final/val_loss"]
    assert offline_run(ema_run)["summary"]["final/val_loss_ema"] == logged
    assert "final/val_loss_ema" not in json.loads((finished_run / "run.json").read_text())

    # compare: a column after final/val_loss where a run keeps an average ("-" for the others).
    table = tmp_path / "table.csv"
    code, stderr = call_main(gptexp.compare.main, str(ema_run), str(finished_run), f"csv={table}")
    assert code == 0, stderr
    header, *rows = [line.split(",") for line in table.read_text().splitlines()]
    column = header.index("final/val_loss_ema")
    assert header[column - 1] == "final/val_loss"
    cells = {Path(row[-1]): row[column] for row in rows}
    assert float(cells[ema_run]) == logged and cells[finished_run] == ""
    names, _, averaged, plain = (line.split() for line in capsys.readouterr().out.splitlines())
    shown = names.index("final/val_loss_ema")
    assert (averaged[shown], plain[shown]) == (f"{logged:.4f}", "-")
    code, stderr = call_main(gptexp.compare.main, str(finished_run), f"csv={table}")
    assert code == 0 and "final/val_loss_ema" not in table.read_text(), stderr
    # A run that went on without its average (a resume with ema_decay=0): no average beside its
    # last val/loss, so none in the column (not the earlier one).
    later = tmp_path / "later"
    shutil.copytree(ema_run, later, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    with open(later / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"step": 22, "val/loss": 3.5}) + "\n")
    code, stderr = call_main(gptexp.compare.main, str(later), f"csv={table}")
    assert code == 0 and "final/val_loss_ema" not in table.read_text(), stderr


def test_eval_and_export_take_the_average_and_refuse_it_where_there_is_none(
    ema_run, finished_run, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(ema_run, run_dir)
    code, stderr = call_main(gptexp.eval.main, f"run={run_dir}", "weights=ema", "samples=0")
    assert code == 0, stderr
    record = json.loads((run_dir / "eval" / "last_ema.json").read_text())
    (logged,) = [r["val/loss_ema"] for r in read_metrics(run_dir) if r["step"] == 20]
    assert record["weights"] == "ema" and record["loss"] == record["logged_val_loss"] == logged
    code, stderr = call_main(gptexp.eval.main, f"run={run_dir}", "samples=0")  # raw: as before
    raw = json.loads((run_dir / "eval" / "last.json").read_text())
    assert code == 0 and raw["weights"] == "raw" and raw["loss"] != record["loss"]

    code, stderr = call_main(gptexp.export.main, f"run={run_dir}", "weights=ema")
    assert code == 0, stderr
    exported, _ = gptexp.export.load_export(run_dir / "export" / "last_ema")
    average = checkpoint(run_dir)["ema"]
    for name, param in exported.named_parameters():
        assert torch.equal(param, average[name]), name
    config = json.loads((run_dir / "export" / "last_ema" / "config.json").read_text())
    assert config["source"]["weights"] == "ema"

    before = files_of(finished_run)
    out = f"out={tmp_path}/x"
    commands = ((gptexp.eval.main, []), (gptexp.export.main, [out]), (gptexp.fork.main, [out]))
    for main, args in commands:
        code, stderr = call_main(main, f"run={finished_run}", "weights=ema", *args)
        assert code == 2 and stderr.count("error:") == 1, stderr
        assert "weights=ema: run's step_0000020.pt holds no weight average" in stderr
    code, stderr = call_main(gptexp.eval.main, f"run={finished_run}", "weights=mean")
    assert code == 2 and "weights='mean': must be raw" in stderr
    assert files_of(finished_run) == before and not (tmp_path / "x").exists()


def test_export_hf_takes_the_average(ema_run, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    args = (f"run={ema_run}", "format=hf", "weights=ema", f"out={out}")
    code, stderr = call_main(gptexp.export.main, *args, cwd=tmp_path)
    assert code == 0, stderr
    rebuilt = rebuild_model(load_run_checkpoint(RunDirectory(ema_run), "last", "ema").state, "ema")
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["transformer.wpe.weight"], rebuilt.model.wpe.weight)
    assert "the moving average of the weights" in (out / "README.md").read_text()


def test_a_fork_with_weights_ema_starts_from_the_average(ema_run, tmp_path):
    out = tmp_path / "fork"
    args = (f"run={ema_run}", "ckpt=10", "weights=ema", f"out={out}")
    code, stderr = call_main(gptexp.fork.main, *args, cwd=tmp_path)
    assert code == 0, stderr
    start, origin = checkpoint(out, 10), checkpoint(ema_run, 10)  # the fork's first checkpoint
    for name, average in origin["ema"].items():
        assert torch.equal(start["model"][name], average), name
        assert torch.equal(start["ema"][name], average), name  # the average carries on
    assert torch.equal(start["model"]["lm_head.weight"], origin["ema"]["wte.weight"])  # tied
    for index, state in origin["optimizer"]["state"].items():  # AdamW's moments carry on
        for name, tensor in state.items():
            assert torch.equal(start["optimizer"]["state"][index][name], tensor)
    assert json.loads((out / "run.json").read_text())["weights"] == "ema"
    own = [r for r in read_metrics(out) if not r.get("inherited")]
    parent = {r["step"]: r for r in read_metrics(ema_run)}
    assert own[0]["step"] == 11 and own[0]["train/loss"] != parent[11]["train/loss"]


def test_a_hostile_average_in_a_listed_checkpoint_is_one_error_line(ema_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ema_run, run_dir)
    rewrite_checkpoint(run_dir, 20, lambda state: state["ema"].pop("wpe.weight"))
    code, stderr = call_main(gptexp.eval.main, f"run={run_dir}", "weights=ema", "ckpt=20")
    assert code == 2 and stderr.count("error:") == 1
    assert "the checkpoint's ema does not fit the model (missing wpe.weight)" in stderr
    code, stderr = call_main(gptexp.resume.main, f"run={run_dir}", "training.max_steps=22")
    assert code == 2 and "ema does not fit the model" in stderr, stderr
