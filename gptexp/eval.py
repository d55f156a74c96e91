"""``python -m gptexp.eval run=<run or sweep dir> [key=value ...]``: evaluate a run from its
directory alone.

The model is rebuilt from the checkpoint's own config and tokenizer (never from today's
``conf/``), loaded with ``weights_only=True`` and scored by :func:`gptexp.trainer.evaluate_loss`
on the run's own evaluation batches, so a checkpoint's eval loss equals the ``val/loss`` the
trainer logged at its step. Results go to ``<run>/eval/<ckpt>.json``, samples to
``<run>/eval/samples_<ckpt>.txt``; nothing else in the run is written. A directory whose
subdirectories are runs (a sweep) is evaluated run by run into one table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from gptexp.checkpoint import (
    CheckpointEntry,
    CheckpointError,
    CheckpointManager,
    atomic_write_bytes,
    atomic_write_json,
)
from gptexp.cli import report_errors
from gptexp.config import (
    DEVICES,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
    config_to_dict,
)
from gptexp.data import (
    Corpus,
    DataError,
    Tokenizer,
    load_text,
    prepare_corpus,
    sha256_text,
    tokenizer_from_json,
)
from gptexp.loggers import flatten, read_metrics
from gptexp.model import GPT
from gptexp.resume import stored_config
from gptexp.run import RunDirectory, RunError, now, require_run, run_logging
from gptexp.trainer import USER_ERRORS, evaluate_loss, resolve_device

log = logging.getLogger(__name__)

USAGE = (
    "usage: python -m gptexp.eval run=<run or sweep dir> [ckpt=last|best|<step>] "
    "[split=val|train] [batches=N] [batch_size=N] [seed=N] [samples=N] [max_new_tokens=N] "
    "[temperature=T] [top_k=K] [prompt=TEXT] [device=cpu|cuda|mps|auto] [data.path=FILE]"
)

# ----------------------------------------------------------------------------- options


@dataclass
class EvalOptions:
    """What to evaluate and how. ``None`` means "as the run itself did" (its training config)."""

    run: str
    ckpt: str = "last"  # last | best | <step>
    split: str = "val"
    batches: int | None = None  # default: the run's training.eval_batches
    batch_size: int | None = None  # default: the run's training.batch_size
    seed: int | None = None  # evaluation batches and sampling; default: the run's training.seed
    samples: int | None = None  # default: 1 for a run, 0 for each run of a sweep
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 50  # None or 0: no top-k filtering
    prompt: str = ""  # empty: start from token 0, as the trainer's samples do
    device: str | None = None  # default: the run's training.device
    data_path: str | None = None  # the run's text moved: where it is now (checked by sha256)

    def __post_init__(self) -> None:
        check_ckpt(self.ckpt)
        if self.split not in ("val", "train"):
            raise ConfigError(f"split={self.split!r}: must be val or train")
        for key in ("batches", "batch_size", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if self.samples is not None and self.samples < 0:
            raise ConfigError(f"samples={self.samples}: must be >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if self.device is not None and self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}: must be one of {', '.join(DEVICES)}")


def check_ckpt(ckpt: str) -> None:
    if ckpt not in ("last", "best") and not (ckpt.isdigit()):
        raise ConfigError(f"ckpt={ckpt!r}: must be last, best or a step number")


Options = TypeVar("Options")

# Command-line spellings that are not Python identifiers.
KEY_ALIASES = {"data.path": "data_path"}


def parse_key_values(argv: list[str], schema: type[Options], usage: str) -> Options:
    """``key=value`` arguments as ``schema`` (a dataclass); unknown keys and bad values are
    a ConfigError that names the key. ``none`` is None for optional keys."""
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        sys.exit(0)
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]  # type: ignore[arg-type]
    cli_names = {name: alias for alias, name in KEY_ALIASES.items()}
    values: dict[str, Any] = {}
    for item in argv:
        key, sep, raw = item.partition("=")
        name = KEY_ALIASES.get(key, key)
        if not sep or name not in names:
            known = ", ".join(cli_names.get(n, n) for n in names)
            raise ConfigError(f"unknown key {key!r} (known keys: {known})")
        values[name] = _convert(key, raw, hints[name])
    if "run" not in values:
        raise ConfigError(f"run=<dir> is required\n{usage}")
    return schema(**values)


def _convert(key: str, raw: str, hint: Any) -> Any:
    choices = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in choices and raw.lower() in ("none", "null"):
        return None
    kind = next(c for c in choices if c is not type(None))
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: must be {kind.__name__}") from None


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class LoadedCheckpoint:
    entry: CheckpointEntry
    state: dict[str, Any]
    label: str  # last | best | step_0000500: names the files written under eval/ and export/
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints passed over


def checkpoint_label(ckpt: str) -> str:
    return ckpt if ckpt in ("last", "best") else f"step_{int(ckpt):07d}"


def load_run_checkpoint(run: RunDirectory, ckpt: str) -> LoadedCheckpoint:
    """The checkpoint ``ckpt`` of ``run``, verified against the manifest and loaded with
    ``weights_only=True``.

    ``last`` means the newest valid checkpoint: a damaged newest one is named and passed over.
    ``best`` and a step are explicit requests: a damaged one is an error, never swapped for
    another checkpoint behind the user's back.
    """
    check_ckpt(ckpt)
    config = stored_config(run)
    mode = config.get("checkpoint", {}).get("mode", "min")
    manager = CheckpointManager(run.checkpoints, CheckpointConfig(mode=mode))
    entries = manager.entries()
    if not entries:
        status = run.read_status().get("status", "unknown")
        enabled = config.get("checkpoint", {}).get("enabled", True)
        why = "" if enabled else "; it ran with checkpoint.enabled=false"
        raise CheckpointError(f"{run.path}: no checkpoint (run status: {status}{why})")
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
    entry = manager.find(ckpt)
    try:
        return LoadedCheckpoint(entry, manager.load(entry), label)
    except CheckpointError as error:
        steps = ", ".join(str(e.step) for e in entries)
        raise CheckpointError(
            f"ckpt={ckpt}: {error}. An explicitly requested checkpoint is never replaced by "
            f"another one; choose ckpt=last (the newest valid one) or another step ({steps})"
        ) from None


# ----------------------------------------------------------------------------- the model


@dataclass
class RebuiltRun:
    """What a checkpoint needs to be evaluated: model, tokenizer and the run's settings."""

    model: GPT
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    data_cfg: DataConfig
    training: TrainingConfig
    ignored_keys: list[str]  # keys of the stored config that this gptexp no longer knows


def _known_fields(schema: type[Options], values: dict[str, Any]) -> Options:
    names = {f.name for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    return schema(**{key: value for key, value in values.items() if key in names})


def rebuild_model(state: dict[str, Any]) -> RebuiltRun:
    """The model, tokenizer and settings of a checkpoint, from the checkpoint alone.

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
    model.eval()
    return RebuiltRun(model, tokenizer, model_cfg, data_cfg, training, ignored)


def reload_corpus(rebuilt: RebuiltRun, fingerprint: str | None) -> tuple[Corpus, str]:
    """The run's text (checked against the fingerprint the run recorded) and its corpus,
    tokenized with the run's own tokenizer."""
    data_cfg = rebuilt.data_cfg
    text = load_text(data_cfg)
    if sha256_text(text) != fingerprint:
        where = f"data.name={data_cfg.name!r}" + (
            f" data.path={data_cfg.path!r}" if data_cfg.path else ""
        )
        raise DataError(
            f"{where}: the text differs from the one this run was trained on (sha256); "
            "evaluate with the original text (data.path=<a copy of it>)"
        )
    return prepare_corpus(data_cfg, rebuilt.model_cfg.block_size, rebuilt.tokenizer), text


# ----------------------------------------------------------------------------- one run


@dataclass
class EvalResult:
    run: Path
    label: str
    record: dict[str, Any]
    samples: list[str]


def units_per_token(corpus: Corpus, tokenizer: Tokenizer, text: str, split: str) -> float:
    """Characters (char tokenizer) or UTF-8 bytes (BPE) per token of the split's text."""
    if split == "val":
        return corpus.val_units_per_token
    # Units add up over the split point, so the train split's are the whole text's minus val's.
    return (tokenizer.units(text) - corpus.val_units) / max(1, len(corpus.train))


def evaluation_device(requested: str | None, trained_on: str) -> torch.device:
    """``requested``, or the device the run trained on; one this machine lacks is an error
    that says how to evaluate elsewhere."""
    try:
        return resolve_device(requested or trained_on)
    except ConfigError as error:
        reason = str(error).partition(": ")[2]
        key = f"device={requested!r}" if requested else f"the run's training.device={trained_on!r}"
        raise ConfigError(f"{key}: {reason}; evaluate with device=cpu") from None


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    if not prompt:
        return [0]
    try:
        return tokenizer.encode(prompt)
    except ValueError as error:
        raise ConfigError(f"prompt={prompt!r}: {error}") from None


def generate_samples(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    options: EvalOptions,
    count: int,
    seed: int,
    device: torch.device,
) -> list[str]:
    """``count`` samples from one seeded generator: the same seed gives the same text."""
    if count == 0:
        return []
    generator = torch.Generator(device=device).manual_seed(seed)
    start = torch.tensor([prompt_ids] * count, dtype=torch.long, device=device)  # (N, T0)
    ids = model.generate(
        start,
        options.max_new_tokens,
        temperature=options.temperature,
        top_k=options.top_k or None,
        generator=generator,
    )
    keep_from = 0 if options.prompt else 1  # the start token of an empty prompt is not text
    return [tokenizer.decode(row[keep_from:].tolist()) for row in ids]


def logged_val_loss(run: RunDirectory, step: int) -> float | None:
    for record in read_metrics(run.metrics):
        if record["step"] == step and record.get("val/loss") is not None:
            return float(record["val/loss"])
    return None


def evaluate_run(run: RunDirectory, options: EvalOptions, samples: int) -> EvalResult:
    """Score one checkpoint of ``run`` and write ``<run>/eval/<ckpt>.json`` (and samples).

    Everything that can fail on bad input happens before the first write.
    """
    loaded = load_run_checkpoint(run, options.ckpt)
    state, entry = loaded.state, loaded.entry
    rebuilt = rebuild_model(state)
    if rebuilt.ignored_keys:
        log.warning(
            "%s: ignoring stored config keys this gptexp no longer knows: %s",
            run.path.name,
            ", ".join(rebuilt.ignored_keys),
        )
    training = rebuilt.training
    device = evaluation_device(options.device, training.device)
    precision = training.precision
    if precision == "fp16" and device.type != "cuda":
        log.warning("the run trained in fp16, which needs CUDA: evaluating in fp32 on %s", device)
        precision = "fp32"
    rebuilt.model.to(device)
    if options.data_path is not None:
        rebuilt.data_cfg = dataclasses.replace(rebuilt.data_cfg, path=options.data_path)
    prompt_ids = encode_prompt(rebuilt.tokenizer, options.prompt)
    corpus, text = reload_corpus(rebuilt, state.get("data_fingerprint"))
    if training.num_threads:
        torch.set_num_threads(training.num_threads)  # the trainer's thread count: same sums

    batches = options.batches or training.eval_batches
    batch_size = options.batch_size or training.batch_size
    seed = training.seed if options.seed is None else options.seed
    tokens = corpus.val if options.split == "val" else corpus.train
    loss = evaluate_loss(
        rebuilt.model,
        tokens,
        block_size=rebuilt.model_cfg.block_size,
        batch_size=batch_size,
        seed=seed,
        split=options.split,
        batches=batches,
        device=device,
        precision=precision,
    )
    unit = rebuilt.tokenizer.unit
    bits_per_token = loss / math.log(2)
    bits_per_unit = bits_per_token / units_per_token(corpus, rebuilt.tokenizer, text, options.split)
    as_trained = (options.split, batches, batch_size, seed) == (
        "val",
        training.eval_batches,
        training.batch_size,
        training.seed,
    )
    record: dict[str, Any] = {
        "run": str(run.path),
        "status": run.read_status().get("status"),
        "ckpt": options.ckpt,
        "checkpoint": entry.file,
        "step": entry.step,
        "skipped_checkpoints": loaded.skipped,
        "split": options.split,
        "batches": batches,
        "batch_size": batch_size,
        "block_size": rebuilt.model_cfg.block_size,
        "seed": seed,
        "device": str(device),
        "precision": precision,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": bits_per_token,
        "unit": unit,
        f"bits_per_{unit}": bits_per_unit,
        # The trainer's number for this checkpoint; equal to loss when evaluated as trained.
        "logged_val_loss": logged_val_loss(run, entry.step) if as_trained else None,
        "ignored_config_keys": rebuilt.ignored_keys,
        "evaluated_at": now(),
    }
    texts = generate_samples(
        rebuilt.model, rebuilt.tokenizer, prompt_ids, options, samples, seed, device
    )
    if texts:
        record["sampling"] = {
            "samples": samples,
            "max_new_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "top_k": options.top_k or None,
            "prompt": options.prompt,
            "seed": seed,
        }

    suffix = "" if options.split == "val" else f"_{options.split}"
    run.eval_dir.mkdir(exist_ok=True)
    atomic_write_json(run.eval_dir / f"{loaded.label}{suffix}.json", record)
    if texts:
        header = f"step {entry.step}, seed {seed}, temperature {options.temperature}"
        body = "".join(f"=== sample {i + 1} ({header})\n{text}\n\n" for i, text in enumerate(texts))
        atomic_write_bytes(run.eval_dir / f"samples_{loaded.label}.txt", body.encode("utf-8"))
    return EvalResult(run.path, loaded.label, record, texts)


def print_run_result(result: EvalResult) -> None:
    r, unit = result.record, result.record["unit"]
    rows = [
        ("run", f"{r['run']} ({r['status']})"),
        ("checkpoint", f"{r['checkpoint']} (ckpt={r['ckpt']}, step {r['step']})"),
        (
            "split",
            f"{r['split']}: {r['batches']} batches x {r['batch_size']} x {r['block_size']} "
            f"tokens, seed {r['seed']}",
        ),
        ("loss", f"{r['loss']:.4f}"),
        ("perplexity", f"{r['perplexity']:.2f}"),
        (f"bits/{unit}", f"{r['bits_per_' + unit]:.4f}"),
    ]
    if r["logged_val_loss"] is not None:
        same = "equal" if r["logged_val_loss"] == r["loss"] else "differs"
        rows.append(("logged", f"val/loss {r['logged_val_loss']:.4f} at step {r['step']} ({same})"))
    suffix = "" if r["split"] == "val" else f"_{r['split']}"
    rows.append(("saved", str(result.run / "eval" / f"{result.label}{suffix}.json")))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    for i, text in enumerate(result.samples):
        print(f"\n--- sample {i + 1}\n{text}")


# ----------------------------------------------------------------------------- a sweep


def looks_like_run(path: Path) -> bool:
    """What require_run accepts: a run.json or (a run that never started) Hydra's config."""
    run = RunDirectory(path)
    return run.is_run() or run.config_yaml.is_file()


def sweep_runs(path: Path) -> list[RunDirectory]:
    """The run directories directly under ``path``, in numeric (Hydra job) order."""
    runs = [RunDirectory(sub) for sub in path.iterdir() if sub.is_dir() and looks_like_run(sub)]
    return sorted(runs, key=lambda run: _job_order(run.path.name))


def _job_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def differing_overrides(runs: list[RunDirectory]) -> dict[Path, str]:
    """Each run's overrides without the ones every run shares: what sets it apart."""
    overrides = {run.path: run.overrides() for run in runs}
    common = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    return {
        path: " ".join(o for o in items if o not in common) for path, items in overrides.items()
    }


def evaluate_sweep(path: Path, runs: list[RunDirectory], options: EvalOptions) -> list[EvalResult]:
    """Every run of the sweep, one table; a run that cannot be evaluated is listed with why."""
    overrides = differing_overrides(runs)
    samples = options.samples or 0
    rows = [("run", "overrides", "checkpoint", "step", "loss", "ppl", "note")]
    results = []
    for run in runs:
        try:
            result = evaluate_run(run, options, samples)
        except USER_ERRORS as error:
            reason = str(error).replace(str(run.path) + ": ", "").splitlines()[0]
            rows.append((run.path.name, overrides[run.path], "-", "-", "-", "-", reason))
            continue
        results.append(result)
        r = result.record
        note = (
            f"skipped damaged: {len(r['skipped_checkpoints'])}" if r["skipped_checkpoints"] else ""
        )
        rows.append(
            (
                run.path.name,
                overrides[run.path],
                r["checkpoint"],
                str(r["step"]),
                f"{r['loss']:.4f}",
                f"{r['perplexity']:.2f}",
                note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(
        f"{path} ({len(results)} of {len(runs)} runs evaluated, ckpt={options.ckpt}, "
        f"split={options.split})"
    )
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not results:
        raise RunError(f"{path}: none of its {len(runs)} runs could be evaluated")
    return results


# ----------------------------------------------------------------------------- entry


def evaluate(options: EvalOptions) -> list[EvalResult]:
    """Evaluate the run (or every run of the sweep) at ``options.run``."""
    path = Path(options.run)
    if path.is_dir() and not looks_like_run(path):
        runs = sweep_runs(path)
        if not runs:
            raise RunError(
                f"{path}: neither a gptexp run directory (no run.json or .hydra/config.yaml) nor "
                "a sweep (no run directories inside); runs are the directories that "
                "python -m gptexp.train creates under outputs/"
            )
        return evaluate_sweep(path, runs, options)
    run = require_run(path)
    result = evaluate_run(run, options, 1 if options.samples is None else options.samples)
    print_run_result(result)
    return [result]


def main() -> None:
    with run_logging(None):
        report_errors(lambda: evaluate(parse_key_values(sys.argv[1:], EvalOptions, USAGE)))


if __name__ == "__main__":
    main()
