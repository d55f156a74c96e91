"""Typed configuration: one dataclass per config group, validated in ``__post_init__``.

Hydra composes the YAML files under ``conf/`` over these schemas (registered in the
ConfigStore by :func:`register_configs`), so a value of the wrong type fails at composition.
The schemas are the one source of keys: :func:`parse_overrides` (the one override parser of
train, sweeps, resume and fork) and :func:`to_train_config` refuse any other key, however it
was added (``+key=`` too), naming the closest one. ``OmegaConf.to_object`` then builds the
dataclasses once, at the entry point, and ``__post_init__`` rejects impossible values with a
message that names the key. Everything below the entry points sees these typed objects only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptexp.core.errors import ConfigError


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {message}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}", value)


def check_seed(key: str, value: int) -> None:
    """A seed numpy's and torch's generators both take (numpy refuses negative ones)."""
    _require(0 <= value < 2**63, key, "must be in [0, 2**63)", value)


ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class ModelConfig:
    """Shape of the GPT. The vocabulary size comes from the tokenizer, not from here."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = False
    activation: str = "gelu"  # gelu (exact, erf) | gelu_tanh (GPT-2's tanh approximation)
    # A Hugging Face GPT-2-family directory (or hub name) to start from: it decides the shape,
    # the activation and the tokenizer (gptexp.model.hf.resolve_init_from).
    init_from: str | None = None

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
        _one_of("model.activation", self.activation, ACTIVATIONS)
        if self.init_from is not None:
            _require(bool(self.init_from), "model.init_from", "must not be empty", self.init_from)


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
        if self.path:
            # Stored absolute, so eval and resume find the file from any directory; the form
            # typed at launch stays in .hydra/overrides.yaml.
            self.path = os.path.abspath(os.path.expanduser(self.path))
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
        if self.name == "pydocs" and self.path:
            raise ConfigError(
                f"data.path={self.path!r}: does not apply to data=pydocs (Python's own docs, "
                "which need no file); to train on your file use data=text data.path=..."
            )


GUARD_ACTIONS = ("off", "skip", "rollback")


@dataclass
class GuardConfig:
    """The loss-spike guard (``training.guard``).

    Always on, whatever ``action`` says: an update whose loss or gradient norm is NaN or
    infinite never reaches the optimizer. ``action`` picks what happens then, and whether
    spikes are looked for at all: a loss above ``rtol`` times the moving average of the
    accepted losses (once ``warmup`` losses are averaged), or above ``atol``.

    - ``off``: no spike detection; a non-finite loss or gradient stops the run as failed.
    - ``skip``: the update is dropped and its batches are never used; after ``max_skips``
      skipped updates in a row the run stops as failed.
    - ``rollback``: the newest valid checkpoint is loaded, the batches from there to the spike
      and ``skip_after`` more are never used, and training goes on; past ``max_rollbacks``
      rollbacks the run stops as failed.
    """

    action: str = "off"
    rtol: float = 4.0  # a spike: loss > rtol x the moving average
    atol: float | None = None  # a spike: loss > atol (None: no absolute bound)
    warmup: int = 20  # accepted losses averaged before rtol applies
    ema_decay: float = 0.98  # weight of the old average per step (~50-step memory)
    skip_after: int = 0  # rollback: batches after the spike's that are skipped too
    max_rollbacks: int = 3
    max_skips: int = 10  # skipped updates in a row before the run stops

    def __post_init__(self) -> None:
        _one_of("training.guard.action", self.action, GUARD_ACTIONS)
        _require(
            self.rtol > 1 and math.isfinite(self.rtol),
            "training.guard.rtol",
            "must be a finite number > 1 (a multiple of the average loss)",
            self.rtol,
        )
        if self.atol is not None:
            _require(self.atol > 0, "training.guard.atol", "must be > 0 (or null)", self.atol)
        _require(
            0 <= self.ema_decay < 1, "training.guard.ema_decay", "must be in [0, 1)", self.ema_decay
        )
        for key in ("warmup", "skip_after", "max_rollbacks"):
            value = getattr(self, key)
            _require(value >= 0, f"training.guard.{key}", "must be >= 0", value)
        _require(self.max_skips >= 1, "training.guard.max_skips", "must be >= 1", self.max_skips)


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
# ddp: every rank holds the whole model (DistributedDataParallel); fsdp: parameters, gradients
# and optimizer state are sharded across the ranks (FSDP2, fully_shard). One process: neither.
PARALLEL = ("ddp", "fsdp")
COMPILE_CHOICES = ("auto", "true", "false")
# torch.compile's mode when a run compiles: default passes none (torch's own default);
# reduce-overhead adds CUDA graphs; max-autotune-no-cudagraphs tries more kernels when compiling.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# The learning-rate schedules after warm-up (gptexp.training.optim.lr_factor): cosine decay to
# min_lr at max_steps; wsd: lr, then a linear decay to min_lr over the last decay_steps
# updates; constant: lr to the end (cooldown forks decay it later: gptexp.run.forking).
LR_SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class TrainingConfig:
    """Optimisation, schedule, cadence, seed and hardware of one run."""

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # after warm-up: cosine | wsd | constant (see LR_SCHEDULES)
    # wsd only (other schedules ignore it, so one sweep can try both): the last decay_steps
    # updates before max_steps decay linearly to min_lr
    decay_steps: int = 0
    weight_decay: float = 0.1
    # An exponential moving average of the weights, updated after every applied update
    # (gptexp.training.ema): ema = ema_decay * ema + (1 - ema_decay) * weights; 0 = none.
    ema_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200  # 0 disables periodic evaluation (the final step is still evaluated)
    eval_batches: int = 20
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    precision: str = "fp32"
    # torch.compile: true | false | auto (compile where the run is long enough to repay the
    # compile time; see gptexp/training/compile_policy.py). A bool from older configs still works.
    compile: str = "auto"
    # torch.compile's mode when the run compiles: default | reduce-overhead (CUDA graphs) |
    # max-autotune-no-cudagraphs (a longer compile that tries more kernels); a speed choice only.
    compile_mode: str = "default"
    num_threads: int = 0  # torch CPU threads; 0 keeps PyTorch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms
    progress: bool = True  # progress bar on a terminal; plain log lines otherwise
    sample_every: int = 0  # write a text sample to samples.txt every n steps (0: only at the end)
    sample_tokens: int = 200
    parallel: str = "ddp"  # how several processes (torchrun) share the model: ddp or fsdp
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "eval_batches", "log_every"):
            value = getattr(self, key)
            _require(value >= 1, f"training.{key}", "must be >= 1", value)
        # max_steps=0 needs model.init_from (TrainConfig checks): an imported model's baseline.
        for key in (
            "max_steps",
            "warmup_steps",
            "eval_every",
            "num_threads",
            "sample_every",
            "sample_tokens",
        ):
            value = getattr(self, key)
            _require(value >= 0, f"training.{key}", "must be >= 0", value)
        check_seed("training.seed", self.seed)
        _require(self.lr > 0 and math.isfinite(self.lr), "training.lr", "must be > 0", self.lr)
        _require(
            0 <= self.min_lr <= self.lr,
            "training.min_lr",
            f"must be in [0, lr={self.lr}]",
            self.min_lr,
        )
        _one_of("training.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _require(self.decay_steps >= 0, "training.decay_steps", "must be >= 0", self.decay_steps)
        if self.lr_schedule == "wsd":
            _require(
                self.decay_steps >= 1,
                "training.decay_steps",
                "must be >= 1 with training.lr_schedule=wsd (the updates that decay to min_lr)",
                self.decay_steps,
            )
            _require(
                self.decay_steps <= self.max_steps,
                "training.decay_steps",
                f"must be <= training.max_steps={self.max_steps} (the decay is the last "
                "decay_steps updates of the run)",
                self.decay_steps,
            )
        _require(
            0 <= self.ema_decay < 1,
            "training.ema_decay",
            "must be in [0, 1) (0: no average; 0.999 averages ~1000 updates)",
            self.ema_decay,
        )
        _require(self.weight_decay >= 0, "training.weight_decay", "must be >= 0", self.weight_decay)
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"training.{key}", "must be in [0, 1)", value)
        _require(self.grad_clip >= 0, "training.grad_clip", "must be >= 0", self.grad_clip)
        _one_of("training.device", self.device, DEVICES)
        _one_of("training.precision", self.precision, PRECISIONS)
        _one_of("training.parallel", self.parallel, PARALLEL)
        self.compile = str(self.compile).lower()  # true/false arrive as bools, then "True"
        _one_of("training.compile", self.compile, COMPILE_CHOICES)
        _one_of("training.compile_mode", self.compile_mode, COMPILE_MODES)


MONITOR_MODES = ("min", "max")
# file: one file per checkpoint, written by rank 0; dcp: a directory in which every rank writes
# its own shards (torch.distributed.checkpoint), read back at any world size.
CHECKPOINT_FORMATS = ("file", "dcp")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which ones are kept.

    A periodic checkpoint is written every ``every_steps`` steps and the newest ``keep_last``
    of them are kept; at each evaluation a checkpoint is written when ``monitor`` ranks among
    the ``keep_best`` best so far; steps divisible by ``keep_every`` are kept forever; the last
    step of training is always saved (unless ``enabled`` is false).
    """

    enabled: bool = True
    every_steps: int = 250  # 0: no periodic checkpoints
    keep_last: int = 2
    keep_best: int = 1
    keep_every: int = 0  # 0: no milestones
    monitor: str = "val/loss"
    mode: str = "min"
    on_signal: bool = True  # save and stop cleanly on SIGINT / SIGTERM / SIGUSR1
    async_save: bool = True  # serialise and write from a snapshot in a background thread
    format: str = "file"  # file (one .pt) or dcp (a directory of per-rank shards)

    def __post_init__(self) -> None:
        for key in ("every_steps", "keep_last", "keep_best", "keep_every"):
            value = getattr(self, key)
            _require(value >= 0, f"checkpoint.{key}", "must be >= 0", value)
        _one_of("checkpoint.mode", self.mode, MONITOR_MODES)
        _one_of("checkpoint.format", self.format, CHECKPOINT_FORMATS)
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
    """The metric mirrors: W&B and TensorBoard. ``metrics.jsonl`` in the run directory is
    written whatever this says."""

    wandb: bool = False
    # TensorBoard scalars of every metric record in <run>/tensorboard/ (gptexp.run.tensorboard_sink)
    tensorboard: bool = False
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
    """The whole configuration of a training run (``gptexp/conf/train.yaml``).

    These dataclasses are the one source of defaults: the YAML files under ``gptexp/conf``
    hold only what an option changes, so a config built in code equals the one the command
    line composes with no overrides.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment: str | None = None  # name of the experiment preset, set by conf/experiment/*

    def __post_init__(self) -> None:
        _require(
            self.training.max_steps >= 1 or self.model.init_from is not None,
            "training.max_steps",
            "must be >= 1 (0, which evaluates and checkpoints the starting model as step 0, "
            "needs model.init_from)",
            self.training.max_steps,
        )
        if self.training.guard.action == "rollback":
            _require(
                self.checkpoint.enabled,
                "training.guard.action",
                "needs checkpoints to roll back to (checkpoint.enabled is false); "
                "use training.guard.action=skip",
                self.training.guard.action,
            )


# The config's top-level keys: for a command that takes overrides of a stored config,
# ``model=small`` names the config, not one of the command's own keys (gptexp.core.cli.OVERRIDES).
CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))

# The Hydra config tree ships inside the package, so an installed gptexp finds it anywhere.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # gptexp/conf


def compose_config(overrides: list[str] | None = None) -> TrainConfig:
    """The typed config that ``python -m gptexp.train <overrides>`` composes, built in this
    process with Hydra's compose API (nothing is written)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    parse_overrides(overrides or [])
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=overrides or [])
    return to_train_config(cfg)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (called by the entry points, not at import)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)


# ----------------------------------------------------------------------------- keys

# The schema above is the one source of config keys. Hydra's ``+key=`` / ``++key=`` add keys
# that are in no schema (and OmegaConf carries them into the dataclasses as stray attributes),
# so every key is checked here, against the dataclasses, however it was added.


def _schema_fields(schema: type) -> dict[str, Any]:
    """The fields of a config dataclass with their types (nested configs as classes)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _unknown(key: str, candidates: list[str], prefix: str) -> ConfigError:
    """An unknown key, with the closest known one."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(candidates)}"
    return ConfigError(f"{prefix}{key}: no such config key ({hint})")


def check_key(path: str) -> None:
    """ConfigError unless ``path`` (``training.guard.action``) names a key of the schema."""
    schema: Any = TrainConfig
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(schema):
            return  # inside a value (a list, a free-form string): not a config key any more
        fields = _schema_fields(schema)
        if part not in fields:
            raise _unknown(part, sorted(fields), "".join(f"{p}." for p in parts[:depth]))
        schema = fields[part]


def check_keys(cfg: Any, schema: type = TrainConfig, prefix: str = "") -> None:
    """ConfigError naming the first key of ``cfg`` (a mapping) that the schema lacks."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)  # keys only: nothing is resolved
    if not isinstance(cfg, dict):
        return
    fields = _schema_fields(schema)
    for key in cfg:
        if key not in fields:
            raise _unknown(str(key), sorted(fields), prefix)
        if dataclasses.is_dataclass(fields[key]):
            check_keys(cfg[key], fields[key], f"{prefix}{key}.")


def config_groups(search_path: tuple[Path, ...] = ()) -> dict[str, list[str]]:
    """The config groups and their options: gptexp's (``conf/<group>/``) and those of the
    directories a command line adds to Hydra's search path (``--config-dir``,
    ``hydra.searchpath``)."""
    groups: dict[str, set[str]] = {}
    for root in (CONF_DIR, *search_path):
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            if path.is_dir() and path.name != "hydra":
                options = groups.setdefault(path.name, set())
                options.update(o.stem for o in path.iterdir() if o.suffix in (".yaml", ".yml"))
    return {name: sorted(options) for name, options in groups.items()}


def parse_overrides(
    overrides: list[str], config_dirs: tuple[str, ...] = (), *, options_known: bool = True
) -> list:
    """``overrides`` parsed with Hydra's override grammar (the one parser of every command),
    with each config key and each group option checked against the schema and the config
    groups (``config_dirs``: directories the command line adds; ``options_known=False``: the
    command line replaced the primary config, so Hydra alone knows the options).

    Hydra refuses a typo with its own traceback-like message and exit 1 (failed), and accepts
    ``+training.lrr=1`` (its own suggestion) silently; this names the key, suggests the
    closest one and is bad input (exit 2). Hydra's own keys (``hydra.*``, ``hydra/...``) and
    package overrides (``key@pkg``) are Hydra's to check.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, parsed = OverridesParser.create(), []
    for item in overrides:
        try:
            parsed.append(parser.parse_override(item))
        except HydraException as error:  # the grammar's errors
            reason = str(error).splitlines()[0]
            raise ConfigError(f"{item!r}: not an override key=value ({reason})") from None
    search = [Path(d) for d in config_dirs]
    for override in parsed:
        if override.key_or_group == "hydra.searchpath" and isinstance(override.value(), list):
            for entry in map(str, override.value()):
                scheme, sep, where = entry.partition("://")
                if sep and scheme != "file":  # pkg:// or a plugin's: Hydra alone lists those
                    options_known = False
                search.append(Path(where if sep else entry))
    groups = config_groups(tuple(search))
    typed: DictConfig | None = None
    for override in parsed:
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or override.package is not None:
            continue
        if key in groups and not override.is_delete():
            if options_known:
                _check_options(override, key, groups[key])
        else:
            check_key(key)
            if not override.is_delete():
                typed = _check_type(override, typed)
    return parsed


def _check_type(override: Any, typed: DictConfig | None) -> DictConfig | None:
    """ConfigError when a value cannot have its key's type (``training.lr=abc``): Hydra would
    refuse it while composing, as a failure (exit 1) with its own message. ``typed`` is the
    schema as an OmegaConf node, made on first use and handed back for the next override."""
    from omegaconf.errors import ValidationError

    if override.is_sweep_override():
        try:
            values = list(override.sweep_iterator())
        except Exception:  # range(), interval(), glob(): Hydra and the sweeper expand them
            return typed
    else:
        values = [override.value()]
    for value in values:
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: its type is known once the config is resolved
        typed = typed if typed is not None else OmegaConf.structured(TrainConfig)
        try:
            OmegaConf.update(typed, override.key_or_group, value, merge=True)
        except ValidationError as error:
            reason = str(error).splitlines()[0]
            raise ConfigError(f"{override.key_or_group}={value}: {reason}") from None
    return typed


def _check_options(override: Any, group: str, options: list[str]) -> None:
    if override.is_sweep_override():
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # range() or glob() sweeps: Hydra checks them itself
            return
    else:
        values = [override.value()]
    # ``group=[a,b]`` merges several options of one group (``logger=[wandb,tensorboard]``).
    values = [item for value in values for item in (value if isinstance(value, list) else [value])]
    for value in values:
        if value is None or (isinstance(value, str) and value in options):
            continue
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        raise ConfigError(f"{group}={value}: no such option ({hint}options: {', '.join(options)})")


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """Turn a composed config (or a plain dict, e.g. from a checkpoint) into typed config.

    Raises ConfigError with the offending key for unknown keys, wrong types and impossible
    values.
    """
    check_keys(cfg)
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
