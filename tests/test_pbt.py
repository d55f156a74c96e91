"""gptexp's population-based training sweeper through the real CLI: the same seed gives the same
population and weights; a launch SIGKILLed in a round's training, in pbt.json's write or in a
fork member's start ends, relaunched, as an uninterrupted one; a damaged or foreign pbt.json
and bad settings are one line and exit 2 (experiment=pbt on the nano model: 3 members, 3
rounds of 4 steps)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptexp.compare
import gptexp.train
from tests.conftest import (
    FAST,
    ROOT,
    call_main,
    files_of,
    run_module,
    subprocess_env,
    wait_until,
)
from tests.test_optuna_sweep import checkpointed_steps

STEPS = 4
PBT = [
    "experiment=pbt",
    "hydra.sweeper.population=3",
    "hydra.sweeper.rounds=3",
    f"hydra.sweeper.steps_per_round={STEPS}",
    "hydra.sweeper.seed=0",
    "training.warmup_steps=2",
    "checkpoint.every_steps=2",  # a checkpoint in the middle of each round: a kill lands there
]


def launch(sweep_dir: Path, *extra: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return run_module(
        "gptexp.train", "-m", *FAST, *PBT, *extra, f"hydra.sweep.dir={sweep_dir}", cwd=cwd, env=env
    )


def record(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "pbt.json").read_text())


def final_weights(sweep_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each member's model at the end of the last round."""
    last = record(sweep_dir)["rounds"][-1]
    weights = {}
    for member in last["members"]:
        path = sweep_dir / member["run"] / "checkpoints" / f"step_{3 * STEPS:07d}.pt"
        weights[member["run"]] = torch.load(path, weights_only=True)["model"]
    return weights


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = final_weights(a), final_weights(b)
    assert left.keys() == right.keys()
    for run, state in left.items():
        assert all(torch.equal(state[k], right[run][k]) for k in state), run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted PBT, compared with every other launch below."""
    base = tmp_path_factory.mktemp("pbt")
    env = subprocess_env(GPTEXP_CACHE=str(base / "cache"), WANDB_MODE="offline")
    done = launch(base / "sweep", cwd=base, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "sweep"


def test_the_same_seed_gives_the_same_population_scores_and_weights(reference, tmp_path, capsys):
    pbt = record(reference)
    rounds = pbt["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all([m["member"] for m in r["members"]] == [0, 1, 2] for r in rounds)
    # Round 0: four sampled lrs in the preset's range, no parents.
    first = rounds[0]["members"]
    assert all(m["parent"] is None and m["run"] == f"r0-m{m['member']}" for m in first)
    assert all(1e-4 <= m["params"]["training.lr"] <= 3e-2 for m in first)
    assert len({m["params"]["training.lr"] for m in first}) == 3
    for before, after in zip(rounds, rounds[1:], strict=False):
        ranked = sorted(before["members"], key=lambda m: (m["score"], m["member"]))
        best, worst = ranked[0], ranked[-1]
        for old, new in zip(before["members"], after["members"], strict=True):
            if old["member"] == worst["member"]:  # the worst quarter of 3: one member
                assert new["run"] == f"r{after['round']}-m{old['member']}"
                assert new["parent"] == best["run"]
                factor = new["params"]["training.lr"] / best["params"]["training.lr"]
                assert factor == pytest.approx(0.8) or factor == pytest.approx(1.25)
            else:
                assert {k: new[k] for k in ("run", "parent", "params")} == {
                    k: old[k] for k in ("run", "parent", "params")
                }
    best = min(rounds[-1]["members"], key=lambda m: (m["score"], m["member"]))
    assert pbt["best"] == {"round": 2, **best}
    # Every member's run.json names the parent (and the round's first step) pbt.json names.
    for round_ in rounds:
        for member in round_["members"]:
            status = json.loads((reference / member["run"] / "run.json").read_text())
            if member["parent"] is None:
                assert "parent" not in status
            else:
                parent = status["parent"]
                assert Path(parent["run"]) == (reference / member["parent"]).resolve()
                assert parent["step"] == int(member["run"][1]) * STEPS
            training = status["config"]["training"]
            assert training["lr"] == member["params"]["training.lr"]
            assert training["lr_schedule"] == "constant"  # the preset's: lr after the warm-up
    assert any(m["parent"] for r in rounds for m in r["members"])  # the test saw a fork

    again = tmp_path / "sweep"
    done = launch(again, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (again / "pbt.json").read_text() == (reference / "pbt.json").read_text()
    assert_same_weights(again, reference)

    # The family tree shows the forks under their parents.
    code, stderr = call_main(gptexp.compare.main, "--tree", str(again))
    assert code == 0, stderr
    tree = capsys.readouterr().out
    forks = [
        m for r in rounds for m in r["members"] if m["parent"] and m["run"][1] == str(r["round"])
    ]
    for fork in forks:
        assert f"└─ {fork['run']}  @" in tree or f"├─ {fork['run']}  @" in tree

    # A relaunch of a finished PBT trains nothing and leaves pbt.json as it was.
    written = (again / "pbt.json").stat().st_mtime_ns
    args = ("-m", *FAST, *PBT, f"hydra.sweep.dir={again}")
    code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert "round 2: best member" in stderr and "Launching" not in stderr
    assert (again / "pbt.json").stat().st_mtime_ns == written


def killed_at(where: str, which: str, sweep_dir: Path, cwd: Path) -> str:
    """A PBT launch that SIGKILLs itself at ``where`` (tests/killing_launcher.py); its stderr."""
    killer = [sys.executable, str(ROOT / "tests" / "killing_launcher.py"), where, which]
    killed = subprocess.run(
        [*killer, "gptexp.train", "-m", *FAST, *PBT, f"hydra.sweep.dir={sweep_dir}"],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return killed.stderr


def test_a_pbt_killed_anywhere_and_relaunched_ends_as_an_uninterrupted_one(reference, tmp_path):
    # One sweep killed at each kind of point in turn, each relaunch going on from the last:
    # 1. SIGKILLed from outside in the middle of round 1's training (round 1 trains steps 5..8;
    #    a checkpoint at step 6 is its middle).
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "gptexp.train", "-m", *FAST, *PBT]
    process = subprocess.Popen(
        [*command, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(
        lambda: any(STEPS + 2 in checkpointed_steps(run) for run in sweep_dir.glob("r*-m*")),
        process=process,
        what="a member's checkpoint in the middle of round 1",
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert len(record(sweep_dir)["rounds"]) == 1  # round 0 was recorded, round 1 was not
    cut = [run for run in sweep_dir.glob("r*-m*") if max(checkpointed_steps(run)) == STEPS + 2]

    # 2. The relaunch resumes the cut runs there, ends round 1 and dies while it writes round
    #    1's record (its first write: round 0's record is there already).
    killed_at("pbt-record", "1", sweep_dir, tmp_path)
    for run in cut:
        assert f"resuming from step_{STEPS + 2:07d}.pt" in (run / "train.log").read_text()
    assert len(record(sweep_dir)["rounds"]) == 1  # the old pbt.json, and a torn temporary
    assert (sweep_dir / "pbt.json.tmp").is_file()

    # 3. The next takes round 1's results without training it again, records them, and dies
    #    in round 2's fork member once its run.json records it, before its first checkpoint
    #    (resumed, it would start from scratch: it must begin again as the fork of its parent).
    stderr = killed_at("fork-start", "r2-", sweep_dir, tmp_path)
    assert "round 1: best member" in stderr
    assert "Launching" not in stderr.split("round 1: best member")[0]
    assert len(record(sweep_dir)["rounds"]) == 2 and not (sweep_dir / "pbt.json.tmp").exists()
    (fork,) = sweep_dir.glob("r2-m*")
    status = json.loads((fork / "run.json").read_text())
    assert status["parent"]["step"] == 2 * STEPS and not checkpointed_steps(fork)

    # 4. The last relaunch ends as the uninterrupted sweep: pbt.json and every weight.
    done = launch(sweep_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sweep_dir / "pbt.json").read_text() == (reference / "pbt.json").read_text()
    assert_same_weights(sweep_dir, reference)


@pytest.mark.parametrize("damage", ["torn", "another seed"])
def test_a_damaged_or_foreign_pbt_json_is_named_and_left_as_it_is(reference, tmp_path, damage):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    text = (reference / "pbt.json").read_text()
    if damage == "torn":
        text = text[: len(text) // 2]
    else:
        text = text.replace(
            str(record(reference)["rounds"][0]["members"][1]["params"]["training.lr"]), "0.001"
        )
    (sweep_dir / "pbt.json").write_text(text)
    args = ("-m", *FAST, *PBT, f"hydra.sweep.dir={sweep_dir}")
    code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(sweep_dir / "pbt.json") in errors[0], stderr[-3000:]
    assert (sweep_dir / "pbt.json").read_text() == text
    assert not list(sweep_dir.glob("r*-m*"))  # nothing trained


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("hydra.sweeper.population=1", "hydra.sweeper.population=1"),
        ("hydra.sweeper.rounds=0", "hydra.sweeper.rounds=0"),
        ("hydra.sweeper.steps_per_round=0", "hydra.sweeper.steps_per_round=0"),
        ("training.lrr=tag(log,interval(1e-4,1e-2))", "lrr"),
        ("+hydra.sweeper.params={training.lrr:'interval(1e-4,1e-2)'}", "lrr"),
        ("+hydra.sweeper.params={model.n_layer:'interval(1,4)'}", "model.n_layer"),
        ("+hydra.sweeper.perturb={training.beta1:[0.9]}", "training.beta1"),
        ("training.lr=interval(1e-2,1e-4)", "low < high"),
        ("training.lr=tag(log,interval(0,1e-2))", "low > 0"),
        ("training.max_steps=100", "training.max_steps"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(tmp_path, override, named):
    sweep_dir = tmp_path / "sweep"
    args = ("-m", *FAST, *PBT, override, f"hydra.sweep.dir={sweep_dir}")
    code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and named in errors[0], stderr[-3000:]
    assert not list(sweep_dir.glob("r*-m*"))


def test_a_relaunch_with_other_steps_per_round_is_one_line_and_launches_nothing(
    reference, tmp_path
):
    """The members' runs trained in rounds of STEPS: a relaunch with other rounds is refused
    by name before any member's job (whose Hydra files it would overwrite) is launched."""
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(reference, sweep_dir)
    before = files_of(sweep_dir)
    for steps in (STEPS + 2, STEPS // 2):
        rounds = f"hydra.sweeper.steps_per_round={steps}"
        args = ("-m", *FAST, *PBT, rounds, f"hydra.sweep.dir={sweep_dir}")
        code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
        assert code == 2, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert (
            len(errors) == 1
            and f"{sweep_dir / 'r0-m0'}: trained in rounds of {STEPS} steps" in (errors[0])
            and f"relaunch with steps_per_round={STEPS}" in errors[0]
        ), stderr[-3000:]
        assert "Launching" not in stderr
    after = files_of(sweep_dir)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


def test_a_relaunch_with_other_settings_takes_no_result_and_launches_nothing(tmp_path):
    """A finished sweep (one round) relaunched with another fixed setting: its runs trained
    otherwise, so their results are not this command's (it exited 0 with them) and their jobs
    would refuse."""
    sweep_dir = tmp_path / "sweep"
    one_round = [item.replace("rounds=3", "rounds=1") for item in PBT]
    args = ("-m", *FAST, *one_round, f"hydra.sweep.dir={sweep_dir}")
    code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    before = files_of(sweep_dir)
    args = (*args, "training.weight_decay=0.2")
    code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    said = f"{sweep_dir / 'r0-m0'}: trained with other settings than this launch's"
    assert len(errors) == 1 and said in errors[0], stderr[-3000:]
    assert "training.weight_decay=0.1 where this launch gives 0.2" in errors[0]
    assert "Launching" not in stderr
    after = files_of(sweep_dir)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


def test_a_moved_sweep_names_the_fork_link_that_ties_it_to_its_old_place(reference, tmp_path):
    """pbt.json names runs relative to the sweep, but a fork member's run.json names its parent
    by absolute path: a moved sweep is refused naming both places, not 'hyperparameters'."""
    sweep_dir = tmp_path / "moved"
    shutil.copytree(reference, sweep_dir)
    before = files_of(sweep_dir)
    fork = next(m for m in record(reference)["rounds"][1]["members"] if m["parent"])
    args = ("-m", *FAST, *PBT, f"hydra.sweep.dir={sweep_dir}")
    code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    said = (
        f"{sweep_dir / fork['run']}: not the run of this sweep's member {fork['member']} (it is "
        f"a fork of {reference / fork['parent']} at step {STEPS}, the member a fork of "
        f"{sweep_dir / fork['parent']} at step {STEPS})"
    )
    assert len(errors) == 1 and said in errors[0], stderr[-3000:]
    after = files_of(sweep_dir)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


def test_a_run_in_a_members_place_that_is_not_its_own_is_named_and_left_as_it_is(
    reference, tmp_path
):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(reference / "r0-m1", sweep_dir / "r0-m0")  # another lr than member 0's
    before = (sweep_dir / "r0-m0" / "run.json").read_bytes()
    args = ("-m", *FAST, *PBT, f"hydra.sweep.dir={sweep_dir}")
    code, stderr = call_main(gptexp.train.main, *args, cwd=tmp_path)
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert (
        len(errors) == 1
        and f"{sweep_dir / 'r0-m0'}: not the run of this sweep's member 0" in (errors[0])
    ), stderr[-3000:]
    assert (sweep_dir / "r0-m0" / "run.json").read_bytes() == before
    assert [p.name for p in sweep_dir.iterdir() if p.name.startswith("r")] == ["r0-m0"]


def test_a_diverged_member_ranks_last_and_is_replaced(tmp_path):
    # In this process (the launches above hold the real CLI). Seed 2 draws lr 1e4 (NaN within
    # two steps) for member 0 and 1e-3 for member 1.
    diverging = ["-m", *FAST, *PBT, "training.lr=choice(1e-3,1e4)", "hydra.sweeper.population=2"]
    sweep_dir = tmp_path / "sweep"
    code, stderr = call_main(
        gptexp.train.main,
        *diverging,
        "hydra.sweeper.rounds=2",
        "hydra.sweeper.seed=2",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert code == 0, stderr[-3000:]  # a diverged member is a result
    first, second = record(sweep_dir)["rounds"]
    assert [m["params"]["training.lr"] for m in first["members"]] == [1e4, 1e-3]
    assert first["members"][0]["score"] is None and first["members"][1]["score"] > 0
    assert second["members"][0]["run"] == "r1-m0" and second["members"][0]["parent"] == "r0-m1"
    assert "round 0: member 0 (r0-m0) failed" in stderr

    # Seed 1 draws 1e4 for both: a round without a result ends the search (exit 1).
    everyone = tmp_path / "everyone"
    code, stderr = call_main(
        gptexp.train.main,
        *diverging,
        "hydra.sweeper.seed=1",
        f"hydra.sweep.dir={everyone}",
        cwd=tmp_path,
    )
    assert code == 1, stderr[-3000:]
    assert "failed: every member of round 0 failed" in stderr
    assert [m["score"] for m in record(everyone)["rounds"][0]["members"]] == [None, None]
