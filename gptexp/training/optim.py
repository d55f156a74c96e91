"""The optimizer and the learning-rate schedule of a run.

AdamW is the fused one on every device: its ``found_inf`` path is how the spike guard masks an
update on the device (gptexp.training.device_guard). On a CPU it is also ~4x faster than the
foreach one it replaced, and its weight-decayed updates differ from it in the last bit (its
kernel orders the arithmetic otherwise): a CPU run of this version is exact against itself, not
bit-equal to one of a version before it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch.optim.adam import adam as functional_adam

from gptexp.core.config import TrainingConfig
from gptexp.model.gpt import GPT


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of ``cfg.lr`` for update ``step + 1`` (a pure function of the step; every
    schedule is written here): linear warm-up over the first ``warmup_steps`` updates, then

    - ``cosine``: cosine decay to ``min_lr`` at ``max_steps`` (and ``min_lr`` after it);
    - ``constant``: ``lr`` to the end;
    - ``wsd`` (warm-up, stable, decay): ``lr`` up to update ``max_steps - decay_steps``, then
      the last ``decay_steps`` updates step linearly down to ``min_lr``: update
      ``max_steps - decay_steps + k`` trains at ``lr - k / decay_steps * (lr - min_lr)``, so
      the first decayed update is one step below ``lr`` and update ``max_steps`` (and any
      after it) trains at ``min_lr``. Up to update ``max_steps - decay_steps`` it equals
      ``constant``: a cooldown fork of a constant run is the wsd run planned from the start.
      Warm-up comes first where the two overlap.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "wsd":
        decayed = step + 1 - (cfg.max_steps - cfg.decay_steps)  # updates into the decay
        if decayed <= 0:
            return 1.0
        progress = min(1.0, decayed / cfg.decay_steps)
        return (cfg.min_lr + (1.0 - progress) * (cfg.lr - cfg.min_lr)) / cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)) / cfg.lr


def build_optimizer(model: GPT, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    return AdamW(
        model.optimizer_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=True,
    )


# torch.optim marks these functions "never compile" with torch._disable_dynamo, whose first
# call imports torch._dynamo only to build that marker.
OPTIMIZER_FUNCTIONS_MARKED_FOR_DYNAMO = (
    torch.optim.Optimizer.add_param_group,
    torch.optim.Optimizer.zero_grad,
    torch.optim.Optimizer.state_dict,
    torch.optim.Optimizer.load_state_dict,
    functional_adam,  # AdamW's update
)
DYNAMO_DISABLE_ATTRIBUTE = "__dynamo_disable"  # a string: inside a class, Python mangles the name
# Adam.step without torch's decorators (the grad-mode switch, which imports torch._dynamo on
# every call to break a compiled caller's graph, and the profiler hook that Optimizer adds).
ADAM_STEP = inspect.unwrap(torch.optim.Adam.step)


class AdamW(torch.optim.AdamW):
    """torch's AdamW (its update, state and state_dict), without importing torch._dynamo.

    torch.optim marks the optimizer's functions for the compiler, and its step imports
    torch._dynamo to do so: with sympy and FSDP that is 1.2-1.5 s on a 2-core EPYC, a third of
    a run's start-up. The marks matter only where compiled code calls the optimizer; gptexp
    compiles the model alone and steps the optimizer outside it, so a run imports the
    compiler only when it compiles. On a torch laid out otherwise the lookups below find
    nothing to change and the import costs its time, nothing else.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for marked in OPTIMIZER_FUNCTIONS_MARKED_FOR_DYNAMO:
            # torch keeps the marked version of a function in the original's __dynamo_disable,
            # made on its first call; the original itself is what it runs outside compiled code.
            original = getattr(marked, "__wrapped__", None)
            if original is not None and not hasattr(original, DYNAMO_DISABLE_ATTRIBUTE):
                setattr(original, DYNAMO_DISABLE_ATTRIBUTE, original)
        super().__init__(*args, **kwargs)

    def step(self, closure: Any = None) -> Any:
        # The grad mode that torch's step decorator sets (no graph while updating).
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return ADAM_STEP(self, closure)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    # The lambda reads ``cfg`` when called, so a resumed run's new max_steps applies.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def lr_table(
    scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainingConfig, device: torch.device
) -> torch.Tensor:
    """Each param group's lr at every schedule step 0..max_steps (groups x steps), the
    scheduler's own product ``base_lr * lr_factor(step)``, on ``device``: the lr of an update
    the host cannot know (the spike guard may have skipped updates since the host last read).
    float64 where the fused AdamW kernel reads a tensor lr as a double (CPU: the same update as
    the float lr); its CUDA kernel reads a float32 one, the lr rounded to float32."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    steps = range(cfg.max_steps + 1)
    rows = [[base * lr_factor(step, cfg) for step in steps] for base in scheduler.base_lrs]
    return torch.tensor(rows, dtype=dtype, device=device)


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule at ``step`` (its own rule sets every group's lr, as ``step()`` does)."""
    scheduler.last_epoch = step - 1
    scheduler.step()


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (everything but its parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


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
