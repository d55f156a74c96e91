"""The GPT: shapes, causality, initialisation, learning, weight tying, generation, size."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from gptexp.core.config import ModelConfig
from gptexp.model.gpt import GPT
from tests.conftest import compose_config

VOCAB = 103  # the size of the default corpus' character vocabulary


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models are faster on one thread, and the machine is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _composed_model(option: str) -> ModelConfig:
    return compose_config([f"model={option}"]).model


def nano(**changes) -> ModelConfig:
    """conf/model/nano.yaml, with ``changes``."""
    return dataclasses.replace(_composed_model("nano"), **changes)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(nano(), VOCAB).eval()


def test_logits_have_shape_batch_time_vocab(model):
    idx = torch.randint(0, VOCAB, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, VOCAB)
    assert loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, VOCAB)
    assert loss.shape == () and torch.isfinite(loss)


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, model.cfg.block_size + 1), dtype=torch.long))


@pytest.mark.parametrize("bias", [False, True])
def test_future_tokens_never_change_past_logits(bias):
    torch.manual_seed(0)
    model = GPT(nano(bias=bias), VOCAB).eval()
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 40), generator=generator)
    reference, _ = model(idx)
    for t in (0, 7, 20, 38):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(
            0, VOCAB, changed[:, t + 1 :].shape, generator=generator
        )
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1])
        # ...while the future positions do see the change (the test could fail).
        assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])


@pytest.mark.parametrize("vocab", [65, 103, 512])
def test_initial_loss_is_about_log_vocab(vocab):
    torch.manual_seed(0)
    model = GPT(nano(), vocab).eval()
    idx = torch.randint(0, vocab, (8, 64))
    targets = torch.randint(0, vocab, (8, 64))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(vocab), abs=0.1)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(nano(), VOCAB)
    x = torch.randint(0, VOCAB, (4, 32))
    y = torch.randint(0, VOCAB, (4, 32))
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = loss.item() if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert first > 4.0
    assert loss.item() < 0.3


def test_input_and_output_embeddings_are_tied(model):
    assert model.lm_head.weight is model.wte.weight
    # One tensor in the state dict's storage, and trained once by the optimizer.
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["wte.weight"].data_ptr()
    groups = model.optimizer_groups(0.1)
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_optimizer_groups_exempt_biases_and_norms_from_decay():
    model = GPT(nano(bias=True), VOCAB)
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & exempt
    assert decayed | exempt == set(names.values())
    for name in exempt:
        assert (
            name.endswith("bias")
            or ".ln_" in name
            or name.startswith("ln_f")
            or name == "wpe.weight"
        )
    assert {"wte.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc.weight"} <= decayed
    assert {"blocks.0.ln_1.weight", "blocks.0.attn.qkv.bias", "ln_f.bias"} <= exempt
    assert all(p.dim() >= 2 for p in decay["params"])


# ----------------------------------------------------------------------------- generate


def test_generate_appends_max_new_tokens_beyond_the_block(model):
    start = torch.zeros((2, 3), dtype=torch.long)
    out = model.generate(start, model.cfg.block_size + 5, temperature=1.0)
    assert out.shape == (2, 3 + model.cfg.block_size + 5)
    assert torch.equal(out[:, :3], start)
    assert out.min() >= 0 and out.max() < VOCAB


def test_generate_with_temperature_zero_is_greedy_and_deterministic(model):
    start = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    first = model.generate(start, 12, temperature=0)
    torch.manual_seed(123)  # the global RNG plays no part in greedy decoding
    assert torch.equal(model.generate(start, 12, temperature=0), first)
    # Each new token is the argmax of the model's logits for the text so far.
    for t in range(5, first.size(1)):
        logits, _ = model(first[:, :t])
        assert torch.equal(first[:, t], logits[:, -1].argmax(dim=-1))
    # top_k=1 sampling is greedy decoding too, whatever the temperature.
    assert torch.equal(model.generate(start, 12, temperature=1.5, top_k=1), first)


def test_generate_with_a_generator_is_reproducible(model):
    start = torch.zeros((1, 1), dtype=torch.long)
    a = model.generate(start, 30, generator=torch.Generator().manual_seed(7))
    b = model.generate(start, 30, generator=torch.Generator().manual_seed(7))
    c = model.generate(start, 30, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_top_k_samples_only_among_the_k_likeliest(model):
    start = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    logits, _ = model(start)
    top3 = set(logits[0, -1].topk(3).indices.tolist())
    many = start.repeat(400, 1)
    out = model.generate(many, 1, temperature=2.0, top_k=3, generator=torch.Generator())
    drawn = set(out[:, -1].tolist())
    assert drawn <= top3
    assert len(drawn) > 1  # it samples, it is not greedy
    unrestricted = model.generate(many, 1, temperature=2.0, generator=torch.Generator())
    assert len(set(unrestricted[:, -1].tolist())) > 3


def _uncached_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """The reference: every step runs the model over the whole cropped context."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.cfg.block_size :])
        logits = logits[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_token), dim=1)
    return idx


@pytest.fixture
def sharp_model() -> GPT:
    """A random nano model with large weights: its logits are far apart, so the argmax is not
    decided by rounding (a freshly initialised model predicts nearly uniform logits)."""
    torch.manual_seed(1)
    model = GPT(nano(), VOCAB).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("prompt", [1, 7])
def test_generate_with_the_kv_cache_is_greedy_decoding_token_for_token(sharp_model, prompt):
    """Through the prompt, the cached steps and past block_size (where the window slides)."""
    block = sharp_model.cfg.block_size
    start = torch.randint(0, VOCAB, (2, prompt), generator=torch.Generator().manual_seed(5))
    steps = block + 10 - prompt  # ends 10 tokens beyond the block
    cached = sharp_model.generate(start, steps, temperature=0)
    assert torch.equal(cached, _uncached_generate(sharp_model, start, steps, temperature=0))
    # A distinct greedy sequence: the comparison is not between two constant outputs.
    assert len(set(cached[0].tolist())) > 3


def test_generate_cached_step_logits_match_a_full_forward(sharp_model):
    """Prefill, then single-token steps: the last position's logits equal the uncached ones."""
    from gptexp.model.gpt import KVCache

    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    cache = KVCache(len(sharp_model.blocks))
    sharp_model(idx[:, :5], cache=cache)
    for t in range(5, 9):
        step_logits, _ = sharp_model(idx[:, t : t + 1], cache=cache)
        full_logits, _ = sharp_model(idx[:, : t + 1])
        torch.testing.assert_close(step_logits[:, -1], full_logits[:, -1], rtol=1e-4, atol=1e-5)
    assert cache.length == 9
    # Several new positions at once after a prefix use the offset causal mask.
    cache = KVCache(len(sharp_model.blocks))
    sharp_model(idx[:, :4], cache=cache)
    chunk_logits, _ = sharp_model(idx[:, 4:], cache=cache)
    full_logits, _ = sharp_model(idx)
    torch.testing.assert_close(chunk_logits, full_logits[:, 4:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds model.block_size"):
        sharp_model(torch.zeros((2, sharp_model.cfg.block_size), dtype=torch.long), cache=cache)


def test_generate_sampling_with_the_kv_cache_is_seeded(sharp_model):
    start = torch.zeros((1, 1), dtype=torch.long)
    steps = sharp_model.cfg.block_size + 4
    a = sharp_model.generate(
        start, steps, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(2)
    )
    b = sharp_model.generate(
        start, steps, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a, b)
    # Where the cached and uncached logits agree, the same seed draws the same tokens.
    reference = _uncached_generate(
        sharp_model,
        start,
        steps,
        temperature=0.8,
        top_k=5,
        generator=torch.Generator().manual_seed(2),
    )
    assert torch.equal(a, reference)


def test_generate_runs_a_small_model_on_one_thread_and_restores_the_count(sharp_model):
    seen = []
    sharp_model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)  # the autouse fixture restores the count after the test
    sharp_model.generate(torch.zeros((1, 1), dtype=torch.long), 5, temperature=0)
    assert seen == [1] * 5
    assert torch.get_num_threads() == 2


# ----------------------------------------------------------------------------- size


def _count(model_option: str, vocab: int) -> int:
    cfg = _composed_model(model_option)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return GPT(cfg, vocab).num_parameters(non_embedding=False)


def test_model_small_has_about_ten_million_parameters():
    assert 9.5e6 < _count("small", 65) < 11.5e6


def test_model_gpt2_has_the_124m_parameters_of_gpt2_small():
    assert _count("gpt2", 50257) == pytest.approx(124.44e6, rel=0.005)


def test_model_tiny_has_under_a_million_parameters():
    assert 0.6e6 < _count("tiny", VOCAB) < 1.0e6
