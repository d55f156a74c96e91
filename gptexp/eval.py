"""``python -m gptexp.eval run=<run or sweep dir> [key=value ...]``: evaluate a run from its
directory alone.

The model is rebuilt from the checkpoint's own config and tokenizer (never from today's
``conf/``), loaded with ``weights_only=True`` and scored by
:func:`gptexp.training.scoring.evaluate_loss` on the run's own evaluation batches, so a
checkpoint's eval loss equals the ``val/loss`` the trainer logged at its step. Results go to
``<run>/eval/<ckpt>.json``, samples to
``<run>/eval/samples_<ckpt>.txt``; nothing else in the run is written. A directory whose
subdirectories are runs (a sweep) is evaluated run by run into one table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from gptexp.checkpoint.stored import (
    LoadedCheckpoint,
    RebuiltRun,
    check_ckpt,
    check_weights,
    load_run_checkpoint,
    logged_val_loss,
    rebuild_model,
    reload_corpus,
)
from gptexp.core.cli import command_logging, parse_options, run_command
from gptexp.core.config import DEVICES, check_seed
from gptexp.core.errors import USER_ERRORS, ConfigError, RunError
from gptexp.core.fsio import atomic_write_json, atomic_write_text
from gptexp.data.corpus import Corpus
from gptexp.data.tokenizers import Tokenizer
from gptexp.observe.rundir import RunDirectory, find_runs, now
from gptexp.observe.runtable import distinguishing_keys, labels, run_rows
from gptexp.observe.tables import text_table
from gptexp.training.runtime import resolve_device
from gptexp.training.scoring import evaluate_loss, generate_text
from gptexp.training.speed import prepare_command_process

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

    ALIASES: ClassVar[dict[str, str]] = {"data.path": "data_path"}

    run: str
    ckpt: str = "last"  # last | best | <step>
    split: str = "val"
    batches: int | None = None  # default: the run's training.eval_batches
    batch_size: int | None = None  # default: the run's training.batch_size
    seed: int | None = None  # sampling only; default: the run's training.seed
    samples: int | None = None  # default: 1 for a run, 0 for each run of a sweep
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 50  # None or 0: no top-k filtering
    prompt: str = ""  # empty: start from token 0, as the trainer's samples do
    device: str | None = None  # default: the run's training.device
    data_path: str | None = None  # the run's text moved: where it is now (checked by sha256)
    # raw: the trained weights; ema: their moving average (runs with training.ema_decay > 0),
    # written to eval/<ckpt>_ema.json
    weights: str = "raw"

    def __post_init__(self) -> None:
        check_ckpt(self.ckpt)
        check_weights(self.weights)
        if self.split not in ("val", "train"):
            raise ConfigError(f"split={self.split!r}: must be val or train")
        for key in ("batches", "batch_size", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if self.seed is not None:
            check_seed("seed", self.seed)
        if self.samples is not None and self.samples < 0:
            raise ConfigError(f"samples={self.samples}: must be >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if self.device is not None and self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}: must be one of {', '.join(DEVICES)}")


# ----------------------------------------------------------------------------- one run


@dataclass
class EvalResult:
    run: Path
    label: str
    record: dict[str, Any]
    samples: list[str]


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
    model,
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
    continuations = generate_text(
        model,
        prompt_ids,
        count,
        options.max_new_tokens,
        temperature=options.temperature,
        top_k=options.top_k or None,
        seed=seed,
        device=device,
    )
    # An empty prompt starts from token 0, which is not part of the text.
    shown = prompt_ids if options.prompt else []
    return [tokenizer.decode(shown + ids) for ids in continuations]


def evaluate_run(run: RunDirectory, options: EvalOptions, samples: int) -> EvalResult:
    """Score one checkpoint of ``run`` and write ``<run>/eval/<ckpt>.json`` (and samples).

    Everything that can fail on bad input happens before the first write.
    """
    run.refuse_links(run.eval_dir)  # results go into the run, never through a link
    loaded = load_run_checkpoint(run, options.ckpt, options.weights)
    subject = prepare(run, loaded, options)
    record = score(run, loaded, subject, options)
    rebuilt, training = subject.rebuilt, subject.rebuilt.training
    # The evaluation batches are always drawn as the trainer draws them (its training.seed),
    # so a loss stays comparable with the logged one; seed= changes the samples only.
    sampling_seed = training.seed if options.seed is None else options.seed
    texts = generate_samples(
        rebuilt.model,
        rebuilt.tokenizer,
        subject.prompt_ids,
        options,
        samples,
        sampling_seed,
        subject.device,
    )
    if texts:
        record["sampling"] = {
            "samples": samples,
            "max_new_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "top_k": options.top_k or None,
            "prompt": options.prompt,
            "seed": sampling_seed,
        }
    write(run, loaded, options, record, texts, sampling_seed)
    return EvalResult(run.path, loaded.label, record, texts)


@dataclass
class Subject:
    """A checkpoint's model, rebuilt and placed, with what scoring it needs."""

    rebuilt: RebuiltRun
    device: torch.device
    precision: str
    corpus: Corpus
    prompt_ids: list[int]


def prepare(run: RunDirectory, loaded: LoadedCheckpoint, options: EvalOptions) -> Subject:
    """The checkpoint's model on the evaluation device, its corpus and the encoded prompt
    (bad input fails here, before anything is written)."""
    state = loaded.state
    rebuilt = rebuild_model(state, options.weights)
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
    corpus = reload_corpus(rebuilt, state.get("data_fingerprint"))
    if training.num_threads:
        torch.set_num_threads(training.num_threads)  # the trainer's thread count: same sums

    return Subject(rebuilt, device, precision, corpus, prompt_ids)


def score(
    run: RunDirectory, loaded: LoadedCheckpoint, subject: Subject, options: EvalOptions
) -> dict[str, Any]:
    """The loss of the checkpoint on its run's evaluation batches: the record of eval/."""
    rebuilt, device, precision, corpus = (
        subject.rebuilt,
        subject.device,
        subject.precision,
        subject.corpus,
    )
    training, entry = rebuilt.training, loaded.entry
    batches = options.batches or training.eval_batches
    batch_size = options.batch_size or training.batch_size
    tokens = corpus.val if options.split == "val" else corpus.train
    loss = evaluate_loss(
        rebuilt.model,
        tokens,
        block_size=rebuilt.model_cfg.block_size,
        batch_size=batch_size,
        seed=training.seed,
        split=options.split,
        batches=batches,
        device=device,
        precision=precision,
    )
    unit = rebuilt.tokenizer.unit
    bits_per_token = loss / math.log(2)
    bits_per_unit = bits_per_token / corpus.units_per_token(options.split)
    as_trained = (options.split, batches, batch_size) == (
        "val",
        training.eval_batches,
        training.batch_size,
    )
    logged = logged_val_loss(run, entry.step, options.weights)
    record: dict[str, Any] = {
        "run": str(run.path),
        "status": run.status(),
        "ckpt": options.ckpt,
        "checkpoint": entry.file,
        "step": entry.step,
        "weights": options.weights,
        "skipped_checkpoints": loaded.skipped,
        "split": options.split,
        "batches": batches,
        "batch_size": batch_size,
        "block_size": rebuilt.model_cfg.block_size,
        "seed": training.seed,  # of the evaluation batches: the run's own
        "device": str(device),
        "precision": precision,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": bits_per_token,
        "unit": unit,
        f"bits_per_{unit}": bits_per_unit,
        # The trainer's number for this checkpoint (val/loss_ema for weights=ema); equal to
        # loss when evaluated as trained.
        "logged_val_loss": logged if as_trained else None,
        "ignored_config_keys": rebuilt.ignored_keys,
        "evaluated_at": now(),
    }
    return record


def write(
    run: RunDirectory,
    loaded: LoadedCheckpoint,
    options: EvalOptions,
    record: dict[str, Any],
    texts: list[str],
    sampling_seed: int,
) -> None:
    """``<run>/eval/<ckpt>[_<split>].json`` and the samples' text file, each atomically."""
    entry = loaded.entry
    suffix = "" if options.split == "val" else f"_{options.split}"
    run.eval_dir.mkdir(exist_ok=True)
    atomic_write_json(run.eval_dir / f"{loaded.label}{suffix}.json", record)
    if texts:
        header = f"step {entry.step}, seed {sampling_seed}, temperature {options.temperature}"
        body = "".join(f"=== sample {i + 1} ({header})\n{text}\n\n" for i, text in enumerate(texts))
        atomic_write_text(run.eval_dir / f"samples_{loaded.label}.txt", body)


def print_run_result(result: EvalResult) -> None:
    r, unit = result.record, result.record["unit"]
    rows = [
        ("run", f"{r['run']} ({r['status']})"),
        ("checkpoint", f"{r['checkpoint']} (ckpt={r['ckpt']}, step {r['step']})"),
        *([("weights", "ema (the weights' moving average)")] if r["weights"] == "ema" else []),
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
        metric = "val/loss_ema" if r["weights"] == "ema" else "val/loss"
        rows.append(("logged", f"{metric} {r['logged_val_loss']:.4f} at step {r['step']} ({same})"))
    suffix = "" if r["split"] == "val" else f"_{r['split']}"
    rows.append(("saved", str(result.run / "eval" / f"{result.label}{suffix}.json")))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    for i, text in enumerate(result.samples):
        print(f"\n--- sample {i + 1}\n{text}")


# ----------------------------------------------------------------------------- a sweep


def evaluate_sweep(path: Path, runs: list[RunDirectory], options: EvalOptions) -> list[EvalResult]:
    """Every run of the sweep, one table; a run that cannot be evaluated is listed with why."""
    rows = run_rows(runs)
    keys = distinguishing_keys(rows)
    samples = options.samples or 0
    table: list[list[str]] = []
    results = []
    for run, row, name in zip(runs, rows, labels(rows, keys), strict=True):
        try:
            result = evaluate_run(run, options, samples)
        except USER_ERRORS as error:
            reason = str(error).replace(str(run.path) + ": ", "").splitlines()[0]
            table.append([row["run"], name, "-", "-", "-", "-", reason])
            continue
        results.append(result)
        r = result.record
        skipped = r["skipped_checkpoints"]
        note = f"skipped damaged: {len(skipped)}" if skipped else ""
        table.append(
            [
                row["run"],
                name,
                r["checkpoint"],
                str(r["step"]),
                f"{r['loss']:.4f}",
                f"{r['perplexity']:.2f}",
                note,
            ]
        )
    print(
        f"{path} ({len(results)} of {len(runs)} runs evaluated, ckpt={options.ckpt}, "
        f"split={options.split})"
    )
    header = ["run", "what sets it apart", "checkpoint", "step", "loss", "ppl", "note"]
    print(text_table(header, table))
    if not results:
        raise RunError(f"{path}: none of its {len(runs)} runs could be evaluated")
    return results


# ----------------------------------------------------------------------------- entry


def evaluate(options: EvalOptions) -> list[EvalResult]:
    """Evaluate the run (or every run of the sweep) at ``options.run``."""
    runs = find_runs(options.run)
    if not RunDirectory(options.run).is_run():
        return evaluate_sweep(Path(options.run), runs, options)
    result = evaluate_run(runs[0], options, 1 if options.samples is None else options.samples)
    print_run_result(result)
    return [result]


def main() -> None:
    prepare_command_process()  # gptexp.training.speed: reproducible matmuls, a quiet collector
    with command_logging(None):
        run_command(lambda: evaluate(parse_options(sys.argv[1:], EvalOptions, USAGE)))


if __name__ == "__main__":
    main()
