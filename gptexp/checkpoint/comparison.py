"""Where two runs' checkpoints part: the last bit-identical common checkpoint, the first that
differs, and the tensors and optimizer hyperparameters that differ most."""

from __future__ import annotations

import logging
import math
from typing import Any

from gptexp.checkpoint.manager import run_checkpoints
from gptexp.core.errors import CheckpointError
from gptexp.core.fsio import sha256_file
from gptexp.observe.rundir import RunDirectory

log = logging.getLogger(__name__)


TOP_TENSORS = 5  # differing tensors listed per comparison


def holds_checkpoint(run: RunDirectory, step: int, sha256: str) -> bool:
    """Whether ``run``'s manifest lists a checkpoint of ``step`` with ``sha256`` whose file
    hashes to it too (where a moved parent is found: gptexp.observe.lineage)."""
    try:
        entries = run_checkpoints(run).entries()
    except CheckpointError:
        return False
    return any(
        entry.step == step
        and entry.sha256 == sha256
        and (run.checkpoints / entry.file).is_file()
        and sha256_file(run.checkpoints / entry.file) == sha256
        for entry in entries
    )


def listed_checkpoints(run: RunDirectory, label: str, notes: list[str]) -> dict[int, Any]:
    """The manifest's entries by step; a damaged manifest counts as none, with a note."""
    try:
        return {entry.step: entry for entry in run_checkpoints(run).entries()}
    except CheckpointError as error:
        notes.append(f"{label}: {error}")
        return {}


def optimizer_param_names(state: dict[str, Any]) -> list[str]:
    """The parameter name of each optimizer state index, in the order the trainer gave the
    parameters to AdamW; [] when the checkpoint's model config no longer builds."""
    import torch

    from gptexp.core.config import ModelConfig
    from gptexp.core.errors import ConfigError
    from gptexp.model.gpt import GPT

    config = state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return []
    try:
        model_cfg = ModelConfig(**config["model"])
    except (ConfigError, TypeError):
        return []
    with torch.device("meta"):  # shapes and names only, no memory
        model = GPT(model_cfg, int(state.get("vocab_size") or 1))
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(p)] for group in model.optimizer_groups(0.0) for p in group["params"]]


def state_values(state: dict[str, Any]) -> dict[str, Any]:
    """The model and optimizer state of a checkpoint as flat ``name -> tensor``:
    ``model.<param>``, ``optimizer.<param>.<exp_avg|exp_avg_sq|step>``. The optimizer's
    hyperparameters are config, not state: see :func:`optimizer_hyperparameters`."""
    values = {f"model.{name}": tensor for name, tensor in state["model"].items()}
    optimizer = state.get("optimizer") or {}
    names = optimizer_param_names(state)
    for index, slots in (optimizer.get("state") or {}).items():
        param = names[index] if isinstance(index, int) and index < len(names) else str(index)
        for slot, value in slots.items():
            values[f"optimizer.{param}.{slot}"] = value
    return values


def optimizer_hyperparameters(state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.param_groups.<i>.<lr|initial_lr|betas|...>``: what the config and the LR
    schedule set, compared as config (a fork with another lr writes its start checkpoint
    with its own lr beside bit-identical tensors)."""
    optimizer = state.get("optimizer") or {}
    return {
        f"optimizer.param_groups.{i}.{key}": value
        for i, group in enumerate(optimizer.get("param_groups") or [])
        for key, value in group.items()
        if key != "params"
    }


def value_difference(x: Any, y: Any) -> tuple[bool, float | None, str | None]:
    """(equal bit for bit, max abs difference, why there is no number for it)."""
    import torch

    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, None, f"{x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if torch.equal(x, y):
            return True, 0.0, None
        if x.is_floating_point() and (x.isnan().any() or y.isnan().any()):
            # torch.equal treats NaN as unequal to itself: compare the bits instead.
            same_bits = torch.equal(
                x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
            )
            return (True, 0.0, None) if same_bits else (False, None, "NaN")
        diff = (x.double() - y.double()).abs().max().item()
        # JSON has no inf or NaN: such a difference is named instead of measured.
        return (False, diff, None) if math.isfinite(diff) else (False, None, "non-finite")
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return False, None, f"{type(x).__name__} vs {type(y).__name__}"
    if x == y:
        return True, 0.0, None
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return False, abs(float(x) - float(y)), None
    return False, None, f"{x!r} vs {y!r}"


def tensor_differences(values_a: dict[str, Any], values_b: dict[str, Any]) -> list[dict]:
    """Every entry that differs, largest max abs difference first (no number: first)."""
    rows = []
    for name in sorted(values_a.keys() | values_b.keys()):
        if name not in values_b or name not in values_a:
            rows.append(
                {
                    "name": name,
                    "max_abs_diff": None,
                    "why": f"only in {'A' if name in values_a else 'B'}",
                }
            )
            continue
        equal, diff, why = value_difference(values_a[name], values_b[name])
        if not equal:
            rows.append({"name": name, "max_abs_diff": diff} | ({"why": why} if why else {}))
    rows.sort(key=lambda row: -math.inf if row["max_abs_diff"] is None else -row["max_abs_diff"])
    return rows


def hyperparameter_value(state: dict[str, Any], row: dict[str, Any]) -> Any:
    """A hyperparameter's value in ``state`` as JSON can hold it (betas are a tuple)."""
    value = optimizer_hyperparameters(state).get(row["name"])
    return list(value) if isinstance(value, tuple) else value


def compare_checkpoints(a: RunDirectory, b: RunDirectory) -> dict[str, Any]:
    """Over the steps where both runs have a valid checkpoint (listed in the manifest, sha256
    verified, loaded with ``weights_only=True``): which are bit-identical in model and
    optimizer state (tensors), the last identical one, the first that differs and what
    differs most; apart from that, the first step whose optimizer hyperparameters differ."""
    notes: list[str] = []
    listed_a = listed_checkpoints(a, "A", notes)
    listed_b = listed_checkpoints(b, "B", notes)
    manager_a, manager_b = run_checkpoints(a), run_checkpoints(b)
    equal_steps, different_steps, top = [], [], []
    hyperparameters: dict[str, Any] | None = None
    common = sorted(listed_a.keys() & listed_b.keys())
    for step in common:
        try:
            state_a = manager_a.load(listed_a[step])
            state_b = manager_b.load(listed_b[step])
        except CheckpointError as error:
            notes.append(f"step {step} skipped: {error}")
            continue
        differences = tensor_differences(state_values(state_a), state_values(state_b))
        if hyperparameters is None:
            settings = tensor_differences(
                optimizer_hyperparameters(state_a), optimizer_hyperparameters(state_b)
            )
            if settings:
                hyperparameters = {
                    "step": step,
                    "differ": [
                        {
                            "name": row["name"],
                            "a": hyperparameter_value(state_a, row),
                            "b": hyperparameter_value(state_b, row),
                        }
                        for row in settings
                    ],
                }
        if differences:
            if not different_steps:
                top = differences[:TOP_TENSORS]
            different_steps.append(step)
        else:
            equal_steps.append(step)
    return {
        "a_steps": sorted(listed_a),
        "b_steps": sorted(listed_b),
        "equal_steps": equal_steps,
        "different_steps": different_steps,
        "last_equal_step": max(equal_steps) if equal_steps else None,
        "first_different_step": min(different_steps) if different_steps else None,
        "differing_tensors": top,
        "hyperparameters": hyperparameters,
        "notes": notes,
    }
