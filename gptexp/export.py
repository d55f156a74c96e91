"""``python -m gptexp.export run=<dir> [ckpt=last|best|<step>] [format=gptexp|hf] [out=<dir>]``:
a checkpoint's model as plain files that need nothing of gptexp's checkpoint format.

The export directory holds ``model.safetensors`` (the weights; the output layer is tied to the
token embedding, so that matrix is stored once), ``config.json`` (the model's shape and
vocabulary size) and ``tokenizer.json``. :func:`load_export` reads it back into a ``GPT`` and
its tokenizer. The default directory is ``<run>/export/<ckpt>/``.

``format=hf`` writes a directory that ``transformers`` loads as a GPT-2 model
(``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``), by default
``<run>/export/<ckpt>-hf/``; see :mod:`gptexp.model.hf`.

Placement (:func:`place_export`): an export is written whole into a temporary sibling of its
directory and renamed into place, so a reader (or a kill at any instant) sees the whole old
export or the whole new one, never one's config beside the other's weights. An existing
directory is replaced only when it is an export of the same run (its ``config.json`` source, or
for ``format=hf`` its weights' ``gptexp.run`` metadata, names the run); any other non-empty
directory is refused, untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch

from gptexp.checkpoint.stored import (
    check_ckpt,
    check_weights,
    load_run_checkpoint,
    logged_val_loss,
    rebuild_model,
)
from gptexp.core.cli import command_logging, parse_options, run_command
from gptexp.core.config import ModelConfig
from gptexp.core.errors import ConfigError, RunError
from gptexp.core.fsio import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir
from gptexp.data.tokenizers import Tokenizer, tokenizer_from_json
from gptexp.model.gpt import GPT
from gptexp.model.hf import (
    GENERATION,
    MODEL_CARD,
    TOKENIZER_CONFIG,
    ExportInfo,
    check_hf_export,
    model_card,
    require_transformers,
    save_hf,
)
from gptexp.observe.rundir import RunDirectory, require_run
from gptexp.training.speed import prepare_command_process

USAGE = (
    "usage: python -m gptexp.export run=<run dir> [ckpt=last|best|<step>] [format=gptexp|hf] "
    "[out=<dir>]"
)
FORMATS = ("gptexp", "hf")

EXPORT_FORMAT = "gptexp-export"
EXPORT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"

# Parameters that are the same tensor as another one. safetensors refuses tensors that share
# memory, and storing the matrix twice would double the largest weight: it is stored under its
# source name only and re-tied on load.
TIED_WEIGHTS = {"lm_head.weight": "wte.weight"}


@dataclass
class ExportOptions:
    run: str
    ckpt: str = "last"
    out: str | None = None  # default: <run>/export/<ckpt>/ (<ckpt>-hf/ for format=hf)
    format: str = "gptexp"  # gptexp | hf (a transformers GPT-2 directory)
    # raw: the trained weights; ema: their moving average (default out: <ckpt>_ema)
    weights: str = "raw"

    def __post_init__(self) -> None:
        check_ckpt(self.ckpt)
        check_weights(self.weights)
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r}: must be one of {', '.join(FORMATS)}")


def save_export(model: GPT, tokenizer: Tokenizer, out: Path, source: dict[str, Any]) -> None:
    """Write ``model`` and ``tokenizer`` to ``out`` (each file atomically)."""
    weights = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if name not in TIED_WEIGHTS
    }
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": asdict(model.cfg),
        "vocab_size": model.vocab_size,
        "tied_weights": TIED_WEIGHTS,
        "source": source,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS, safetensors.torch.save(weights, metadata={"format": "pt"}))
    atomic_write_text(out / TOKENIZER, tokenizer.to_json())
    atomic_write_json(out / CONFIG, config)  # last: a directory with config.json is complete


def load_export(directory: str | Path) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, on the CPU) and tokenizer of an export directory."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != EXPORT_FORMAT or config.get("version", 0) > EXPORT_VERSION:
        raise ConfigError(
            f"{directory / CONFIG}: not a gptexp export this version reads "
            f"(format {config.get('format')!r}, version {config.get('version')!r})"
        )
    model = GPT(ModelConfig(**config["model"]), int(config["vocab_size"]))
    weights = safetensors.torch.load_file(directory / WEIGHTS)
    for tied, source in config["tied_weights"].items():
        weights[tied] = weights[source]
    model.load_state_dict(weights)  # strict: every parameter present, every shape right
    tokenizer = tokenizer_from_json((directory / TOKENIZER).read_text(encoding="utf-8"))
    return model.eval(), tokenizer


def export(options: ExportOptions) -> Path:
    if options.format == "hf":
        return export_hf(options)
    run = require_run(options.run)
    loaded = load_run_checkpoint(run, options.ckpt, options.weights)
    rebuilt = rebuild_model(loaded.state, options.weights)
    out = Path(options.out) if options.out else run.path / "export" / loaded.label
    source = {
        "run": str(run.path),
        "checkpoint": loaded.entry.file,
        "step": loaded.entry.step,
        "weights": options.weights,
    }
    place_export(run, out, lambda tmp: save_export(rebuilt.model, rebuilt.tokenizer, tmp, source))
    size = (out / WEIGHTS).stat().st_size
    print(
        f"exported {loaded.entry.file} (step {loaded.entry.step}) of {run.path}\n"
        f"  to {out}: {WEIGHTS} ({size / 1e6:.2f} MB), {CONFIG}, {TOKENIZER}"
    )
    return out


def export_hf(options: ExportOptions) -> Path:
    """``format=hf``: the checkpoint as a transformers GPT-2 directory, checked by loading it
    back with transformers."""
    require_transformers("format=hf")  # before anything is read or written
    run = require_run(options.run)
    loaded = load_run_checkpoint(run, options.ckpt, options.weights)
    rebuilt = rebuild_model(loaded.state, options.weights)
    out = Path(options.out) if options.out else run.path / "export" / f"{loaded.label}-hf"
    info = ExportInfo(
        run=str(run.path),
        checkpoint=loaded.entry.file,
        step=loaded.entry.step,
        config=loaded.state["config"],
        data_fingerprint=loaded.state.get("data_fingerprint"),
        val_loss=logged_val_loss(run, loaded.entry.step, options.weights),
        weights=options.weights,
    )
    difference = 0.0

    def write(tmp: Path) -> None:
        nonlocal difference
        save_hf(rebuilt.model, rebuilt.tokenizer, tmp, info)
        # The card names where the export will be, not the temporary directory.
        card = model_card(rebuilt.model, rebuilt.tokenizer, info, out)
        atomic_write_bytes(tmp / MODEL_CARD, card.encode("utf-8"))
        difference = check_hf_export(tmp, rebuilt.model)  # checked before it replaces anything

    place_export(run, out, write)
    size = (out / WEIGHTS).stat().st_size
    print(
        f"exported {loaded.entry.file} (step {loaded.entry.step}) of {run.path}\n"
        f"  to {out} for transformers: {WEIGHTS} ({size / 1e6:.2f} MB), {CONFIG}, "
        f"{GENERATION}, {TOKENIZER}, {TOKENIZER_CONFIG}, {MODEL_CARD}\n"
        f"  loaded back with transformers: largest logit difference {difference:.2e}"
    )
    return out


def exported_run(directory: Path) -> str | None:
    """The run an existing export directory was exported from (native: ``config.json``'s
    source; ``format=hf``: the weights' ``gptexp.run`` metadata), or None: not an export."""
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        if isinstance(config, dict) and config.get("format") == EXPORT_FORMAT:
            source = config.get("source")
            return str(source.get("run")) if isinstance(source, dict) else None
        with safetensors.safe_open(directory / WEIGHTS, framework="pt") as weights:
            return (weights.metadata() or {}).get("gptexp.run")
    except (OSError, ValueError, RecursionError, safetensors.SafetensorError):
        return None  # unreadable or damaged: not something to replace


def place_export(run: RunDirectory, out: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a new temporary sibling of ``out``, then rename it to ``out``.

    A RunError (exit 2, nothing written) when ``out`` is a link, not a directory, or a
    non-empty directory that is not an export of ``run``. Replacing an export of this run: the
    old one is renamed aside, the new one renamed in, then the old one removed, so a kill at
    any instant leaves a whole export (the old one, at worst under its aside name
    ``.<name>.old-*``), never a mix; a failed write leaves the old export as it was.
    """
    if out.is_symlink():
        raise RunError(f"out={out} is a symbolic link; give the directory it points to")
    within = Path(os.path.abspath(out))  # lexically: a link on the way must not be followed
    if within.is_relative_to(run.path):
        run.refuse_links(within)  # the default <run>/export/...: written through no link
    if out.exists() and not out.is_dir():
        raise RunError(f"out={out} exists and is not a directory; choose another out=")
    replace = out.is_dir() and any(out.iterdir())
    if replace and exported_run(out) != str(run.path):
        raise RunError(
            f"out={out} is not empty and not an export of {run.path}; choose a new or empty "
            "directory (nothing was written)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    aside: Path | None = None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is an ordinary directory
        write(tmp)
        if replace:
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside)  # onto the empty placeholder just made
        os.replace(tmp, out)  # onto a missing or empty directory: one atomic rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, made above
        if aside is not None:
            if not out.exists():
                os.replace(aside, out)  # the old export back where it was
            else:
                aside.rmdir()  # the empty placeholder (never renamed onto)
        raise
    if aside is not None:
        shutil.rmtree(aside)
    fsync_dir(out.parent)


def main() -> None:
    prepare_command_process()  # gptexp.training.speed: reproducible matmuls, a quiet collector
    with command_logging(None):
        run_command(lambda: export(parse_options(sys.argv[1:], ExportOptions, USAGE)))


if __name__ == "__main__":
    main()
