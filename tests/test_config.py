"""The config tree: every option composes into typed config, and bad input is refused early.

A user relies on two things here: any ``group=option`` listed under ``conf/`` works as shipped,
and a typo, a wrong type or an impossible value stops the command before any work with a
message that names the key, without creating or touching a run directory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import gptexp.train
from gptexp.core.config import TrainConfig, config_to_dict, to_train_config
from gptexp.core.errors import ConfigError
from gptexp.data.corpus import prepare_corpus
from tests.conftest import (
    CONF_DIR,
    FAST,
    call_main,
    compose_config,
    read_metrics,
    run_module,
    subprocess_env,
)

GROUPS = ("model", "data", "training", "checkpoint", "logger", "experiment")


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


ALL_OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


@pytest.fixture
def small_text(tmp_path) -> Path:
    """A short UTF-8 corpus: 2,000 characters, so a 200-character validation split."""
    path = tmp_path / "small.txt"
    path.write_text(("the quick brown fox jumps over the lazy dog. " * 50)[:2000], encoding="utf-8")
    return path


def _extra_for(group: str, option: str, tmp_path: Path) -> list[str]:
    """What an option needs besides itself (data=text needs a file)."""
    if group == "data" and option == "text":
        return [f"data.path={tmp_path / 'corpus.txt'}"]
    return []


def _assert_applied(expected: dict, actual, where: str) -> None:
    """Every key set in a YAML file shows up with its value in the typed config."""
    for key, value in expected.items():
        if key in ("defaults", "hydra") or value == "???":  # ???: given on the command line
            continue
        assert hasattr(actual, key), f"{where}.{key} missing from the typed config"
        got = getattr(actual, key)
        if isinstance(value, dict):
            _assert_applied(value, got, f"{where}.{key}")
        else:
            assert got == value, f"{where}.{key}: YAML says {value!r}, config has {got!r}"


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no options"
    assert {"nano", "tiny", "small", "gpt2"} <= set(group_options("model"))
    assert {"default", "debug"} <= set(group_options("training"))
    assert {"none", "wandb"} <= set(group_options("logger"))


def test_defaults_compose_to_typed_config():
    cfg = compose_config()
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (4, 4, 128)
    assert cfg.data.name == "pydocs" and cfg.data.path is None
    assert cfg.logger.wandb is False
    assert cfg.experiment is None


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_converts(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}", *_extra_for(group, option, tmp_path)])
    # Round trip through a plain dict (what checkpoints and run.json store).
    assert to_train_config(config_to_dict(cfg)) == cfg
    spec = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    if group == "experiment":
        assert cfg.experiment == option
        _assert_applied(spec, cfg, "")
    else:
        _assert_applied(spec, getattr(cfg, group), group)


def test_model_shapes_of_the_issue():
    shapes = {name: compose_config([f"model={name}"]).model for name in ("nano", "tiny", "gpt2")}
    tiny, gpt2 = shapes["tiny"], shapes["gpt2"]
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.block_size) == (4, 4, 128, 128)
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024)
    assert gpt2.bias is True


def test_experiment_shakespeare_char_is_the_reference_run():
    cfg = compose_config(["experiment=shakespeare_char"])
    t = cfg.training
    assert cfg.data.name == "shakespeare" and cfg.data.tokenizer == "char"
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (
        4,
        4,
        128,
        128,
    )
    assert (cfg.model.dropout, cfg.model.bias, t.precision) == (0.0, False, "fp32")
    assert (t.max_steps, t.batch_size, t.lr, t.min_lr, t.warmup_steps) == (300, 32, 1e-3, 1e-4, 100)
    assert (t.beta2, t.weight_decay, t.grad_clip, t.num_threads) == (0.99, 0.1, 1.0, 2)


def test_command_line_overrides_win_over_group_files():
    cfg = compose_config(["experiment=quick", "training.max_steps=7", "model.dropout=0.1"])
    assert cfg.training.max_steps == 7
    assert cfg.model.dropout == 0.1
    assert cfg.model.n_layer == 2  # from the experiment's model=nano


# ----------------------------------------------------------------------------- bad input

# (overrides, the key the message must name). Each is one class of bad input.
BAD_AT_COMPOSITION = {
    "wrong type float": (["training.lr=abc"], "training.lr"),
    "wrong type int": (["model.n_layer=two"], "model.n_layer"),
    "wrong type bool": (["model.bias=maybe"], "model.bias"),
}
BAD_VALUES = {
    "n_embd not divisible by n_head": (["model.n_embd=100", "model.n_head=3"], "model.n_embd"),
    "lr negative": (["training.lr=-1"], "training.lr"),
    "lr zero": (["training.lr=0"], "training.lr"),
    "unknown device": (["training.device=tpu"], "training.device"),
    "missing data.path for data=text": (["data=text"], "data.path"),
    "unknown tokenizer": (["data.tokenizer=words"], "data.tokenizer"),
    "val_fraction out of range": (["data.val_fraction=1.5"], "data.val_fraction"),
    "negative seed": (["training.seed=-1"], "training.seed=-1: must be in [0, 2**63)"),
    "unknown compile mode": (
        ["training.compile_mode=max-autotune"],
        "training.compile_mode='max-autotune': must be one of default, reduce-overhead, "
        "max-autotune-no-cudagraphs",
    ),
    "unknown schedule": (["training.lr_schedule=linear"], "training.lr_schedule='linear': must"),
    "wsd without decay": (["training.lr_schedule=wsd"], "training.decay_steps=0: must be >= 1"),
    "decay past max_steps": (
        ["training.lr_schedule=wsd", "training.max_steps=10", "training.decay_steps=11"],
        "training.decay_steps=11: must be <= training.max_steps=10",
    ),
    "negative decay": (["training.decay_steps=-1"], "training.decay_steps=-1: must be >= 0"),
    "ema_decay of 1": (["training.ema_decay=1"], "training.ema_decay=1.0: must be in [0, 1)"),
    "negative ema_decay": (["training.ema_decay=-0.1"], "training.ema_decay=-0.1: must be"),
}


@pytest.mark.parametrize(
    ("overrides", "key"), BAD_AT_COMPOSITION.values(), ids=BAD_AT_COMPOSITION.keys()
)
def test_composition_rejects_typos_and_wrong_types(overrides, key):
    """A value its key's type cannot hold is bad input, named before Hydra composes."""
    with pytest.raises(ConfigError) as error:
        compose_config(overrides)
    assert str(error.value).startswith(f"{key}=")


# (overrides, the line's start, the suggestion): however a key is added, it must be the schema's.
UNKNOWN_KEYS = {
    "typo": (["training.lrr=1"], "training.lrr: no such config key", "training.lr?"),
    "append": (["+training.lrr=1"], "training.lrr: no such config key", "training.lr?"),
    "force append": (["++training.lrr=1"], "training.lrr: no such config key", "training.lr?"),
    "nested": (["+training.guard.actoin=off"], "training.guard.actoin", "training.guard.action?"),
    "top level": (["trainig.lr=1"], "trainig: no such config key", "training?"),
    "new top level": (["+foo=1"], "foo: no such config key", "known: checkpoint"),
    "group option": (["model=tinny"], "model=tinny: no such option", "model=tiny?"),
    "group sweep": (["model=nano,tinny"], "model=tinny: no such option", "model=tiny?"),
    "group list": (
        ["logger=[wandb,tensorbord]"],
        "logger=tensorbord: no such option",
        "logger=tensorboard?",
    ),
}


@pytest.mark.parametrize(
    ("overrides", "start", "hint"), UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys()
)
def test_unknown_keys_and_options_are_refused_with_the_closest(overrides, start, hint):
    with pytest.raises(ConfigError) as error:
        compose_config(overrides)
    assert str(error.value).startswith(start) and hint in str(error.value)


def test_an_override_hydra_cannot_parse_is_named():
    with pytest.raises(ConfigError, match=r"^'training\.lr=\[': not an override key=value"):
        compose_config(["training.lr=["])


def test_hydra_keys_and_presets_still_compose():
    cfg = compose_config(["experiment=quick", "hydra.run.dir=/tmp/x", "logger.entity=null"])
    assert cfg.experiment == "quick" and cfg.logger.entity is None


def test_own_groups_on_the_search_path_are_options(tmp_path):
    """docs/training.md's own groups (``--config-dir``, ``hydra.searchpath``) are options too."""
    from gptexp.train import check_command_line

    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mine.yaml").write_text("n_layer: 1\n")
    mine = str(tmp_path / "my_conf")
    check_command_line(["--config-dir", mine, "model=mine", "training.lr=0.1"])
    check_command_line([f"hydra.searchpath=[file://{mine}]", "model=mine"])
    check_command_line(["--config-name", "other", "model=whatever"])  # another primary config
    with pytest.raises(ConfigError, match=r"^model=mien: no such option \(did you mean model=mine"):
        check_command_line(["--config-dir", mine, "model=mien"])
    with pytest.raises(ConfigError, match=r"^model=mine: no such option"):
        check_command_line(["model=mine"])


def test_a_key_added_behind_composition_is_refused():
    """The typed config is the one source of keys, whatever composed the tree: Hydra's
    ``+key`` adds to a structured node, which OmegaConf would carry as a stray attribute."""
    tree = OmegaConf.structured(TrainConfig)
    OmegaConf.update(tree, "training.lrr", 1, force_add=True)  # what Hydra does for +key
    with pytest.raises(ConfigError, match=r"^training\.lrr: .*did you mean training\.lr\?"):
        to_train_config(tree)


@pytest.mark.parametrize(
    "args",
    [
        ["+training.lrr=1"],
        ["model=tinny"],
        ["-m", "training.lrr=1,2"],
        ["training.lr=abc"],
        ["-m", "training.lr=1e-3,abc"],
    ],
    ids=["append", "group option", "sweep", "wrong type", "wrong type in a sweep"],
)
def test_train_refuses_unknown_keys_with_one_line_and_exit_2(args, tmp_path):
    run_dir = tmp_path / "run"
    code, stderr = call_main(gptexp.train.main, *args, *FAST, f"hydra.run.dir={run_dir}")
    assert code == 2, stderr
    named = "did you mean" in stderr or "training.lr=abc: " in stderr
    assert stderr.count("error:") == 1 and named, stderr
    assert "Traceback" not in stderr and not run_dir.exists()


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"training": {"lrr": 1}}, "training.lrr"),
        ({"bogus": 1}, "bogus"),
        ({"training": {"lr": "abc"}}, "training.lr"),
        ({"model": {"n_layer": "two"}}, "model.n_layer"),
        ({"training": {"max_steps": 1.5}}, "training.max_steps"),
        ({"model": {"bias": "maybe"}}, "model.bias"),
    ],
)
def test_to_train_config_names_the_key_of_typos_and_wrong_types(tree, key):
    """A plain dict (e.g. a checkpoint's config) is checked like a composed config."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_train_config(tree)


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_impossible_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        compose_config(overrides)
    assert str(error.value).startswith(key)


def test_typed_config_validates_on_construction():
    base = compose_config()
    with pytest.raises(ConfigError, match=r"^training\.lr"):
        dataclasses.replace(base.training, lr=-0.5)
    with pytest.raises(ConfigError, match=r"^model\.n_embd"):
        dataclasses.replace(base.model, n_embd=30, n_head=4)


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("default", {}),  # no mode argument: torch.compile as before the key existed
        ("reduce-overhead", {"mode": "reduce-overhead"}),
        ("max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"}),
    ],
)
def test_compile_mode_is_what_torch_compile_is_given(mode, options):
    from gptexp.training.compile_policy import compile_options

    training = compose_config([f"training.compile_mode={mode}"]).training
    assert compile_options(training) == options


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_trainer_compiles_with_the_configured_mode(mode, tmp_path, monkeypatch):
    import torch

    from tests.conftest import make_trainer

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    cfg = compose_config([*FAST, "training.compile=true", f"training.compile_mode={mode}"])
    make_trainer(cfg, tmp_path / "run")
    assert calls == [{} if mode == "default" else {"mode": mode}]


def test_block_size_longer_than_the_corpus_names_the_key(small_text):
    cfg = compose_config(["data=text", f"data.path={small_text}", "model.block_size=256"])
    with pytest.raises(ConfigError, match=r"^model\.block_size=256"):
        prepare_corpus(cfg.data, cfg.model.block_size)
    # The same file works with a block that fits its 200-character validation split.
    prepare_corpus(cfg.data, 64)


# ----------------------------------------------------------------------------- through the CLI

CLI_CASES = {
    "typo": (["training.lrr=1"], "training.lrr"),
    "wrong type": (["training.lr=abc"], "training.lr"),
    "n_embd % n_head": (["model.n_embd=100", "model.n_head=3"], "model.n_embd"),
    "lr <= 0": (["training.lr=0"], "training.lr"),
    "unknown device": (["training.device=tpu"], "training.device"),
    "missing data.path": (["data=text"], "data.path"),
    "block_size > corpus": (["model.block_size=100000"], "model.block_size"),
}


@dataclasses.dataclass
class CliResult:
    returncode: int
    stderr: str
    cwd: Path
    run_dir: Path


# These cases run as real ``python -m gptexp.train`` processes (side by side, since each start
# costs seconds of imports); the others call the same ``main()`` in this process.
IN_A_PROCESS = ("typo", "n_embd % n_head", "block_size > corpus")


@pytest.fixture(scope="module")
def bad_cli_results(tmp_path_factory) -> dict[str, CliResult]:
    """Each bad command line of CLI_CASES, run once, each from a directory of its own."""
    base = tmp_path_factory.mktemp("bad_cli")
    env = subprocess_env(GPTEXP_CACHE=str(base / "cache"))
    launched, results = {}, {}
    for number, (name, (overrides, _)) in enumerate(CLI_CASES.items()):
        cwd = base / f"case{number}"
        cwd.mkdir()
        run_dir = cwd / "runs" / "bad"
        args = [*FAST, *overrides, f"hydra.run.dir={run_dir}"]
        if name in IN_A_PROCESS:
            process = subprocess.Popen(
                [sys.executable, "-m", "gptexp.train", *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            launched[name] = (process, cwd, run_dir)
            continue
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GPTEXP_CACHE", str(base / "cache"))
            code, stderr = call_main(gptexp.train.main, *args, cwd=cwd)
        results[name] = CliResult(code, stderr, cwd, run_dir)
    for name, (process, cwd, run_dir) in launched.items():
        _, stderr = process.communicate(timeout=180)
        results[name] = CliResult(process.returncode, stderr, cwd, run_dir)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES.keys())
def test_cli_refuses_bad_input_without_a_run_directory(case, bad_cli_results):
    result, key = bad_cli_results[case], CLI_CASES[case][1]
    assert result.returncode == 2, result.stderr  # a user error (errors.USER_ERRORS)
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not result.run_dir.exists()
    assert not (result.cwd / "outputs").exists()


@pytest.mark.slow
def test_cli_refuses_to_relaunch_into_a_finished_run(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)  # the shared run stays pristine whatever happens
    kept = ["run.json", "metrics.jsonl", ".hydra/overrides.yaml", ".hydra/config.yaml"]
    before = {name: (run_dir / name).read_bytes() for name in kept}
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    result = run_module(
        "gptexp.train", *FAST, "training.lr=0.5", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )

    assert result.returncode == 2, result.stderr  # a user error (errors.USER_ERRORS)
    assert "already holds a run" in result.stderr and str(run_dir) in result.stderr
    assert "make resume" in result.stderr
    assert {name: (run_dir / name).read_bytes() for name in kept} == before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    assert read_metrics(run_dir)[-1]["step"] == 20


# ----------------------------------------------------------------------------- resume and fork


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    """A run directory that stopped at step 57 (only its run.json: the config is read from it)."""
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    status = {"status": "interrupted", "step": 57, "config": config_to_dict(compose_config(FAST))}
    (run_dir / "run.json").write_text(json.dumps(status))
    return run_dir


# Words YAML 1.1 reads as booleans or null, and numbers that must stay strings: train parses
# them with Hydra's grammar, and resume and fork must read them the same way.
SAME_IN_TRAIN_AND_RESUME = [
    "training.guard.action=off",
    "training.guard.action=skip",
    "logger.project=on",
    "logger.project=yes",
    "logger.name=no",
    "logger.name=010",
    "logger.name=1e3",
    "logger.entity=null",
    "logger.entity='null'",
    "training.deterministic=yes",
    "training.compile=false",
    "training.seed=010",
    "logger.tags=[a,off]",
]


@pytest.mark.parametrize("override", SAME_IN_TRAIN_AND_RESUME)
def test_resume_and_fork_read_overrides_as_train_does(override, stopped_run):
    from gptexp.observe.rundir import RunDirectory
    from gptexp.run.session import overridden_config

    launched = config_to_dict(compose_config([*FAST, override]))
    run = RunDirectory(stopped_run)
    assert config_to_dict(overridden_config(run, [override])[0]) == launched
    assert config_to_dict(overridden_config(run, [override], fork=True)[0]) == launched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.lrr=1", "training.lrr: no such config key (did you mean training.lr?)"),
        ("+training.lrr=1", "training.lrr: no such config key (did you mean training.lr?)"),
        ("++training.lrr=1", "training.lrr: no such config key (did you mean training.lr?)"),
        ("model=tinny", "model=tinny: no such option (did you mean model=tiny?"),
        ("training.max_steps=40", "the run is at step 57; give training.max_steps > 57"),
    ],
)
def test_resume_refuses_unknown_keys_and_cutting_a_run_short(override, message, stopped_run):
    import gptexp.resume

    before = (stopped_run / "run.json").read_bytes()
    code, stderr = call_main(gptexp.resume.main, f"run={stopped_run}", override)
    assert code == 2 and stderr.count("error:") == 1 and message in stderr, stderr
    assert (stopped_run / "run.json").read_bytes() == before


def test_the_hint_of_a_finished_run_can_be_pasted(tmp_path):
    import shlex

    import gptexp.resume

    run_dir = tmp_path / "my runs" / "it's done"
    run_dir.mkdir(parents=True)
    config = config_to_dict(compose_config([*FAST, "training.max_steps=20"]))
    (run_dir / "run.json").write_text(
        json.dumps({"status": "finished", "step": 20, "config": config})
    )
    code, stderr = call_main(gptexp.resume.main, f"run={run_dir}")
    assert code == 0 and "already finished at step 20" in stderr, stderr
    command = stderr.strip().partition("extend it with ")[2]
    assert shlex.split(command) == [
        "python",
        "-m",
        "gptexp.resume",
        f"run={run_dir}",
        "training.max_steps=N",
    ]


def test_resume_of_a_killed_run_is_not_cut_short_of_its_checkpoints(stopped_run):
    """Killed before run.json had its step: the newest listed checkpoint is where it is."""
    import gptexp.resume

    status = json.loads((stopped_run / "run.json").read_text())
    del status["step"]
    status["status"] = "running"
    (stopped_run / "run.json").write_text(json.dumps(status))
    (stopped_run / "checkpoints").mkdir()
    entry = {"file": "step_0000057.pt", "step": 57, "sha256": "0" * 64, "bytes": 1}
    (stopped_run / "checkpoints" / "manifest.json").write_text(
        json.dumps({"checkpoints": [entry | {"file": "step_0000050.pt", "step": 50}, entry]})
    )
    code, stderr = call_main(gptexp.resume.main, f"run={stopped_run}", "training.max_steps=40")
    assert code == 2 and "the run is at step 57; give training.max_steps > 57" in stderr, stderr
