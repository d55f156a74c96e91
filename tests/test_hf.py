"""Hugging Face interop against the real ``transformers``: ``export format=hf`` loads as a
GPT-2 model that computes what the run computes (logits, greedy generation, tokenizer, eval
loss), and ``model.init_from`` starts a run from a ``save_pretrained`` directory exactly."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import gptexp.eval
import gptexp.export
import gptexp.train
from gptexp.checkpoint.stored import load_run_checkpoint, rebuild_model, reload_corpus
from gptexp.core.config import ModelConfig
from gptexp.core.errors import ConfigError
from gptexp.core.fsio import sha256_file
from gptexp.data.batches import sample_batch
from gptexp.data.sources import python_docs_text
from gptexp.data.tokenizers import CharTokenizer
from gptexp.model.gpt import GPT
from gptexp.model.hf import ExportInfo, import_source, open_source, resolve_init_from, save_hf
from gptexp.observe.rundir import RunDirectory
from tests.conftest import (
    FAST,
    call_main,
    compose_config,
    files_of,
    read_metrics,
    run_module,
    subprocess_env,
)

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
# The FAST settings without the model preset: with model.init_from the source decides the shape.
FAST_NO_MODEL = [item for item in FAST if not item.startswith("model=")]


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch, tmp_path):
    """No test here may reach the network or a real Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def offline_env() -> dict[str, str]:
    return subprocess_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def export_hf(run_dir: Path, *args: str) -> Path:
    code, stderr = call_main(gptexp.export.main, f"run={run_dir}", "format=hf", *args)
    assert code == 0, stderr
    return run_dir / "export" / "last-hf"


class Exported:
    """A run, its last checkpoint rebuilt by gptexp, and its format=hf export."""

    def __init__(self, run_dir: Path) -> None:
        self.run = run_dir
        self.out = export_hf(run_dir)
        self.state = load_run_checkpoint(RunDirectory(run_dir), "last").state
        self.rebuilt = rebuild_model(self.state)
        self.corpus = reload_corpus(self.rebuilt, self.state["data_fingerprint"])
        self.hf_model = transformers.AutoModelForCausalLM.from_pretrained(self.out).eval()
        self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(self.out)

    def val_batch(self, batch_size: int = 4) -> torch.Tensor:
        block = self.rebuilt.model_cfg.block_size
        x, _ = sample_batch(self.corpus.val, block, batch_size, seed=0, split="val", step=0)
        return x  # (B, T)


@pytest.fixture(scope="module")
def char_export(finished_run: Path, tmp_path_factory) -> Exported:
    """The shared finished run (char tokenizer, no biases), copied and exported."""
    run_dir = tmp_path_factory.mktemp("hf_char") / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns("eval", "export"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return Exported(run_dir)


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory) -> Exported:
    """A BPE run with biases and a 128-token context (room for 100 generated tokens)."""
    base = tmp_path_factory.mktemp("hf_bpe")
    run_dir = base / "run"
    overrides = ["model.block_size=128", "model.bias=true", "data.tokenizer=bpe"]
    done = run_module(
        "gptexp.train", *FAST, *overrides, f"hydra.run.dir={run_dir}", cwd=base, env=offline_env()
    )
    assert done.returncode == 0, done.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return Exported(run_dir)


@pytest.fixture(params=["char", "bpe"])
def exported(request) -> Exported:
    return request.getfixturevalue(f"{request.param}_export")


# ----------------------------------------------------------------------------- export


def test_export_writes_a_transformers_gpt2_directory(char_export: Exported) -> None:
    out = char_export.out
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    shape = char_export.rebuilt.model_cfg
    assert config["model_type"] == "gpt2"
    assert config["activation_function"] == "gelu"  # erf GELU, as gptexp computes it
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (
        shape.n_layer,
        shape.n_head,
        shape.n_embd,
        shape.block_size,
    )
    assert config["vocab_size"] == char_export.rebuilt.tokenizer.vocab_size
    assert config["tie_word_embeddings"] is True
    assert isinstance(char_export.hf_model, transformers.GPT2LMHeadModel)
    assert char_export.hf_model.lm_head.weight is char_export.hf_model.transformer.wte.weight

    logged = [r["val/loss"] for r in read_metrics(char_export.run) if r["step"] == 20]
    with safe_open(out / "model.safetensors", framework="pt") as weights:
        metadata = weights.metadata()
        names = set(weights.keys())
        # model.bias=false: the biases transformers expects are there, and zero.
        assert not weights.get_tensor("transformer.h.0.attn.c_attn.bias").any()
    assert "lm_head.weight" not in names  # tied: stored once
    assert metadata["gptexp.run"] == str(char_export.run)
    assert metadata["gptexp.step"] == "20"
    assert metadata["gptexp.data_fingerprint"] == char_export.state["data_fingerprint"]
    assert float(metadata["gptexp.val_loss"]) == logged[0]
    assert json.loads(metadata["gptexp.config"])["model"]["n_layer"] == shape.n_layer
    card = (out / "README.md").read_text()
    for fact in (str(char_export.run), "step 20", char_export.state["data_fingerprint"]):
        assert fact in card
    assert f"{logged[0]:.4f}" in card


def test_logits_equal_gptexp_logits(exported: Exported) -> None:
    x = exported.val_batch()
    with torch.no_grad():
        ours, _ = exported.rebuilt.model(x)
        theirs = exported.hf_model(x).logits
    assert theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_tokenizer_encodes_and_decodes_like_gptexp(exported: Exported) -> None:
    text = python_docs_text()
    val_text = text[int(len(text) * 0.9) :]  # the run's validation text
    ours = exported.rebuilt.tokenizer
    ids = exported.hf_tokenizer.encode(val_text)
    assert ids == ours.encode(val_text)
    assert exported.hf_tokenizer.decode(ids) == val_text == ours.decode(ids)


def test_eval_loss_equals_gptexp_eval(exported: Exported) -> None:
    code, stderr = call_main(gptexp.eval.main, f"run={exported.run}", "samples=0")
    assert code == 0, stderr
    record = json.loads((exported.run / "eval" / "last.json").read_text())
    losses = []
    for step in range(record["batches"]):
        x, y = sample_batch(
            exported.corpus.val,
            record["block_size"],
            record["batch_size"],
            seed=record["seed"],
            split="val",
            step=step,
        )
        with torch.no_grad():
            logits = exported.hf_model(x).logits
        # transformers' own causal-LM loss, given the already shifted targets.
        loss = exported.hf_model.loss_function(
            logits, None, vocab_size=exported.hf_model.config.vocab_size, shift_labels=y
        )
        losses.append(loss.item())
    assert abs(sum(losses) / len(losses) - record["loss"]) <= TOLERANCE


def test_greedy_generation_is_identical(bpe_export: Exported) -> None:
    prompt = bpe_export.val_batch(batch_size=1)[:, :20]  # (1, 20)
    ours = bpe_export.rebuilt.model.generate(prompt, 100, temperature=0)
    with torch.no_grad():
        theirs = bpe_export.hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=100, do_sample=False
        )
    assert theirs.shape == (1, 120)
    assert theirs.tolist() == ours.tolist()


def test_export_prints_no_progress_bar(char_export: Exported, tmp_path: Path) -> None:
    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh process, whatever ran before
    try:
        code, stderr = call_main(
            gptexp.export.main, f"run={char_export.run}", "format=hf", f"out={tmp_path / 'hf'}"
        )
        assert hf_logging.is_progress_bar_enabled()  # the caller's setting is left as it was
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
    assert code == 0, stderr
    assert "Loading weights" not in stderr and "it/s" not in stderr, stderr


def test_generate_on_an_export_does_not_warn(char_export: Exported) -> None:
    """The exported generation_config.json holds nothing transformers warns about, whether
    the caller gives a length or not."""
    complaints: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = complaints.append  # type: ignore[method-assign]
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    prompt = char_export.val_batch(batch_size=1)[:, :8]  # (1, 8)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            model = transformers.AutoModelForCausalLM.from_pretrained(char_export.out)
            default = model.generate(prompt, attention_mask=torch.ones_like(prompt))
            chosen = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5
            )
    finally:
        transformers_logger.removeHandler(handler)
    assert [str(w.message) for w in warned] == []
    assert [record.getMessage() for record in complaints] == []
    block = char_export.rebuilt.model_cfg.block_size
    assert default.shape == (1, 8 + block // 2) and chosen.shape == (1, 13)


def test_char_tokenizer_exports_with_identical_encode_and_decode(tmp_path: Path) -> None:
    text = "Tabs\tand  spaces,\nCRLF\r\nline ends, ünïcödé, 漢字 and 🙂 emoji.\n\n"
    tokenizer = CharTokenizer.train(text)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8), tokenizer.vocab_size)
    info = ExportInfo("run", "step_0000001.pt", 1, {}, None, None)
    save_hf(model, tokenizer, tmp_path, info)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for sample in (text, text[::-1], "🙂🙂 \n"):
        ids = loaded.encode(sample)
        assert ids == tokenizer.encode(sample)
        assert loaded.decode(ids) == sample


def test_tanh_gelu_exports_as_the_same_function(tmp_path: Path) -> None:
    tokenizer = CharTokenizer.train("abcdefgh \n")
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**cfg.__dict__, "activation": "gelu_tanh"}), tokenizer.vocab_size)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)  # large pre-activations, where the two GELUs part
    exact = GPT(cfg, tokenizer.vocab_size)
    exact.load_state_dict(model.state_dict())
    save_hf(model, tokenizer, tmp_path, ExportInfo("run", "step_0000001.pt", 1, {}, None, None))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == "gelu_pytorch_tanh"
    ids = torch.randint(
        0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf_logits(tmp_path, ids)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert (exact(ids)[0] - theirs).abs().max().item() > TOLERANCE  # the activation matters


def test_export_without_transformers_names_the_extra(finished_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns("eval", "export"))
    before = files_of(run_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)  # import transformers fails
        code, stderr = call_main(gptexp.export.main, f"run={run_dir}", "format=hf")
        with pytest.raises(ConfigError, match=r'model.init_from needs .* "gptexp\[hf\]"'):
            resolve_init_from(compose_config([f"model.init_from={tmp_path}"]), [])
    assert code == 2
    assert 'format=hf needs the Hugging Face extra: pip install "gptexp[hf]"' in stderr
    assert files_of(run_dir) == before


# ----------------------------------------------------------------------------- import

SOURCE_TEXT_CHARS = 60_000


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_text") / "corpus.txt"
    path.write_text(python_docs_text()[:SOURCE_TEXT_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, corpus_file: Path) -> Path:
    """What ``save_pretrained`` writes for a small random GPT-2 (GPT-2's tanh GELU, every
    parameter random, biases and LayerNorms included) and its byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [corpus_file.read_text()], vocab_size=400, special_tokens=["<|endoftext|>"]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        bos_token_id=eot,
        eos_token_id=eot,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    directory = tmp_path_factory.mktemp("hf_source") / "tiny-gpt2"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(ids).logits


def test_init_from_baseline_then_export_round_trip(
    gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = run_module(
        "gptexp.train",
        *FAST_NO_MODEL,
        f"model.init_from={gpt2_dir}",
        "training.max_steps=0",
        "data=text",
        f"data.path={corpus_file}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=offline_env(),
    )
    assert done.returncode == 0, done.stderr

    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 0
    assert status["init_from"]["source"] == str(gpt2_dir)
    assert status["init_from"]["sha256"] == sha256_file(gpt2_dir / "model.safetensors")
    model_cfg = status["config"]["model"]
    # The stored config holds the source's real shape; GPT-2's gelu_new is the tanh GELU.
    assert {k: model_cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == {
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 32,
        "block_size": 64,
    }
    assert (model_cfg["bias"], model_cfg["activation"]) == (True, "gelu_tanh")
    assert status["config"]["data"]["tokenizer"] == "bpe"
    assert [r["step"] for r in read_metrics(run_dir) if "val/loss" in r] == [0]
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert [entry["step"] for entry in manifest["checkpoints"]] == [0]

    out = export_hf(run_dir)
    assert json.loads((out / "config.json").read_text())["activation_function"] == (
        "gelu_pytorch_tanh"
    )
    source_tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = corpus_file.read_text()[-2000:]
    ids = source_tokenizer.encode(text)
    assert exported_tokenizer.encode(text) == ids
    assert exported_tokenizer.eos_token == "<|endoftext|>"
    batch = torch.tensor([ids[:64], ids[64:128]])  # (2, 64)
    difference = (hf_logits(out, batch) - hf_logits(gpt2_dir, batch)).abs().max().item()
    assert difference <= TOLERANCE

    # Fine-tuning continues from the step-0 checkpoint (the source is not imported again).
    done = run_module(
        "gptexp.resume", f"run={run_dir}", "training.max_steps=2", cwd=tmp_path, env=offline_env()
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert [entry["step"] for entry in manifest["checkpoints"]] == [0, 2]
    assert [r["step"] for r in read_metrics(run_dir) if "val/loss" in r] == [0, 2]  # no repeat
    tuned = load_run_checkpoint(RunDirectory(run_dir), "last").state["model"]
    imported = load_run_checkpoint(RunDirectory(run_dir), "0").state["model"]
    assert not torch.equal(tuned["blocks.0.mlp.fc.weight"], imported["blocks.0.mlp.fc.weight"])


def test_a_gptexp_export_imports_back_exactly(char_export: Exported) -> None:
    source = open_source(str(char_export.out))
    assert isinstance(source.tokenizer, CharTokenizer)  # bits per character again, not per byte
    assert source.tokenizer.chars == char_export.rebuilt.tokenizer.chars
    model_cfg = ModelConfig(**source.model_values, init_from=str(char_export.out))
    assert (model_cfg.bias, model_cfg.activation) == (True, "gelu")  # zero biases, now trainable
    model = GPT(model_cfg, source.tokenizer.vocab_size)
    model.load_state_dict(import_source(model_cfg).state_dict)
    x = char_export.val_batch()
    with torch.no_grad():
        difference = (model.eval()(x)[0] - char_export.rebuilt.model(x)[0]).abs().max().item()
    assert difference <= TOLERANCE


def test_conflicting_model_override_is_refused(gpt2_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, stderr = call_main(
        gptexp.train.main,
        *FAST_NO_MODEL,
        f"model.init_from={gpt2_dir}",
        "model.n_layer=3",
        "model.bias=true",  # the same as the source: no conflict
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )  # HF_HUB_OFFLINE: this module's autouse fixture
    assert code == 2
    assert "model.n_layer=3 (the source has 2)" in stderr
    assert "model.bias" not in stderr
    assert not run_dir.exists()


def test_a_model_preset_conflicts_with_the_source(gpt2_dir: Path) -> None:
    overrides = ["model=nano", f"model.init_from={gpt2_dir}"]
    with pytest.raises(ConfigError) as error:
        resolve_init_from(compose_config(overrides), overrides)
    # nano's n_layer=2 agrees with the source; the rest of its shape does not.
    assert "model.n_head=2 (the source has 4); model.n_embd=64 (the source has 32)" in str(
        error.value
    )
    assert "model.n_layer" not in str(error.value)


def edited_copy(gpt2_dir: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(gpt2_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | changes))
    return copy


@pytest.mark.parametrize(
    ("changes", "feature"),
    [
        ({"tie_word_embeddings": False}, "untied output layer"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=true"),
        ({"add_cross_attention": True}, "cross-attention"),
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"model_type": "gpt_neo"}, "model_type 'gpt_neo' is not GPT-2"),
    ],
)
def test_features_gptexp_lacks_are_refused_by_name(
    gpt2_dir: Path, tmp_path: Path, changes: dict, feature: str
) -> None:
    source = edited_copy(gpt2_dir, tmp_path, **changes)
    with pytest.raises(ConfigError, match="cannot be imported exactly|is not GPT-2") as error:
        open_source(str(source))
    assert feature in str(error.value)


def test_damaged_source_weights_are_a_clear_error(gpt2_dir: Path, tmp_path: Path) -> None:
    source = edited_copy(gpt2_dir, tmp_path)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # cut short
    model_cfg = ModelConfig(**open_source(str(source)).model_values, init_from=str(source))
    with pytest.raises(ConfigError, match="its weights do not load"):
        import_source(model_cfg)


def test_init_from_that_cannot_be_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        open_source(str(tmp_path / "missing"))
    # A hub name takes the hub's path; offline, with nothing cached, it says so.
    with pytest.raises(ConfigError, match="not a local directory, and the Hugging Face Hub"):
        open_source("gptexp-test/no-such-model")


def test_max_steps_zero_needs_init_from() -> None:
    with pytest.raises(ConfigError, match=r"training.max_steps=0: .*needs model.init_from"):
        compose_config(["training.max_steps=0"])
