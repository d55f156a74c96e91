"""``python -m gptexp.resume run=<run dir> [key=value ...]``: continue a run where it stopped.

The run continues in its own directory, with its own stored config (not today's ``conf/``),
from its newest valid checkpoint. Hydra is not relaunched, so ``.hydra/`` stays exactly as the
run's launch wrote it. ``key=value`` overrides may change how training goes on
(``training.max_steps=6000`` extends a finished run); changes that cannot apply to the
checkpoint (the model's shape, the data, the tokenizer) are refused with a diff.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptexp.cli import report_errors
from gptexp.config import ConfigError, TrainConfig, config_to_dict, to_train_config
from gptexp.loggers import flatten
from gptexp.run import RunDirectory, RunError, require_run, run_logging
from gptexp.trainer import Distributed, run_training

# Groups whose values are baked into the checkpoint: weights' shapes, vocabulary, data.
FROZEN_GROUPS = ("model", "data")


def stored_config(run: RunDirectory) -> dict[str, Any]:
    """The run's effective config: the one its last start recorded in run.json, else the
    composed config of its launch (``.hydra/config.yaml``)."""
    status = run.read_status()
    if isinstance(status.get("config"), dict):
        return status["config"]
    if not run.config_yaml.is_file():
        raise RunError(
            f"{run.path}: no stored config (run.json has none, .hydra/config.yaml is missing)"
        )
    try:
        return OmegaConf.to_container(OmegaConf.load(run.config_yaml), resolve=True)  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise RunError(f"{run.config_yaml}: damaged ({str(error).splitlines()[0]})") from None


def parse_overrides(overrides: list[str]) -> list[str]:
    """Only ``key.path=value`` applies to a stored run; a group choice would recompose."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key.startswith(("+", "~")) or "." not in key:
            raise ConfigError(
                f"{item!r}: a resumed run takes key=value overrides of its stored config "
                "(e.g. training.max_steps=6000); group choices such as model=small would "
                "start a different run"
            )
    return overrides


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    before, after = flatten(old), flatten(new)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }


def resume_config(run: RunDirectory, overrides: list[str]) -> tuple[TrainConfig, dict]:
    """The typed config to resume with, and the changes the overrides make."""
    old = to_train_config(stored_config(run))
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(old), OmegaConf.from_dotlist(parse_overrides(overrides))
        )
    except OmegaConfBaseException as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    new = to_train_config(merged)
    changes = config_diff(config_to_dict(old), config_to_dict(new))
    frozen = {k: v for k, v in changes.items() if k.split(".")[0] in FROZEN_GROUPS}
    if frozen:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in frozen.items())
        raise ConfigError(
            f"these changes cannot apply to the run's checkpoints (start a new run instead):\n"
            f"{lines}"
        )
    return new, changes


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    runs = [a for a in argv if a.startswith("run=")]
    if len(runs) != 1 or argv[0] in ("-h", "--help"):
        raise RunError("usage: python -m gptexp.resume run=<run dir> [key=value ...]")
    return runs[0].removeprefix("run="), [a for a in argv if not a.startswith("run=")]


def resume(argv: list[str]) -> float | None:
    path, overrides = parse_args(argv)
    run = require_run(path)
    cfg, changes = resume_config(run, overrides)
    note = {"overrides": overrides, "changes": {k: list(v) for k, v in changes.items()}}
    # The same W&B run again: its id comes from the checkpoint, its group and name from run.json
    # (or, for a run killed before it recorded them, from what its launch changed).
    status = run.read_status()
    wandb_group = status.get("wandb_group")
    wandb_name = status.get("wandb_name", ",".join(run.overrides()) or None)
    with run_logging(run if Distributed.from_env().is_main else None):
        return report_errors(
            lambda: run_training(
                cfg,
                run,
                resume=True,
                resume_note=note,
                wandb_group=wandb_group,
                wandb_name=wandb_name,
            )
        )


def main() -> None:
    report_errors(lambda: resume(sys.argv[1:]))


if __name__ == "__main__":
    main()
