"""A decoder-only GPT in the nanoGPT family.

Pre-LayerNorm transformer blocks with causal self-attention through
``F.scaled_dot_product_attention``, a GELU MLP, dropout, optional biases, input and output
embeddings tied, and GPT-2's initialisation. Shapes: B batch, T time, C channels (n_embd),
H heads, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptexp.core.config import ModelConfig

LAYER_NORM_EPS = 1e-5  # GPT-2's too; gptexp.model.hf refuses a source with another


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class KVCache:
    """Keys and values of the positions a generation has seen, per layer, each (B, H, P, C/H).

    ``generate`` fills it with one forward pass over the prompt, then feeds one token per step:
    a step attends to the cached positions instead of recomputing them.
    """

    def __init__(self, n_layer: int) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].size(2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, H, T, C/H): each head attends over its own slice of the channels
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        past = cache.layers[layer] if cache is not None else None
        mask = None
        if past is not None:
            P = past[0].size(2)
            k = torch.cat((past[0], k), dim=2)  # (B, H, P+T, C/H)
            v = torch.cat((past[1], v), dim=2)
            # New query i sees the P cached positions and new positions 0..i; one new query
            # (a decoding step) sees everything, so it needs no mask at all.
            if T > 1:
                mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        if cache is not None:
            cache.layers[layer] = (k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=past is None,
        )  # (B, H, T, C/H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.proj_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        # GPT-2's own weights were trained with the tanh approximation of GELU.
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x), approximate=self.approximate)  # (B, T, 4C)
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)  # pre-LN residual branches
        x = x + self.mlp(self.ln_2(x))
        return x


# Below this many parameters a generation step's matrices are too small to split between
# threads: each of its ~15 ops per layer would wait for the other threads (a few microseconds
# on an idle machine, a scheduler time slice on a busy one), for less work than that.
ONE_THREAD_GENERATION_PARAMETERS = 10_000_000


@contextmanager
def generation_threads(model: nn.Module) -> Iterator[None]:
    """Generate a small model on one CPU thread (the thread count is restored after)."""
    small = sum(p.numel() for p in model.parameters()) < ONE_THREAD_GENERATION_PARAMETERS
    on_cpu = next(model.parameters()).device.type == "cpu"
    previous = torch.get_num_threads()
    if not (small and on_cpu) or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)  # token embedding, tied to lm_head
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned positions
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017)

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out of the non-embedding count.

        The token embedding is tied to the output layer, so it counts as a weight of the
        model in both counts (as in nanoGPT).
        """
        total = sum(p.numel() for p in self.parameters())
        return total - self.wpe.weight.numel() if non_embedding else total

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, given targets, the loss. With a ``cache``, ``idx`` continues
        the positions already cached (and they are added to it)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if self.cfg.block_size < start + T:
            raise ValueError(
                f"sequence length {start + T} exceeds model.block_size={self.cfg.block_size}"
            )
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decay; biases, norms and position embeddings do not."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 and name != "wpe.weight" else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens.

        ``temperature`` 0 means greedy decoding. A ``generator`` makes sampling reproducible
        independently of the global RNG.

        A KV cache makes each new token one position of work: the prompt is run once, then
        each step feeds only the last token. Once the sequence is longer than
        ``block_size``, the window slides and every position changes, so from there each
        step recomputes the cropped context, as without a cache (the results are the same).
        """
        with generation_threads(self):
            return self._generate(idx, max_new_tokens, temperature, top_k, generator)

    def _generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if cache is not None and cache.length == T - 1 and self.cfg.block_size >= T:
                logits, _ = self(idx[:, -1:], cache=cache)  # one new position
            else:  # the prompt, or a window that slid: (re)compute the cropped context
                context = idx[:, -self.cfg.block_size :]  # crop to the positions the model knows
                cache = KVCache(len(self.blocks)) if self.cfg.block_size > T else None
                logits, _ = self(context, cache=cache)
            logits = logits[:, -1, :].float()  # (B, V) at the last position
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)  # (B, T+1)
        return idx
