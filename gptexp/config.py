"""Typed configuration: one dataclass per config group, validated in ``__post_init__``.

Hydra composes the YAML files under ``conf/`` over these schemas (registered in the
ConfigStore by :func:`register_configs`), so an unknown key or a value of the wrong type fails
at composition. ``OmegaConf.to_object`` then builds the dataclasses once, at the entry point,
and ``__post_init__`` rejects impossible values with a message that names the key. Everything
below the entry points sees these typed objects only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {message}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}", value)


@dataclass
class ModelConfig:
    """Shape of the GPT. The vocabulary size comes from the tokenizer, not from here."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            _require(getattr(self, key) >= 1, f"model.{key}", "must be >= 1", getattr(self, key))
        _require(
            self.n_embd % self.n_head == 0,
            "model.n_embd",
            f"must be divisible by model.n_head={self.n_head}",
            self.n_embd,
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)


DATA_SOURCES = ("pydocs", "shakespeare", "text")
TOKENIZERS = ("char", "bpe")


@dataclass
class DataConfig:
    """Which text to train on and how to tokenize it.

    ``name`` picks the source: ``pydocs`` (the documentation that ships with Python itself;
    needs no download), ``shakespeare`` (tiny-shakespeare, downloaded once and checked by
    sha256; ``path`` may point at a local copy), or ``text`` (any UTF-8 file at ``path``).
    """

    name: str = "pydocs"
    path: str | None = None
    tokenizer: str = "char"
    vocab_size: int = 512  # BPE only: size of the trained byte-level vocabulary
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _one_of("data.name", self.name, DATA_SOURCES)
        _one_of("data.tokenizer", self.tokenizer, TOKENIZERS)
        _require(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            "must be in (0, 1)",
            self.val_fraction,
        )
        _require(
            self.vocab_size >= 257, "data.vocab_size", "must be >= 257 (bytes)", self.vocab_size
        )
        if self.name == "text":
            _require(bool(self.path), "data.path", "is required when data.name=text", self.path)


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainingConfig:
    """Optimisation, schedule, cadence, seed and hardware of one run."""

    max_steps: int = 2000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 250  # 0 disables periodic evaluation (the final step is still evaluated)
    eval_batches: int = 20
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    precision: str = "fp32"
    # torch.compile: true | false | auto (compile where the run is long enough to repay the
    # compile time; see gptexp/compile_policy.py). A bool from older configs still works.
    compile: str = "auto"
    num_threads: int = 0  # torch CPU threads; 0 keeps PyTorch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms
    progress: bool = True  # progress bar on a terminal; plain log lines otherwise
    sample_every: int = 0  # write a text sample to samples.txt every n steps (0: only at the end)
    sample_tokens: int = 200

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            value = getattr(self, key)
            _require(value >= 1, f"training.{key}", "must be >= 1", value)
        for key in ("warmup_steps", "eval_every", "num_threads", "sample_every", "sample_tokens"):
            value = getattr(self, key)
            _require(value >= 0, f"training.{key}", "must be >= 0", value)
        _require(self.lr > 0 and math.isfinite(self.lr), "training.lr", "must be > 0", self.lr)
        _require(
            0 <= self.min_lr <= self.lr,
            "training.min_lr",
            f"must be in [0, lr={self.lr}]",
            self.min_lr,
        )
        _require(self.weight_decay >= 0, "training.weight_decay", "must be >= 0", self.weight_decay)
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"training.{key}", "must be in [0, 1)", value)
        _require(self.grad_clip >= 0, "training.grad_clip", "must be >= 0", self.grad_clip)
        _one_of("training.device", self.device, DEVICES)
        _one_of("training.precision", self.precision, PRECISIONS)
        self.compile = str(self.compile).lower()  # true/false arrive as bools, then "True"
        _one_of("training.compile", self.compile, COMPILE_CHOICES)


COMPILE_CHOICES = ("auto", "true", "false")


MONITOR_MODES = ("min", "max")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which ones are kept.

    A periodic checkpoint is written every ``every_steps`` steps and the newest ``keep_last``
    of them are kept; at each evaluation a checkpoint is written when ``monitor`` ranks among
    the ``keep_best`` best so far; steps divisible by ``keep_every`` are kept forever; the last
    step of training is always saved (unless ``enabled`` is false).
    """

    enabled: bool = True
    every_steps: int = 500  # 0: no periodic checkpoints
    keep_last: int = 2
    keep_best: int = 1
    keep_every: int = 0  # 0: no milestones
    monitor: str = "val/loss"
    mode: str = "min"
    on_signal: bool = True  # save and stop cleanly on SIGINT / SIGTERM / SIGUSR1
    async_save: bool = True  # serialise and write from a snapshot in a background thread

    def __post_init__(self) -> None:
        for key in ("every_steps", "keep_last", "keep_best", "keep_every"):
            value = getattr(self, key)
            _require(value >= 0, f"checkpoint.{key}", "must be >= 0", value)
        _one_of("checkpoint.mode", self.mode, MONITOR_MODES)
        _require(
            self.monitor in ("val/loss", "train/loss"),
            "checkpoint.monitor",
            "must be val/loss or train/loss",
            self.monitor,
        )
        if self.enabled and self.every_steps > 0:
            _require(
                self.keep_last >= 1,
                "checkpoint.keep_last",
                "must be >= 1 when checkpoint.every_steps > 0",
                self.keep_last,
            )


WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class LoggerConfig:
    """The W&B mirror. ``metrics.jsonl`` in the run directory is written whatever this says."""

    wandb: bool = False
    project: str = "gptexp"
    entity: str | None = None
    group: str | None = None  # defaults to the sweep directory's name in a multirun
    name: str | None = None  # defaults to a name made from the overrides
    tags: list[str] = field(default_factory=list)
    # auto: online when W&B credentials are configured, offline otherwise
    mode: str = "auto"

    def __post_init__(self) -> None:
        _one_of("logger.mode", self.mode, WANDB_MODES)
        _require(bool(self.project), "logger.project", "must not be empty", self.project)


@dataclass
class TrainConfig:
    """The whole configuration of a training run (``conf/train.yaml``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment: str | None = None  # name of the experiment preset, set by conf/experiment/*


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (called by the entry points, not at import)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """Turn a composed config (or a plain dict, e.g. from a checkpoint) into typed config.

    Raises ConfigError with the offending key for unknown keys, wrong types and impossible
    values.
    """
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        # OmegaConf appends full_key/reference_type lines; the first line says what is wrong.
        message = str(error).splitlines()[0]
        key = getattr(error, "full_key", None) or "config"
        raise ConfigError(f"{key}: {message}") from None


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The typed config as a plain dict (what checkpoints and run.json store)."""
    return dataclasses.asdict(cfg)
