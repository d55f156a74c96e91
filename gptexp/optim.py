"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math
from typing import Any

import torch

from gptexp.config import TrainingConfig
from gptexp.model import GPT


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of ``cfg.lr`` for update ``step + 1``: linear warm-up over ``warmup_steps``,
    then cosine decay to ``min_lr`` at ``max_steps`` (and ``min_lr`` after it)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)) / cfg.lr


def build_optimizer(model: GPT, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.optimizer_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    # The lambda reads ``cfg`` when called, so a resumed run's new max_steps applies.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def apply_configured_hyperparameters(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    configured: list[dict[str, Any]],
    cfg: TrainingConfig,
) -> None:
    """After loading a checkpoint's optimizer and schedule: the hyperparameters come from the
    config (``configured``: the param groups as built from it), not from the checkpoint. With
    an unchanged config every value equals the loaded one (``lr * lr_factor(step)`` is the
    same product), so resume stays bit-exact; the next scheduler step recomputes the lr from
    ``base_lrs``."""
    scheduler.base_lrs = [group["initial_lr"] for group in configured]
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
        group["lr"] = group["initial_lr"] * lr_factor(scheduler.last_epoch, cfg)
