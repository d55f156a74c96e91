"""A stored run's checkpoint, read for eval, export, fork, diff and repair: which one (``ckpt=``),
loaded and verified, and the model, config and corpus rebuilt from the checkpoint alone (never
from today's ``conf/``)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from gptexp.checkpoint.format import CheckpointEntry, average_layout, check_average
from gptexp.checkpoint.manager import run_checkpoints
from gptexp.core.config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
    config_to_dict,
)
from gptexp.core.errors import CheckpointError, ConfigError
from gptexp.data.corpus import Corpus, prepare_corpus
from gptexp.data.tokenizers import Tokenizer, tokenizer_from_json
from gptexp.model.gpt import GPT
from gptexp.observe.metrics import VAL_LOSS, VAL_LOSS_EMA, flatten, read_metrics
from gptexp.observe.rundir import RunDirectory

log = logging.getLogger(__name__)


def check_ckpt(ckpt: str) -> None:
    if ckpt not in ("last", "best") and not ckpt.isdigit():
        raise ConfigError(f"ckpt={ckpt!r}: must be last, best or a step number")


# weights=: a checkpoint's trained weights, or their moving average (training.ema_decay).
WEIGHTS = ("raw", "ema")


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ConfigError(
            f"weights={weights!r}: must be raw (the trained weights) or ema (their moving "
            "average, kept by runs with training.ema_decay > 0)"
        )


def checkpoint_label(ckpt: str) -> str:
    """Names the files written under eval/ and export/: last, best or step_0000500."""
    return ckpt if ckpt in ("last", "best") else f"step_{int(ckpt):07d}"


@dataclass
class LoadedCheckpoint:
    entry: CheckpointEntry
    state: dict[str, Any]
    label: str
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints passed over


def load_run_checkpoint(run: RunDirectory, ckpt: str, weights: str = "raw") -> LoadedCheckpoint:
    """The checkpoint ``ckpt`` of ``run``, verified against the manifest and loaded with
    ``weights_only=True``; with ``weights=ema`` one that holds a weight average, labelled
    ``<label>_ema`` (the names of eval's and export's files).

    ``last`` means the newest valid checkpoint: a damaged newest one is named and passed over.
    ``best`` and a step are explicit requests: a damaged one is an error, never swapped for
    another checkpoint behind the user's back.
    """
    check_weights(weights)
    loaded = _load_run_checkpoint(run, ckpt)
    if weights == "ema":
        if loaded.state.get("ema") is None:
            raise CheckpointError(
                f"weights=ema: {run.path.name}'s {loaded.entry.file} holds no weight average "
                "(its run trained with training.ema_decay=0); use weights=raw, or fork it "
                "with training.ema_decay=0.999 to start one"
            )
        loaded.label += "_ema"
    return loaded


def listed_checkpoint(run: RunDirectory, ckpt: str) -> CheckpointEntry:
    """The manifest entry of ``ckpt`` (not loaded, not verified): a sweep of forks checks each
    of its checkpoints is there before its first fork trains."""
    check_ckpt(ckpt)
    try:
        return run_checkpoints(run).find(ckpt)
    except CheckpointError as error:
        raise CheckpointError(f"ckpt={ckpt}: {error}") from None


def _load_run_checkpoint(run: RunDirectory, ckpt: str) -> LoadedCheckpoint:
    check_ckpt(ckpt)
    manager = run_checkpoints(run)
    entries = manager.entries()
    if not entries:
        why = "" if manager.policy.enabled else "; it ran with checkpoint.enabled=false"
        raise CheckpointError(f"{run.path}: no checkpoint (run status: {run.status()}{why})")
    label = checkpoint_label(ckpt)
    if ckpt == "last":
        skipped: list[str] = []
        found = manager.load_latest_valid(warn=skipped.append)
        for message in skipped:
            log.warning("ckpt=last: %s", message)
        if found is None:
            raise CheckpointError(
                f"{run.checkpoints}: no valid checkpoint (every listed one is damaged: "
                f"{'; '.join(skipped)})"
            )
        return LoadedCheckpoint(found[0], found[1], label, skipped)
    manager.find(ckpt)  # a step that is not listed: the error says which are
    try:
        return LoadedCheckpoint(*manager.load_requested(ckpt), label)
    except CheckpointError as error:  # damaged, or taken by a live run's retention meanwhile
        steps = ", ".join(str(e.step) for e in manager.entries())
        raise CheckpointError(
            f"ckpt={ckpt}: {error}. An explicitly requested checkpoint is never replaced by "
            f"another one; choose ckpt=last (the newest valid one) or another step ({steps})"
        ) from None


@dataclass
class RebuiltRun:
    """What a checkpoint needs to be evaluated: model, tokenizer and the run's settings."""

    model: GPT
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    data_cfg: DataConfig
    training: TrainingConfig
    ignored_keys: list[str]  # keys of the stored config that this gptexp no longer knows


def _known_fields(schema: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(schema)}
    return schema(**{key: value for key, value in values.items() if key in names})


def rebuild_model(state: dict[str, Any], weights: str = "raw") -> RebuiltRun:
    """The model, tokenizer and settings of a checkpoint, from the checkpoint alone; with
    ``weights=ema`` the model holds the checkpoint's weight average (checked like the weights).

    Only ``config.model`` has to match today's schema exactly (it shapes the weights); keys
    of other groups that no longer exist are ignored and reported, since they cannot change
    the weights and the data is checked by its fingerprint.
    """
    config, tokenizer_json = state.get("config"), state.get("tokenizer")
    if not isinstance(config, dict) or not isinstance(tokenizer_json, str):
        raise CheckpointError("not a gptexp checkpoint: no config or tokenizer inside")
    model_values = config.get("model", {})
    unknown = sorted(set(model_values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise CheckpointError(
            f"the checkpoint's model has keys this gptexp does not know "
            f"({', '.join('model.' + k for k in unknown)}): it needs the gptexp that wrote it"
        )
    model_cfg = ModelConfig(**model_values)
    known_keys = flatten(config_to_dict(TrainConfig()))
    ignored = sorted(key for key in flatten(config) if key not in known_keys)
    data_cfg = _known_fields(DataConfig, config.get("data", {}))
    training = _known_fields(TrainingConfig, config.get("training", {}))

    tokenizer = tokenizer_from_json(tokenizer_json)
    if state.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise CheckpointError(
            f"the checkpoint's vocab_size={state['vocab_size']} does not match its tokenizer "
            f"({tokenizer.vocab_size})"
        )
    model = GPT(model_cfg, tokenizer.vocab_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"the weights do not fit the stored model config ({str(error).splitlines()[0]})"
        ) from None
    if weights == "ema":
        average = check_average(state.get("ema"), average_layout(model))
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(average[name])
    model.eval()
    return RebuiltRun(model, tokenizer, model_cfg, data_cfg, training, ignored)


def reload_corpus(rebuilt: RebuiltRun, fingerprint: str | None) -> Corpus:
    """The run's text, checked against the fingerprint the run recorded, tokenized with the
    run's own tokenizer."""
    return prepare_corpus(
        rebuilt.data_cfg, rebuilt.model_cfg.block_size, rebuilt.tokenizer, fingerprint or ""
    )


def logged_val_loss(run: RunDirectory, step: int, weights: str = "raw") -> float | None:
    """The val/loss the trainer logged at ``step`` (val/loss_ema for ``weights=ema``)."""
    metric = VAL_LOSS_EMA if weights == "ema" else VAL_LOSS
    for record in read_metrics(run.metrics):
        if record["step"] == step and record.get(metric) is not None:
            return float(record[metric])
    return None
