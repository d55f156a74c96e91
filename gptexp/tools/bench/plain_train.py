"""The ~300-line script a user would otherwise write (nanoGPT's ``train.py`` is the model),
cut to the work the bench compares: read the text, tokenize it by character, build the model,
train with AdamW on random windows, evaluate once, exit. It imports nothing of gptexp.

    python gptexp/tools/bench/plain_train.py --data input.txt --steps 150 --threads 2

It trains what ``python -m gptexp.train data=text data.path=input.txt`` trains with the same
sizes: the same initialisation (same module order, same seed), the same batches (the same
numpy draw per step) and schedule, so its losses equal the trainer's. With ``--timings PATH``
it writes the wall-clock instants (``time.time()``) of its phases as JSON, for the bench.

On a GPU (``--device cuda --dtype bf16 [--compile] --log-every 10``, what ``make gpu-check``
runs next to gptexp) it does what nanoGPT's ``train.py`` does there: bf16 autocast, fused
AdamW, TF32 matmuls, batches copied from pinned memory without waiting, and the loss read back
only on the steps it logs (every step by default, as on a CPU).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any heavy import: the phases are measured from here

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMPORTED = time.time()


class LayerNorm(nn.Module):
    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.proj_dropout = nn.Dropout(0.0)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.proj_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def get_batch(data, block: int, batch: int, seed: int, split: int, step: int):
    # The windows gptexp draws: a training step's global batch (data order 2, one process),
    # or evaluation batch ``step`` of the validation split.
    rng = np.random.default_rng([2, seed, split, step] if split == 0 else [seed, split, step, 0, 0])
    starts = torch.from_numpy(rng.integers(0, len(data) - block, size=batch))
    windows = data.unfold(0, block + 1, 1)[starts]  # (B, T+1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--log-every", type=int, default=1, help="read the loss back every n steps")
    p.add_argument("--timings", help="write the phases' wall-clock instants here (JSON)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    )
    marks = {"started": STARTED, "imported": IMPORTED}

    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    train = torch.tensor([stoi[c] for c in text[:cut]], dtype=torch.long)
    val = torch.tensor([stoi[c] for c in text[cut:]], dtype=torch.long)
    marks["data"] = time.time()

    torch.manual_seed(args.seed)
    model = GPT(len(chars), args.n_layer, args.n_head, args.n_embd, args.block_size).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "wpe.weight"]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "wpe.weight"]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), fused=cuda or None)
    forward = torch.compile(model) if args.compile else model
    marks["model"] = time.time()

    def to_device(batch):
        if not cuda:
            return batch
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)

    losses, logged, step_ends = [], [], []
    for step in range(args.steps):
        if step < args.warmup:  # linear warm-up, then cosine decay to min_lr
            factor = (step + 1) / args.warmup
        else:
            progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            factor = (args.min_lr + cosine * (args.lr - args.min_lr)) / args.lr
        lr = args.lr * factor
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = to_device(get_batch(train, args.block_size, args.batch_size, args.seed, 0, step))
        with autocast:
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            losses.append(loss.item())  # the host waits for the step here, and only here
            logged.append(step + 1)
        step_ends.append(time.time())

    model.eval()
    with torch.no_grad(), autocast:
        val_losses = [
            model(*to_device(get_batch(val, args.block_size, args.batch_size, args.seed, 1, i)))
            .float()
            .item()
            for i in range(args.eval_batches)
        ]
    val_loss = sum(val_losses) / len(val_losses)
    marks["evaluated"] = time.time()
    print(f"step {args.steps}: train loss {losses[-1]:.4f}, val loss {val_loss:.4f}")
    if args.timings:
        with open(args.timings, "w") as f:
            json.dump(
                {
                    "marks": marks,
                    "step_ends": step_ends,
                    "losses": losses,
                    "logged_steps": logged,
                    "val_loss": val_loss,
                },
                f,
            )


if __name__ == "__main__":
    main()
