"""Forks through the real entry points: ``python -m gptexp.fork`` branches a run from one of its
checkpoints. Without overrides the fork ends bit-identical to its parent; with overrides it
parts from the parent right after the fork step; the parent's directory is never written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import gptexp.compare
import gptexp.eval
import gptexp.fork
import gptexp.resume
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig, TrainingConfig
from gptexp.training.optim import lr_factor
from tests.conftest import call_main, files_of, read_metrics, run_module, train
from tests.test_wandb import offline_run

pytestmark = pytest.mark.slow  # every test trains (in subprocesses)

# Dropout on, so that the fork must carry the RNG state for the losses to match. A constant lr
# (its cooldown forks are then the wsd runs planned from the start), evaluated every 2 steps
# (a val/loss at each cooldown's end), checkpoints at 10 and 20.
PARENT = [
    "model.dropout=0.1", "training.lr_schedule=constant", "training.eval_every=2",
    "checkpoint.every_steps=10", "checkpoint.keep_last=2",
]  # fmt: skip


def fork(*args: str, cwd: Path):
    return run_module("gptexp.fork", *args, cwd=cwd)


def checkpoint(run_dir: Path, which: str | int = "last") -> dict:
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    return manager.load(manager.find(which))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in records]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A finished 20-step run with checkpoints at 10 and 20, and its files' hashes."""
    base = tmp_path_factory.mktemp("parent")
    result = train(base / "parent", *PARENT, cwd=base)
    assert result.returncode == 0, result.stderr
    return base / "parent", files_of(base / "parent")


@pytest.fixture(scope="module")
def control(parent) -> Path:
    """The parent forked at step 10 with no override, trained to its end (step 20)."""
    parent_dir, _ = parent
    out = parent_dir.parent / "control"
    result = fork(f"run={parent_dir}", "ckpt=10", f"out={out}", cwd=parent_dir.parent)
    assert result.returncode == 0, result.stderr
    return out


def test_fork_without_overrides_ends_bit_identical_and_leaves_parent_untouched(parent, control):
    parent_dir, before = parent
    mine, theirs = checkpoint(control), checkpoint(parent_dir)
    assert mine["step"] == theirs["step"] == 20
    assert mine["tokens_seen"] == theirs["tokens_seen"]
    for key, tensor in theirs["model"].items():
        assert torch.equal(mine["model"][key], tensor), f"parameter {key} differs"
    assert mine["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for index, state in theirs["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(mine["optimizer"]["state"][index][name], tensor), (index, name)
    assert mine["scheduler"] == theirs["scheduler"]
    assert mine["wandb_id"] != theirs["wandb_id"]  # a W&B run of its own

    # metrics.jsonl: the parent's records up to step 10 marked inherited, then the same curve.
    records, parent_records = read_metrics(control), read_metrics(parent_dir)
    inherited = [r for r in records if r.get("inherited")]
    assert inherited == [r | {"inherited": True} for r in parent_records if r["step"] <= 10]
    assert losses(records) == losses(parent_records)
    assert records[len(inherited)]["step"] == 11

    lineage = status(control)["parent"]
    manifest = json.loads((parent_dir / "checkpoints" / "manifest.json").read_text())
    entry = next(e for e in manifest["checkpoints"] if e["step"] == 10)
    assert lineage["run"] == str(parent_dir.resolve()) and lineage["step"] == 10
    assert (lineage["checkpoint"], lineage["sha256"]) == (entry["file"], entry["sha256"])
    assert status(control)["fork_overrides"] == [] and status(control)["reset"] == []
    assert files_of(parent_dir) == before  # the lock file's content included


def test_fork_with_another_lr_parts_after_the_fork_step_and_is_mirrored(parent, tmp_path):
    parent_dir, before = parent
    out = tmp_path / "lr"
    result = fork(
        f"run={parent_dir}", "ckpt=10", f"out={out}", "training.lr=3e-3", "logger.wandb=true",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    own = {r["step"]: r for r in read_metrics(out) if not r.get("inherited")}
    theirs = {r["step"]: r for r in read_metrics(parent_dir)}
    # Step 11's loss is measured on the weights of step 10, before the new lr acts.
    assert own[11]["train/loss"] == theirs[11]["train/loss"]
    # From update 11 on, the schedule of lr=3e-3 at the same place (the lr logged at a step is
    # the next update's), so the losses part from step 12 on.
    schedule = TrainingConfig(**status(out)["config"]["training"])
    assert schedule.lr == 3e-3
    assert own[11]["lr"] == pytest.approx(3e-3 * lr_factor(11, schedule))
    assert own[11]["lr"] != theirs[11]["lr"]
    assert all(own[s]["train/loss"] != theirs[s]["train/loss"] for s in range(12, 21))
    assert status(out)["fork_overrides"] == ["training.lr=3e-3", "logger.wandb=true"]

    w = offline_run(out)
    assert w["config"]["parent_run_id"] == checkpoint(parent_dir, 10)["wandb_id"]
    assert w["config"]["fork_step"] == 10
    # In the parent's group (a run launched alone has none: one named after the parent).
    assert w["run"].run_group == status(parent_dir)["wandb_name"]
    assert w["run"].display_name.startswith(f"{status(parent_dir)['wandb_name']}@10 ")
    assert min(h["trainer/step"] for h in w["history"]) == 11  # no inherited record mirrored

    # compare: the lineage column, and a plot of both curves.
    code, _ = call_main(gptexp.compare.main, str(parent_dir), str(out), f"plot={tmp_path}/l.png")
    assert code == 0 and (tmp_path / "l.png").stat().st_size > 0
    table = gptexp.compare.compare(gptexp.compare.CompareOptions(paths=[str(parent_dir), str(out)]))
    header, _, first, second = table.splitlines()
    assert "parent@step" in header and "training.lr" in header
    assert "0.001" in first and f"{parent_dir.name}@10" in second and "0.003" in second
    assert files_of(parent_dir) == before


def test_reset_restarts_optimizer_schedule_and_step(parent, tmp_path):
    parent_dir, _ = parent
    out = tmp_path / "reset"
    result = fork(
        f"run={parent_dir}", "ckpt=10", f"out={out}", "reset=optimizer,scheduler,rng,step",
        "checkpoint.keep_every=10", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    start, origin = checkpoint(out, 0), checkpoint(parent_dir, 10)
    for key, tensor in origin["model"].items():
        assert torch.equal(start["model"][key], tensor)  # the parent's weights...
    assert start["optimizer"]["state"] == {}  # ... with a fresh AdamW
    assert start["scheduler"]["last_epoch"] == 0 and start["tokens_seen"] == 0
    records = read_metrics(out)
    assert not any(r.get("inherited") for r in records)  # its own steps start again at 0
    # The schedule starts again, warm-up included: the lr of the parent's own first steps.
    first_steps = {r["step"]: r.get("lr") for r in read_metrics(parent_dir) if r["step"] <= 3}
    assert records[0]["step"] == 0
    assert {r["step"]: r.get("lr") for r in records if r["step"] <= 3} == first_steps
    assert status(out)["reset"] == ["optimizer", "scheduler", "rng", "step"]


def test_bad_input_is_refused_before_anything_is_written(parent, tmp_path):
    parent_dir, before = parent
    out = tmp_path / "never"
    base = (f"run={parent_dir}", f"out={out}")
    code, stderr = call_main(gptexp.fork.main, *base, "model.n_layer=3")
    assert code == 2 and "model.n_layer: 2 -> 3" in stderr
    code, stderr = call_main(gptexp.fork.main, *base, "data.tokenizer=bpe")
    assert code == 2 and "data.tokenizer: 'char' -> 'bpe'" in stderr
    code, stderr = call_main(gptexp.fork.main, *base, "model=small")
    assert code == 2 and "group choices" in stderr
    code, stderr = call_main(gptexp.fork.main, *base, "reset=optimizer,weights")
    assert code == 2 and "weights cannot be reset" in stderr
    code, stderr = call_main(gptexp.fork.main, *base, "ckpt=20")  # at max_steps already
    assert code == 2 and "training.max_steps=20: the fork starts at step 20" in stderr
    code, stderr = call_main(gptexp.fork.main, *base, "ckpt=15")
    assert code == 2 and "no checkpoint at step 15" in stderr
    code, stderr = call_main(gptexp.fork.main, f"run={parent_dir}", f"out={parent_dir}/f")
    assert code == 2 and "inside the parent run" in stderr
    # Another text is fine, but it must be one the parent's tokenizer can encode.
    text = tmp_path / "other.txt"
    text.write_text("An ünïcödé text the char tokenizer never saw. " * 200, encoding="utf-8")
    code, stderr = call_main(
        gptexp.fork.main, *base, "ckpt=10", "data.name=text", f"data.path={text}"
    )
    assert code == 2 and "not in the tokenizer's vocabulary" in stderr and "ü" in stderr
    assert "keeps its parent's tokenizer" in stderr
    assert not out.exists()
    assert files_of(parent_dir) == before


def test_a_fork_is_an_ordinary_run_resume_eval_fork_again_tree(parent, control, tmp_path):
    parent_dir, before = parent
    grandchild = tmp_path / "grandchild"
    result = fork(
        f"run={control}", f"out={grandchild}", "training.max_steps=22", cwd=tmp_path
    )  # ckpt=last: step 20
    assert result.returncode == 0, result.stderr
    assert status(grandchild)["parent"]["run"] == str(control.resolve())
    assert status(grandchild)["parent"]["step"] == 20

    code, stderr = call_main(gptexp.resume.main, f"run={grandchild}", "training.max_steps=24")
    assert code == 0, stderr
    steps = [r["step"] for r in read_metrics(grandchild)]
    assert steps == sorted(set(steps)) and steps[-1] == 24
    assert status(grandchild)["status"] == "finished" and status(grandchild)["parent"]["step"] == 20
    code, stderr = call_main(gptexp.eval.main, f"run={grandchild}", "samples=0", cwd=tmp_path)
    assert code == 0, stderr

    # The tree of the runs below two directories: the parent and its fork, the fork's fork.
    tree = gptexp.compare.family([str(parent_dir.parent), str(tmp_path)])
    lines = tree.splitlines()
    root = next(i for i, line in enumerate(lines) if line.startswith("parent "))
    assert lines[root + 1].startswith("└─ control  @10  (no change)")
    assert lines[root + 2].startswith("   └─ grandchild  @20  training.max_steps=22")
    assert files_of(parent_dir) == before


def test_multirun_makes_one_fork_per_value_under_one_sweep_dir(parent, tmp_path):
    parent_dir, before = parent
    sweep = tmp_path / "sweep"
    result = fork(
        "-m", f"run={parent_dir}", "ckpt=10", f"out={sweep}", "training.lr=1e-4,3e-3",
        "training.max_steps=12", "training.batch_size=16", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert [job["run"] for job in jobs] == ["0", "1"]
    assert [status(sweep / j["run"])["config"]["training"]["lr"] for j in jobs] == [1e-4, 3e-3]
    assert all(job["parent@step"] == f"{parent_dir.name}@10" for job in jobs)
    assert all(job["status"] == "finished" for job in jobs)
    # The batch it asks for (a resume would keep the parent's global batch of 8 sequences).
    tokens = {r["step"]: r["tokens"] for r in read_metrics(sweep / "0") if "tokens" in r}
    assert tokens[12] - tokens[11] == 16 * 64
    assert files_of(parent_dir) == before


def test_a_sweep_of_forks_checks_every_checkpoint_before_the_first_fork_trains(parent, tmp_path):
    """A step that is not listed, or one with nothing left to train, is one error line and
    exit 2 before any fork trains (not a sweep that trains the others and then exits 1)."""
    parent_dir, before = parent
    sweep = tmp_path / "sweep"
    for args, message in (
        (["ckpt=10,15", "cooldown=2"], "ckpt=15: "),
        (["ckpt=10,20"], "training.max_steps=20: the fork starts at step 20"),
    ):
        code, stderr = call_main(gptexp.fork.main, "-m", f"run={parent_dir}", f"out={sweep}", *args)
        assert code == 2 and stderr.count("error:") == 1 and message in stderr, stderr
        assert "no checkpoint at step 15 (have: 10, 20)" in stderr or "15" not in message
        assert not sweep.exists()
    assert files_of(parent_dir) == before


# ----------------------------------------------------------------------------- argument parsing


@pytest.fixture
def stored_parent(tmp_path) -> Path:
    """A parent that only has a stored config: overrides are checked before any checkpoint."""
    from gptexp.core.config import compose_config, config_to_dict
    from tests.conftest import FAST

    parent = tmp_path / "parent"
    parent.mkdir()
    config = config_to_dict(compose_config(FAST))
    (parent / "run.json").write_text(json.dumps({"status": "finished", "config": config}))
    return parent


def assert_refused_in_one_line(parent, tmp_path, args, message) -> None:
    """``fork`` with ``args`` exits 2 with one error line holding ``message``, writing nothing."""
    out = tmp_path / "never"
    code, stderr = call_main(gptexp.fork.main, f"run={parent}", f"out={out}", *args)
    assert code == 2 and stderr.count("error:") == 1 and message in stderr, stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+training.lrr=1"], "training.lrr: no such config key (did you mean training.lr?)"),
        (["++training.lrr=1"], "training.lrr: no such config key (did you mean training.lr?)"),
        (["-m", "training.lrr=1,2"], "training.lrr: no such config key"),
        (["model=tinny"], "model=tinny: no such option (did you mean model=tiny?"),
        (["training.guard.action=of"], "training.guard.action='of': must be one of off"),
    ],
)
def test_fork_checks_overrides_as_train_does(stored_parent, tmp_path, args, message):
    assert_refused_in_one_line(stored_parent, tmp_path, args, message)


def test_fork_reads_yaml_words_as_train_does(stored_parent):
    """``off`` is a guard action, not YAML's false (the fork refused it)."""
    from gptexp.core.cli import parse_options
    from gptexp.fork import USAGE, ForkOptions
    from gptexp.observe.rundir import RunDirectory
    from gptexp.run.session import overridden_config

    options = parse_options(
        [f"run={stored_parent}", "training.guard.action=off", "logger.name=no"], ForkOptions, USAGE
    )
    assert options.run == str(stored_parent) and not options.multirun
    overrides = options.overrides
    assert overrides == ["training.guard.action=off", "logger.name=no"]
    cfg, _ = overridden_config(RunDirectory(stored_parent), overrides, fork=True)
    assert (cfg.training.guard.action, cfg.logger.name) == ("off", "no")


def test_fork_sweeps_read_values_as_train_sweeps_do():
    from gptexp.fork import expand

    assert expand(["training.lr=1e-4,3e-3", "logger.name='a,b'", "logger.tags=[x,y]"]) == [
        ["training.lr=0.0001", "logger.name='a,b'", "logger.tags=[x,y]"],
        ["training.lr=0.003", "logger.name='a,b'", "logger.tags=[x,y]"],
    ]
    assert expand(["training.seed=range(1,3)", "logger.name=choice(p,q)"]) == [
        ["training.seed=1", "logger.name=p"],
        ["training.seed=1", "logger.name=q"],
        ["training.seed=2", "logger.name=p"],
        ["training.seed=2", "logger.name=q"],
    ]


# ----------------------------------------------------------------------------- cooldown forks


@pytest.fixture(scope="module")
def cooldowns(parent, tmp_path_factory) -> tuple[Path, Path]:
    """The parent and a sweep of its cooldown forks of 6 updates from steps 10 and 20 (the
    parent's max_steps: that one extends it), mirrored to W&B, in a directory of their own."""
    parent_dir, _ = parent
    base = tmp_path_factory.mktemp("cooldown")
    sweep = base / "forks"
    cooldown = ("ckpt=10,20", "cooldown=6", "logger.wandb=true")
    result = fork("-m", f"run={parent_dir}", *cooldown, f"out={sweep}", cwd=base)
    assert result.returncode == 0, result.stderr
    return parent_dir, sweep


def test_a_cooldown_inside_the_warm_up_says_how_much_of_it_decays(parent, tmp_path):
    """Warm-up wins over the decay (lr_factor), as in the planned wsd run: a cooldown that
    starts inside it says so, and one that also ends inside it never decays."""
    parent_dir, _ = parent
    for warmup, said in [(30, "it never decays"), (11, "only its last 1 update decay")]:
        args = ["ckpt=10", "cooldown=2", f"training.warmup_steps={warmup}"]
        out = tmp_path / str(warmup)
        code, stderr = call_main(gptexp.fork.main, f"run={parent_dir}", f"out={out}", *args)
        assert code == 0, stderr
        assert f"inside training.warmup_steps={warmup}" in stderr and said in stderr, stderr


def test_a_cooldown_fork_is_bit_identical_to_the_wsd_run_planned_from_the_start(cooldowns):
    parent_dir, sweep = cooldowns
    planned = sweep.parent / "planned"
    wsd = ["training.lr_schedule=wsd", "training.max_steps=16", "training.decay_steps=6"]
    same = [item for item in PARENT if not item.startswith("training.lr_schedule=")]
    result = train(planned, *same, *wsd, cwd=sweep.parent)
    assert result.returncode == 0, result.stderr
    fork_dir = sweep / "0"
    assert status(fork_dir)["parent"]["step"] == 10 and status(fork_dir)["cooldown"] == 6
    assert status(fork_dir)["fork_overrides"] == ["logger.wandb=true", *wsd]
    # Every record from update 11 on: losses, evaluations and the lr, bit for bit.
    mine = [r for r in read_metrics(fork_dir) if not r.get("inherited")]
    theirs = [r for r in read_metrics(planned) if r["step"] > 10]
    assert [r["step"] for r in mine] == [r["step"] for r in theirs] == list(range(11, 17))
    for key in ("train/loss", "val/loss", "lr", "grad_norm", "tokens"):
        assert [r.get(key) for r in mine] == [r.get(key) for r in theirs], key
    assert mine[-1]["lr"] == 1e-4  # min_lr: the lr the last update trained with (see lr_factor)
    # The parent's lr was constant, so the decay is the fork's own.
    assert read_metrics(parent_dir)[16]["lr"] == 1e-3
    a, b = checkpoint(fork_dir), checkpoint(planned)
    assert a["step"] == b["step"] == 16 and a["tokens_seen"] == b["tokens_seen"]
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), f"parameter {key} differs"
    for index, state in b["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(a["optimizer"]["state"][index][name], tensor), (index, name)
    assert a["scheduler"] == b["scheduler"]


def test_cooldown_forks_extend_the_parent_and_compare_draws_their_frontier(cooldowns, tmp_path):
    parent_dir, sweep = cooldowns
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["finished", "finished"]
    late = status(sweep / "1")
    assert late["parent"]["step"] == 20 and late["cooldown"] == 6 and late["step"] == 26
    # In W&B: in the parent's group (one named after it: it was launched alone), named by the
    # cooldown, linked to the parent's W&B run at the fork step.
    name = status(parent_dir)["wandb_name"]
    for job, step in (("0", 10), ("1", 20)):
        w = offline_run(sweep / job)
        assert w["run"].run_group == name
        assert w["run"].display_name.startswith(f"{name}@{step} cooldown=6")
        assert w["config"]["parent_run_id"] == checkpoint(parent_dir, step)["wandb_id"]
        assert w["config"]["fork_step"] == step
    table = gptexp.compare.compare(
        gptexp.compare.CompareOptions(paths=[str(parent_dir), str(sweep)], frontier=True)
    )
    header, _, first, second = table.splitlines()
    assert header.split() == list(gptexp.compare.frontier.COLUMNS)
    parent_val = {r["step"]: r["val/loss"] for r in read_metrics(parent_dir) if "val/loss" in r}
    own = {r["step"]: r for r in read_metrics(sweep / "0") if "val/loss" in r}
    tokens = f"{own[16]['tokens']:,}"
    assert first.split() == [
        "parent", "10", "6", "16", tokens, f"{own[16]['val/loss']:.4f}",
        f"{parent_val[16]:.4f}", "0",
    ]  # fmt: skip
    assert second.split()[:4] == ["parent", "20", "6", "26"] and second.split()[6] == "-"
    code, stderr = call_main(
        gptexp.compare.main, "--frontier", str(sweep), str(parent_dir), f"plot={tmp_path}/f.png"
    )
    assert code == 0 and (tmp_path / "f.png").stat().st_size > 0, stderr
    code, stderr = call_main(gptexp.compare.main, "--frontier", str(parent_dir))
    assert code == 2 and "no cooldown forks among these runs" in stderr


def test_the_frontiers_csv_holds_the_values_as_recorded(cooldowns, tmp_path):
    """Numbers a spreadsheet reads (not the printed '1,024' and 4 digits), full paths."""
    parent_dir, sweep = cooldowns
    path = tmp_path / "frontier.csv"
    code, stderr = call_main(gptexp.compare.main, "--frontier", str(sweep), f"csv={path}")
    assert code == 0, stderr
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    own = {r["step"]: r for r in read_metrics(sweep / "0") if "val/loss" in r}
    assert rows[0] == {
        "parent": str(parent_dir.resolve()), "from_step": "10", "cooldown": "6", "step": "16",
        "tokens": str(own[16]["tokens"]), "val/loss": repr(own[16]["val/loss"]),
        "parent_val/loss": repr(next(
            r["val/loss"] for r in read_metrics(parent_dir) if r["step"] == 16 and "val/loss" in r
        )),
        "run": str((sweep / "0").resolve()),
    }  # fmt: skip
    assert rows[1]["step"] == "26" and rows[1]["parent_val/loss"] == ""  # the parent ended at 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cooldown=0"], "cooldown='0': must be a number of updates >= 1"),
        (["cooldown=abc"], "cooldown='abc': must be a number of updates >= 1"),
        (["cooldown=5", "training.max_steps=30"], "training.max_steps=30: cooldown=... sets"),
        (["cooldown=5", "training.lr_schedule=cosine"], "training.lr_schedule=cosine: cooldown"),
        (["cooldown=5", "reset=step"], "reset=step would start them again"),
        (["ckpt=10,20", "cooldown=5"], "ckpt=10,20: several values make several forks; add -m"),
        (["-m", "ckpt=10,x", "cooldown=5"], "ckpt='x': must be last, best or a step number"),
    ],
)
def test_bad_cooldowns_are_refused_in_one_line(stored_parent, tmp_path, args, message):
    assert_refused_in_one_line(stored_parent, tmp_path, args, message)


def test_a_cooldown_forks_wandb_run_is_in_its_parents_group_named_by_its_cooldown(tmp_path):
    from types import SimpleNamespace

    from gptexp.fork import wandb_names
    from gptexp.run.forking import cooldown_overrides

    start = SimpleNamespace(
        parent=SimpleNamespace(path=tmp_path / "constant"),
        parent_status={"wandb_name": "lr-1e-3", "wandb_group": "sweep-7"},
        step=1000,
        overrides=["training.lr=3e-4", *cooldown_overrides(1000, 200)],
        cooldown=200,
    )
    assert wandb_names(start) == ("sweep-7", "lr-1e-3@1000 cooldown=200,training.lr=3e-4")
