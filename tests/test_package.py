"""The package as a user installs it: the config tree inside the wheel, a user's own config
group, defaults in one place, imports that point downward, and no torch for the readers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gptexp.core.config import TrainConfig, config_to_dict
from gptexp.observe.metrics import flatten
from tests.conftest import ROOT, compose_config, subprocess_env


def test_a_config_built_in_code_equals_the_composed_default():
    composed, built = (
        flatten(config_to_dict(compose_config())),
        flatten(config_to_dict(TrainConfig())),
    )
    assert composed.keys() == built.keys()
    for key, value in built.items():
        assert composed[key] == value, key


def test_readers_do_not_import_torch():
    code = (
        "import sys, gptexp.compare, gptexp.observe.runtable, gptexp.observe.rundir,"
        " gptexp.observe.metrics;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def gptexp_imports() -> dict[str, set[str]]:
    """Module -> the gptexp modules it imports, counting imports inside functions."""
    package = ROOT / "gptexp"
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in package.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m not in (name, "gptexp")}
    return graph


def test_imports_point_downward_without_a_cycle():
    graph, visiting, done = gptexp_imports(), [], set()

    def visit(module: str) -> None:
        visiting.append(module)
        for target in sorted(graph[module]):
            assert target not in visiting, "import cycle: " + " -> ".join([*visiting, target])
            if target not in done:
                visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    commands = {"gptexp.train", "gptexp.resume", "gptexp.eval", "gptexp.export",
                "gptexp.compare", "gptexp.diff", "gptexp.fork", "gptexp.repair"}  # fmt: skip
    for command in commands & graph.keys():
        assert not graph[command] & commands, f"{command} imports another command"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("gptexp-*.whl")
    return path


def test_the_wheel_ships_the_config_tree(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "gptexp/conf/train.yaml" in names
    assert {"gptexp/conf/model/tiny.yaml", "gptexp/conf/hydra/launcher/slurm.yaml"} <= set(names)
    assert not any(name.startswith("tests/") for name in names)
    # Hydra's plugin namespace: gptexp's Optuna sweeper, and no __init__.py that would hide
    # every other plugin (the launchers) behind gptexp's.
    assert "hydra_plugins/gptexp_optuna_sweeper/optuna_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names


@pytest.mark.slow
def test_an_installed_wheel_works_from_anywhere_with_a_user_config_group(wheel, tmp_path):
    """Installed non-editable (into its own directory, ahead of the checkout on the path), run
    from a directory outside the checkout: train with the user's own model group, resume,
    evaluate, sweep and compare."""
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    env = subprocess_env(PYTHONPATH=str(site))  # the installed copy only, not the checkout
    work = tmp_path / "elsewhere"
    (work / "my_conf" / "model").mkdir(parents=True)
    (work / "my_conf" / "model" / "mine.yaml").write_text(
        "n_layer: 1\nn_head: 2\nn_embd: 32\nblock_size: 32\n"
    )

    def gptexp(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    where = gptexp("-c", "import gptexp; print(gptexp.__file__)").stdout
    assert where.startswith(str(site)), where
    fast = ["training=debug", "training.num_threads=1", "training.device=cpu"]
    gptexp(
        "-m",
        "gptexp.train",
        "--config-dir",
        "my_conf",
        "model=mine",
        *fast,
        "training.max_steps=6",
        "hydra.run.dir=runs/a",
    )
    status = json.loads((work / "runs" / "a" / "run.json").read_text())
    assert status["status"] == "finished" and status["config"]["model"]["n_embd"] == 32
    gptexp("-m", "gptexp.resume", "run=runs/a", "training.max_steps=8")
    assert json.loads((work / "runs" / "a" / "run.json").read_text())["step"] == 8
    assert "loss" in gptexp("-m", "gptexp.eval", "run=runs/a", "samples=0").stdout
    gptexp(
        "-m",
        "gptexp.train",
        "-m",
        "model=nano",
        *fast,
        "training.max_steps=4",
        "training.lr=1e-3,3e-4",
        "hydra.sweep.dir=sweep",
    )
    table = gptexp("-m", "gptexp.compare", "sweep").stdout
    assert "training.lr" in table and table.count("finished") == 2
    # experiment=optuna_lr finds gptexp's Optuna sweeper in the installed hydra_plugins.
    gptexp(
        "-m",
        "gptexp.train",
        "-m",
        "experiment=optuna_lr",
        *fast,
        "training.max_steps=4",
        "training.eval_every=2",
        "hydra.sweeper.n_trials=2",
        "hydra.sweep.dir=search",
    )
    assert (work / "search" / "optuna.db").is_file()
    assert OmegaConf.load(work / "search" / "optimization_results.yaml").best_value > 0
