"""The package as a user installs it: the config tree inside the wheel, a user's own config
group, defaults in one place, floors whose imports point downward, no torch for the readers,
and a module map that is the tree."""

from __future__ import annotations

import ast
import json
import re
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


# The floors of the package, top to bottom (README's "Where things live" draws them). A module
# imports modules of its own floor or of a floor below, never above; the commands are the
# modules directly in gptexp/ (``python -m gptexp.<command>``), and no command imports another.
LAYERS = ["commands", "tools", "run", "training", "checkpoint", "model", "data", "observe", "core"]
NO_TORCH = {"core", "observe"}  # the readers: compare and sweep summaries load no torch


def layer_of(module: str) -> str:
    """``gptexp.run.sweep`` -> ``run``; ``gptexp.train`` (a command) -> ``commands``."""
    floor = module.split(".")[1]
    return floor if floor in LAYERS else "commands"


def gptexp_modules() -> dict[str, Path]:
    package = ROOT / "gptexp"
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in package.rglob("*.py")
    }


def gptexp_imports() -> dict[str, set[str]]:
    """Module -> the gptexp modules it imports, counting imports inside functions."""
    modules = gptexp_modules()
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


def test_every_sub_package_is_a_floor():
    floors = {p.parent.name for p in (ROOT / "gptexp").glob("*/__init__.py")}
    assert floors == set(LAYERS) - {"commands"}


def test_imports_point_down_the_floors():
    graph = gptexp_imports()
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in sorted(graph.items())
        if module != "gptexp"
        for target in sorted(targets)
        if LAYERS.index(layer_of(target)) < LAYERS.index(layer_of(module))
    ]
    assert not upward, "imports up a floor:\n" + "\n".join(upward)
    commands = {m for m in graph if m != "gptexp" and layer_of(m) == "commands"}
    for command in sorted(commands - {"gptexp.__main__"}):  # python -m gptexp: the train command
        assert not graph[command] & commands, f"{command} imports another command"


def test_imports_have_no_cycle():
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


def test_readers_do_not_import_torch():
    readers = sorted(m for m in gptexp_modules() if m != "gptexp" and layer_of(m) in NO_TORCH)
    for module in readers:  # not even inside a function
        tree = ast.parse(gptexp_modules()[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "torch" for n in names), f"{module} imports torch"
    code = (
        f"import sys, {', '.join([*readers, 'gptexp.compare'])};"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def module_map() -> tuple[Path, str]:
    """The fenced block under the heading "Where things live" (README.md or docs/*.md)."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8") if page.is_file() else ""
        heading = re.search(r"^#+ .*Where things live.*$", text, re.M)
        if heading:
            block = re.search(r"^```[^\n]*\n(.*?)^```", text[heading.end() :], re.M | re.S)
            assert block, f"{page.name}: no fenced block under {heading.group(0)!r}"
            return page, block.group(1)
    raise AssertionError("no heading 'Where things live' in README.md or docs/*.md")


def map_entries(block: str) -> tuple[set[str], list[str]]:
    """The module paths the map names (a ``name.py`` line under the folder lines, ``name/``,
    indented above it) and its floors in the order drawn. Other lines are descriptions."""
    folders: list[tuple[int, str]] = []
    modules, floors = set(), []
    for line in block.splitlines():
        token = line.split()[0] if line.strip() else ""
        if not token.endswith((".py", "/")):
            continue
        indent = len(line) - len(line.lstrip())
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = "/".join([f for _, f in folders] + [token.rstrip("/")])
        if token.endswith("/"):
            folders.append((indent, token.rstrip("/")))
            if path.count("/") == 1:
                floors.append(path.split("/")[1])
        else:
            modules.add(path)
    return modules, floors


def test_the_module_map_is_the_tree():
    page, block = module_map()
    listed, floors = map_entries(block)
    real = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "gptexp").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert not listed - real, f"{page.name}'s map lists {sorted(listed - real)}: not modules"
    assert not real - listed, f"{page.name}'s map leaves out {sorted(real - listed)}"
    assert [f for f in floors if f in LAYERS] == LAYERS[1:], "the map draws the floors in order"


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
    # Hydra's plugin namespace: gptexp's sweepers (Optuna, PBT), and no __init__.py that would hide
    # every other plugin (the launchers) behind gptexp's.
    assert "hydra_plugins/gptexp_optuna_sweeper/optuna_sweeper.py" in names
    assert "hydra_plugins/gptexp_pbt_sweeper/pbt_sweeper.py" in names
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
