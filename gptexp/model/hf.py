"""Hugging Face interop: a run as a ``transformers`` GPT-2 directory, and a run started from one.

gptexp's GPT is GPT-2's architecture (pre-LayerNorm blocks, learned positions, tied output
layer, LayerNorm epsilon 1e-5), so the two convert exactly, name for name:

    gptexp                       transformers (GPT2LMHeadModel)
    wte / wpe / ln_f             transformer.wte / transformer.wpe / transformer.ln_f
    blocks.{i}.ln_1 / ln_2       transformer.h.{i}.ln_1 / ln_2
    blocks.{i}.attn.qkv / proj   transformer.h.{i}.attn.c_attn / c_proj     (transposed)
    blocks.{i}.mlp.fc / proj     transformer.h.{i}.mlp.c_fc / c_proj        (transposed)
    lm_head (tied to wte)        lm_head (tied to transformer.wte)

GPT-2's ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``'s (out, in).
A model without biases exports zero biases; the activation is named so that transformers
computes the same function (``gelu``: exact erf GELU; ``gelu_tanh``: ``gelu_pytorch_tanh``).

``transformers`` is an optional extra (``pip install "gptexp[hf]"``): it is imported only
inside the functions that need it, and without it they raise a ConfigError that says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from gptexp.core.config import ModelConfig, TrainConfig
from gptexp.core.errors import ConfigError
from gptexp.core.fsio import atomic_write_bytes, atomic_write_json
from gptexp.data.tokenizers import BPETokenizer, CharTokenizer, Tokenizer
from gptexp.model.gpt import GPT, LAYER_NORM_EPS

EXTRA = 'pip install "gptexp[hf]"'
WEIGHTS, CONFIG, GENERATION = "model.safetensors", "config.json", "generation_config.json"
TOKENIZER, TOKENIZER_CONFIG, MODEL_CARD = "tokenizer.json", "tokenizer_config.json", "README.md"

# model.activation -> config.json's activation_function, and back.
ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# gelu_new is GPT-2's own tanh approximation written out in Python: the same function as
# PyTorch's approximate="tanh" (within float rounding).
ACTIVATION_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
END_OF_TEXT = ("<|endoftext|>", "</s>", "<eos>")  # special tokens that end a document
# What a model.init_from source decides; conf/model presets set all but the activation.
SOURCE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "activation")
PRESET_KEYS = SOURCE_KEYS[:-1]


def require_transformers(feature: str):
    """The ``transformers`` module, or a ConfigError naming the extra that provides it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{feature} needs the Hugging Face extra: {EXTRA}") from None
    return transformers


# ----------------------------------------------------------------------------- weights


def _linear_pairs(n_layer: int) -> list[tuple[str, str]]:
    """(gptexp name, transformers name) of every Linear / Conv1D layer."""
    pairs = []
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        pairs += [
            (ours + "attn.qkv", theirs + "attn.c_attn"),
            (ours + "attn.proj", theirs + "attn.c_proj"),
            (ours + "mlp.fc", theirs + "mlp.c_fc"),
            (ours + "mlp.proj", theirs + "mlp.c_proj"),
        ]
    return pairs


def _norm_pairs(n_layer: int) -> list[tuple[str, str]]:
    """(gptexp name, transformers name) of every LayerNorm."""
    pairs = [("ln_f", "transformer.ln_f")]
    for i in range(n_layer):
        pairs += [(f"blocks.{i}.{ln}", f"transformer.h.{i}.{ln}") for ln in ("ln_1", "ln_2")]
    return pairs


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """``model``'s weights under GPT2LMHeadModel's names (the tied lm_head left out, as
    ``save_pretrained`` does); absent biases become zeros."""
    ours = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
    out = {
        "transformer.wte.weight": ours["wte.weight"],
        "transformer.wpe.weight": ours["wpe.weight"],
    }
    for src, dst in _norm_pairs(model.cfg.n_layer):
        weight = ours[src + ".weight"]
        out[dst + ".weight"] = weight
        out[dst + ".bias"] = ours.get(src + ".bias", torch.zeros_like(weight))
    for src, dst in _linear_pairs(model.cfg.n_layer):
        weight = ours[src + ".weight"]  # (out, in)
        out[dst + ".weight"] = weight.t()  # Conv1D: (in, out)
        out[dst + ".bias"] = ours.get(src + ".bias", weight.new_zeros(weight.shape[0]))
    return {name: t.contiguous() for name, t in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict under gptexp's names (for a model with biases)."""
    out = {"wte.weight": hf["transformer.wte.weight"], "wpe.weight": hf["transformer.wpe.weight"]}
    for dst, src in _norm_pairs(n_layer):
        out[dst + ".weight"], out[dst + ".bias"] = hf[src + ".weight"], hf[src + ".bias"]
    for dst, src in _linear_pairs(n_layer):
        out[dst + ".weight"] = hf[src + ".weight"].t()  # (in, out) -> nn.Linear's (out, in)
        out[dst + ".bias"] = hf[src + ".bias"]
    out["lm_head.weight"] = out["wte.weight"]  # tied
    return {name: t.float().contiguous() for name, t in out.items()}


# ----------------------------------------------------------------------------- tokenizers


def char_backend(chars: list[str]):
    """gptexp's char tokenizer as a ``tokenizers.Tokenizer``: one WordLevel token per
    character, every character its own piece, decoded by plain concatenation."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    # [\s\S] matches any one code point, newlines included (unlike ".").
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join without the spaces WordLevel would put between
    return backend


def hf_backend(tokenizer: Tokenizer):
    """Any gptexp tokenizer as a ``tokenizers.Tokenizer`` with the same encode and decode."""
    if isinstance(tokenizer, CharTokenizer):
        return char_backend(tokenizer.chars)
    return tokenizer.tokenizer


def from_hf_backend(backend) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` as a gptexp tokenizer: a char tokenizer that gptexp exported
    becomes a char tokenizer again (bits per character); anything else is wrapped whole
    (bits per UTF-8 byte)."""
    data = json.loads(backend.to_str())
    if data.get("model", {}).get("type") == "WordLevel" and _adds_no_tokens(data):
        vocab = data["model"]["vocab"]
        chars = sorted(vocab, key=vocab.get)
        ours = json.loads(char_backend(chars).to_str())
        parts = ("normalizer", "pre_tokenizer", "model", "decoder", "added_tokens")
        if all(len(c) == 1 for c in chars) and all(data[p] == ours[p] for p in parts):
            return CharTokenizer(chars)
    return BPETokenizer(backend)


def _adds_no_tokens(data: dict[str, Any]) -> bool:
    """Whether a tokenizer's post-processor leaves the ids alone (transformers 5 installs a
    template that adds nothing when it loads a tokenizer without one)."""
    post = data.get("post_processor")
    plain = [{"Sequence": {"id": "A", "type_id": 0}}]
    return post is None or (post.get("type") == "TemplateProcessing" and post["single"] == plain)


def end_of_text(backend) -> tuple[str, int] | None:
    """The tokenizer's end-of-text special token (text, id), if it has one."""
    special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    for name in END_OF_TEXT:
        if name in special:
            return name, special[name]
    return None


# ----------------------------------------------------------------------------- export


@dataclass
class ExportInfo:
    """Where the exported weights come from (the model card and the weights' metadata)."""

    run: str
    checkpoint: str
    step: int
    config: dict[str, Any]  # the run's full config
    data_fingerprint: str | None
    val_loss: float | None  # val/loss the run logged at this step (val/loss_ema for ema)
    weights: str = "raw"  # raw | ema: the trained weights or their moving average


def hf_config(model_cfg: ModelConfig, vocab_size: int, eot_id: int | None):
    """GPT2Config for this shape: exactly gptexp's computation."""
    transformers = require_transformers("format=hf")
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=model_cfg.block_size,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        n_inner=4 * model_cfg.n_embd,
        activation_function=ACTIVATION_TO_HF[model_cfg.activation],
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        bos_token_id=eot_id,  # GPT2Config's default 50256 is wrong for other vocabularies
        eos_token_id=eot_id,
        architectures=["GPT2LMHeadModel"],
    )


def save_hf(model: GPT, tokenizer: Tokenizer, out: Path, info: ExportInfo) -> None:
    """Write ``model`` and ``tokenizer`` to ``out`` as a transformers GPT-2 directory, each file
    atomically, config.json last."""
    transformers = require_transformers("format=hf")
    backend = hf_backend(tokenizer)
    eot = end_of_text(backend)
    eot_id = eot[1] if eot else None
    config = hf_config(model.cfg, model.vocab_size, eot_id)
    # A length in new tokens, never max_length: transformers warns when a caller's
    # max_new_tokens meets a stored max_length, and when neither is stored at all. Half the
    # context leaves the other half for the prompt (GPT-2 has no positions beyond it).
    generation = transformers.GenerationConfig(
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,  # what transformers would pick, with a warning, for a batch
        max_new_tokens=model.cfg.block_size // 2,
    )
    # An explicit tokenizer_class: without it AutoTokenizer picks GPT-2's own tokenizer class
    # for model_type gpt2, which rebuilds GPT-2's pipeline around this vocabulary.
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.cfg.block_size,
        "clean_up_tokenization_spaces": False,  # decode must give the text back unchanged
    }
    if eot:
        tokenizer_config |= {"bos_token": eot[0], "eos_token": eot[0]}
    metadata = {
        "format": "pt",  # transformers reads only safetensors files marked "pt"
        "gptexp.run": info.run,
        "gptexp.checkpoint": info.checkpoint,
        "gptexp.step": str(info.step),
        "gptexp.config": json.dumps(info.config, sort_keys=True),
        "gptexp.data_fingerprint": str(info.data_fingerprint),
        "gptexp.val_loss": str(info.val_loss),
        "gptexp.weights": info.weights,
    }
    out.mkdir(parents=True, exist_ok=True)
    weights = safetensors.torch.save(to_hf_state_dict(model), metadata=metadata)
    atomic_write_bytes(out / WEIGHTS, weights)
    atomic_write_bytes(out / TOKENIZER, backend.to_str().encode("utf-8"))
    atomic_write_json(out / TOKENIZER_CONFIG, tokenizer_config)
    atomic_write_bytes(out / GENERATION, generation.to_json_string().encode("utf-8"))
    atomic_write_bytes(out / MODEL_CARD, model_card(model, tokenizer, info, out).encode("utf-8"))
    atomic_write_bytes(out / CONFIG, config.to_json_string(use_diff=False).encode("utf-8"))


def model_card(model: GPT, tokenizer: Tokenizer, info: ExportInfo, out: Path) -> str:
    loss = "not evaluated at this step" if info.val_loss is None else f"{info.val_loss:.4f}"
    ema = info.weights == "ema"
    rows = [
        ("run", f"`{info.run}`"),
        ("checkpoint", f"`{info.checkpoint}` (step {info.step})"),
        ("weights", "the moving average of the weights (ema)" if ema else "the trained weights"),
        (
            "validation loss",
            f"{loss} ({'val/loss_ema' if ema else 'val/loss'} the run logged at step {info.step})",
        ),
        ("data fingerprint", f"sha256 `{info.data_fingerprint}`"),
        ("tokenizer", f"{tokenizer.kind}, {tokenizer.vocab_size} tokens"),
        ("parameters", f"{model.num_parameters(non_embedding=False):,}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    config = json.dumps(info.config, indent=2, sort_keys=True)
    return f"""---
library_name: transformers
tags: [gptexp, gpt2]
---
# {Path(info.run).name} at step {info.step}

A GPT-2-architecture model trained with gptexp and exported by
`python -m gptexp.export run={info.run} format=hf`.

| | |
|---|---|
{table}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```

## Training config

```json
{config}
```
"""


@contextlib.contextmanager
def _no_progress_bars(transformers) -> Iterator[None]:
    """transformers' (and the hub's) progress bars off for a block, then as they were."""
    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_hf_export(out: Path, model: GPT) -> float:
    """Load ``out`` with transformers and return the largest logit difference from ``model``
    over one context of tokens (what tells a user the export computes what the run did)."""
    transformers = require_transformers("format=hf")
    with _no_progress_bars(transformers):  # export prints its own one-line summary
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    generator = torch.Generator().manual_seed(0)
    T = min(model.cfg.block_size, 64)
    ids = torch.randint(0, model.vocab_size, (1, T), generator=generator)  # (1, T)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours, _ = model(ids.to(next(model.parameters()).device))
        theirs = loaded(ids).logits
    model.train(was_training)
    return (ours.float().cpu() - theirs).abs().max().item()


# ----------------------------------------------------------------------------- import


@dataclass
class HFSource:
    """A GPT-2-family directory (what ``save_pretrained`` wrote), checked to be importable."""

    name: str  # as model.init_from gave it
    path: Path  # the local directory (a hub name's cached snapshot)
    model_values: dict[str, Any]  # the ModelConfig fields it decides (SOURCE_KEYS)
    tokenizer: Tokenizer
    weight_files: list[Path]


def _local_directory(init_from: str) -> Path:
    """The directory of ``init_from``: a local directory, or a hub name's snapshot (downloaded
    where the network allows, else from the local Hugging Face cache)."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        return path.resolve()
    if init_from.startswith(("/", ".", "~")) or path.exists():
        raise ConfigError(f"model.init_from={init_from!r}: no such directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "vocab.json", "merges.txt", "*.model"]
    try:
        return Path(snapshot_download(init_from, allow_patterns=patterns))
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.init_from={init_from!r}: not a local directory, and the Hugging Face Hub "
            f"could not provide it ({str(error).splitlines()[0]})"
        ) from None


def unsupported_features(config) -> list[str]:
    """What a GPT-2-family config uses that gptexp's model does not compute (empty: none)."""
    found = []
    if not getattr(config, "tie_word_embeddings", True):
        found.append("an untied output layer (tie_word_embeddings=false)")
    if config.layer_norm_epsilon != LAYER_NORM_EPS:
        found.append(
            f"layer_norm_epsilon={config.layer_norm_epsilon} (gptexp uses {LAYER_NORM_EPS})"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            found.append(f"{flag}=true")
    if getattr(config, "add_cross_attention", False):
        found.append("cross-attention (add_cross_attention=true)")
    if not getattr(config, "scale_attn_weights", True):
        found.append("unscaled attention (scale_attn_weights=false)")
    if config.n_inner not in (None, 4 * config.n_embd):
        found.append(f"n_inner={config.n_inner} (gptexp's MLP is 4 * n_embd={4 * config.n_embd})")
    if config.activation_function not in ACTIVATION_FROM_HF:
        known = ", ".join(ACTIVATION_FROM_HF)
        found.append(f"activation_function={config.activation_function!r} (gptexp has {known})")
    return found


def open_source(init_from: str) -> HFSource:
    """Check that ``init_from`` is a GPT-2-family model gptexp computes exactly, with a fast
    tokenizer that fits its embedding; nothing is loaded approximately."""
    transformers = require_transformers("model.init_from")
    path = _local_directory(init_from)
    key = f"model.init_from={init_from!r}"
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{key}: {path} has no {CONFIG} (not a save_pretrained directory)")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"{key}: unreadable {CONFIG} ({str(error).splitlines()[0]})") from None
    if config.model_type != "gpt2":
        raise ConfigError(
            f"{key}: model_type {config.model_type!r} is not GPT-2; gptexp imports "
            "GPT-2-family models (model_type gpt2) only"
        )
    features = unsupported_features(config)
    if features:
        raise ConfigError(
            f"{key}: uses what gptexp's model does not compute, so it cannot be imported "
            f"exactly: {'; '.join(features)}"
        )
    weight_files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not weight_files:
        raise ConfigError(f"{key}: {path} has no weights (*.safetensors or pytorch_model*.bin)")
    try:
        fast = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{key}: no usable tokenizer in {path} ({str(error).splitlines()[0]}); save one "
            "with the model (tokenizer.save_pretrained)"
        ) from None
    if not getattr(fast, "is_fast", False):
        raise ConfigError(f"{key}: its tokenizer has no fast (tokenizers) version")
    tokenizer = from_hf_backend(fast.backend_tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(
            f"{key}: the embedding has {config.vocab_size} rows but the tokenizer "
            f"{tokenizer.vocab_size} tokens; gptexp needs them equal"
        )
    model_values = {
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "block_size": config.n_positions,
        "bias": True,  # GPT-2's layers always have biases
        "activation": ACTIVATION_FROM_HF[config.activation_function],
    }
    return HFSource(init_from, path, model_values, tokenizer, weight_files)


def explicit_model_keys(overrides: list[str]) -> set[str]:
    """The SOURCE_KEYS that the command line sets: ``model.<key>=...`` names one, a preset
    choice ``model=<name>`` the ones a preset sets (its whole shape)."""
    keys: set[str] = set()
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if key == "model":
            keys.update(PRESET_KEYS)
        elif key.startswith("model.") and key[len("model.") :] in SOURCE_KEYS:
            keys.add(key[len("model.") :])
    return keys


def resolve_init_from(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``cfg`` with the model shape and tokenizer kind of ``model.init_from``'s source, so the
    config the run stores rebuilds the real model. A value the command line sets that differs
    from the source's is refused, never silently replaced."""
    if cfg.model.init_from is None:
        return cfg
    source = open_source(cfg.model.init_from)
    explicit = explicit_model_keys(overrides)
    conflicts = [
        f"model.{key}={getattr(cfg.model, key)!r} (the source has {value!r})"
        for key, value in source.model_values.items()
        if key in explicit and getattr(cfg.model, key) != value
    ]
    names_tokenizer = any(
        item.partition("=")[0].lstrip("+") == "data.tokenizer" for item in overrides
    )
    if names_tokenizer and cfg.data.tokenizer != source.tokenizer.kind:
        conflicts.append(
            f"data.tokenizer={cfg.data.tokenizer!r} (the source's tokenizer is "
            f"{source.tokenizer.kind!r})"
        )
    if conflicts:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from!r} decides the model's shape and tokenizer; "
            f"these overrides conflict with it (drop them): {'; '.join(conflicts)}"
        )
    # A local directory is recorded absolute, so resume works from any working directory.
    location = str(source.path) if Path(source.name).expanduser().is_dir() else source.name
    model = dataclasses.replace(cfg.model, **source.model_values, init_from=location)
    data = dataclasses.replace(cfg.data, tokenizer=source.tokenizer.kind)
    return dataclasses.replace(cfg, model=model, data=data)


@dataclass
class ImportedModel:
    tokenizer: Tokenizer
    state_dict: dict[str, torch.Tensor]  # gptexp names
    record: dict[str, Any]  # what run.json records: source and the weights' sha256


def weights_sha256(files: list[Path]) -> str:
    """sha256 of the weight files' bytes, concatenated in name order."""
    sha = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()


def import_source(model_cfg: ModelConfig) -> ImportedModel:
    """Tokenizer and weights of ``model_cfg.init_from`` for a model of shape ``model_cfg``
    (which :func:`resolve_init_from` took from the same source)."""
    assert model_cfg.init_from is not None
    source = open_source(model_cfg.init_from)
    differs = {
        key: (getattr(model_cfg, key), value)
        for key, value in source.model_values.items()
        if getattr(model_cfg, key) != value
    }
    if differs:
        lines = ", ".join(f"model.{k}: run {a!r}, source {b!r}" for k, (a, b) in differs.items())
        raise ConfigError(
            f"model.init_from={model_cfg.init_from!r}: the source's shape differs from this "
            f"run's model config ({lines}); was the source directory changed?"
        )
    transformers = require_transformers("model.init_from")
    from safetensors import SafetensorError

    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(source.path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ConfigError(
            f"model.init_from={model_cfg.init_from!r}: its weights do not load "
            f"({str(error).splitlines()[0]})"
        ) from None
    if not isinstance(hf_model, transformers.GPT2LMHeadModel):
        raise ConfigError(
            f"model.init_from={model_cfg.init_from!r}: loads as {type(hf_model).__name__}, "
            "not GPT2LMHeadModel"
        )
    # Upcasting a bf16 / fp16 checkpoint to fp32 is exact.
    state = from_hf_state_dict(hf_model.float().state_dict(), model_cfg.n_layer)
    record = {
        "source": source.name,
        "path": str(source.path),
        "weights": [path.name for path in source.weight_files],
        "sha256": weights_sha256(source.weight_files),
    }
    return ImportedModel(source.tokenizer, state, record)
