"""The training loop: steps, evaluation, logging, the checkpoint policy and signals.

A step is one optimizer update. ``step`` counts completed updates: the checkpoint of step s
holds the state after s updates, and resuming from it continues with update s + 1 on exactly
the batches and random numbers the uninterrupted run would have used.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptexp.checkpoint import FORMAT_VERSION, CheckpointError, CheckpointManager
from gptexp.compile_policy import should_compile
from gptexp.config import ConfigError, TrainConfig, TrainingConfig, config_to_dict
from gptexp.data import Corpus, DataError, prepare_corpus, sample_batch, tokenizer_from_json
from gptexp.loggers import MetricsFile, WandbMirror
from gptexp.model import GPT
from gptexp.process_tuning import keep_freed_memory
from gptexp.run import (
    FAILED,
    FILE_ONLY,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    RunDirectory,
    RunError,
    environment,
    now,
    start_git_commit,
)

log = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, DataError, CheckpointError, RunError)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving; the run is resumable."""

    def __init__(self, signame: str, step: int) -> None:
        super().__init__(f"stopped by {signame} at step {step}; resume with make resume")
        self.signame = signame
        self.step = step


# ----------------------------------------------------------------------------- environment


@dataclass
class Distributed:
    """Rank and world size; one process is rank 0 of a world of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device='cuda': no CUDA device is available here")
        return torch.device("cuda", local_rank)
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("training.device='mps': no MPS device is available here")
    return torch.device(requested)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(device: torch.device, precision: str) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"training.precision='fp16': needs a CUDA device (have {device.type})")


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of ``cfg.lr`` for update ``step + 1``: linear warm-up, then cosine decay
    to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)) / cfg.lr


@torch.no_grad()
def evaluate_loss(
    model: GPT,
    tokens: torch.Tensor,
    *,
    block_size: int,
    batch_size: int,
    seed: int,
    split: str,
    batches: int,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """Mean loss of ``model`` over the fixed evaluation batches 0..batches-1 of ``split``.

    The trainer's ``val/loss`` and ``python -m gptexp.eval`` both come from here, so the same
    checkpoint gives the same number in both.
    """
    was_training = model.training
    model.eval()
    losses = []
    for i in range(batches):
        x, y = sample_batch(tokens, block_size, batch_size, seed=seed, split=split, step=i)
        with autocast_context(device, precision):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a step can touch, as plain data that ``weights_only`` loading accepts."""
    version, mt_state, gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npy["key"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- signals


class StopRequest:
    """The first SIGINT/SIGTERM/SIGUSR1 asks the loop to stop after the current step; a second
    SIGINT or SIGTERM gets the default behaviour (abort at once)."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signame = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and saving a checkpoint", self.signame)
        # The next Ctrl-C or SIGTERM aborts at once; atomic writes keep the disk consistent.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal; plain log lines (every ``log_every`` steps) elsewhere.

    Only rank 0 reports; ``bar=False`` keeps the plain lines even on a terminal.
    """

    def __init__(self, shown: bool, bar: bool, start: int, total: int) -> None:
        self.shown = shown
        self.bar = None
        if shown and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.start_time = time.perf_counter()
        self.start_step = start
        self.total = total

    @property
    def is_bar(self) -> bool:
        return self.bar is not None

    def update(self, step: int, postfix: dict[str, str]) -> None:
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        fields = " | ".join(f"{k} {v}" for k, v in postfix.items())
        # With a bar on the terminal the line goes to train.log only.
        log.info(
            "step %d/%d | %s | eta %s",
            step,
            self.total,
            fields,
            _duration(eta),
            extra={FILE_ONLY: self.bar is not None},
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds model, optimizer and schedule for a run directory and trains to max_steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        run: RunDirectory,
        dist_ctx: Distributed,
        resume_state: dict[str, Any] | None = None,
        wandb_group: str | None = None,
        wandb_name: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.dist = dist_ctx
        t = cfg.training
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.deterministic != torch.are_deterministic_algorithms_enabled():
            # Only on a change: the call imports torch's compiler stack (about 1 s of start-up).
            torch.use_deterministic_algorithms(t.deterministic)
        self.device = resolve_device(t.device, dist_ctx.local_rank)
        if self.device.type == "cpu":
            keep_freed_memory()  # no fresh page faults for each step's activations
        check_precision(self.device, t.precision)

        # Data: a resumed run reuses its own tokenizer, never a retrained one.
        tokenizer = None
        if resume_state is not None:
            tokenizer = tokenizer_from_json(resume_state["tokenizer"])
        elif run.tokenizer.is_file():
            tokenizer = tokenizer_from_json(run.tokenizer.read_text(encoding="utf-8"))
        self.corpus: Corpus = prepare_corpus(cfg.data, cfg.model.block_size, tokenizer)
        if resume_state is not None and resume_state["data_fingerprint"] != self.corpus.fingerprint:
            raise DataError(
                f"the text of data.name={cfg.data.name!r} differs from the one this run was "
                "trained on (sha256 mismatch); resume it with the same data"
            )

        seed_everything(t.seed + dist_ctx.rank)
        self.model = GPT(cfg.model, self.corpus.tokenizer.vocab_size).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.optimizer_groups(t.weight_decay),
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.cfg.training)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.checkpoints = CheckpointManager(run.checkpoints, cfg.checkpoint)
        self.step = 0
        self.tokens_seen = 0
        self.best_metric: float | None = None
        self.wandb_id = uuid.uuid4().hex[:12]
        if resume_state is not None:
            self._load_state(resume_state)

        self.forward_model: torch.nn.Module = self.model
        if should_compile(t, self.step):  # training.compile=auto|true|false
            self.forward_model = torch.compile(self.model)
        if dist_ctx.enabled:
            self.forward_model = DistributedDataParallel(
                self.forward_model,
                device_ids=[dist_ctx.local_rank] if self.device.type == "cuda" else None,
            )
        self.autocast = autocast_context(self.device, t.precision)
        self.metrics = MetricsFile(run.metrics) if dist_ctx.is_main else None
        self.wandb: WandbMirror | None = None
        self.wandb_group, self.wandb_name = wandb_group, wandb_name
        self.stop = StopRequest()
        self.last_val_loss: float | None = None
        self.last_train_loss: float | None = None
        self.tokens_per_s: list[float] = []

    # -- state

    def state_dict(self, metric: float | None) -> dict[str, Any]:
        rng = capture_rng_state()
        if self.dist.enabled:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_per_rank = gathered
        else:
            rng_per_rank = [rng]
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_metric": self.best_metric,
            "metric": metric,
            "monitor": self.cfg.checkpoint.monitor,
            "rng": rng_per_rank,
            "config": config_to_dict(self.cfg),
            "tokenizer": self.corpus.tokenizer.to_json(),
            "data_fingerprint": self.corpus.fingerprint,
            "vocab_size": self.corpus.tokenizer.vocab_size,
            "wandb_id": self.wandb_id,
            "world_size": self.dist.world_size,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_metric = state["best_metric"]
        self.wandb_id = state["wandb_id"]
        saved_world = int(state["world_size"])
        if saved_world == self.dist.world_size:
            restore_rng_state(state["rng"][self.dist.rank])
        else:
            log.warning(
                "checkpoint was written by %d processes, resuming with %d: training continues "
                "correctly but is no longer bit-identical to an uninterrupted run",
                saved_world,
                self.dist.world_size,
            )
            restore_rng_state(state["rng"][self.dist.rank % saved_world])

    # -- evaluation

    def evaluate(self, split: str = "val") -> float:
        """Mean loss over the fixed evaluation batches of ``split``."""
        tokens = self.corpus.val if split == "val" else self.corpus.train
        t = self.cfg.training
        return evaluate_loss(
            self.model,
            tokens,
            block_size=self.cfg.model.block_size,
            batch_size=t.batch_size,
            seed=t.seed,
            split=split,
            batches=t.eval_batches,
            device=self.device,
            precision=t.precision,
        )

    def write_sample(self) -> None:
        """Append a short generated text to samples.txt (its own RNG: training's is untouched)."""
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.training.seed)
        start = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.model.eval()
        with self.autocast:
            ids = self.model.generate(
                start,
                self.cfg.training.sample_tokens,
                temperature=0.8,
                top_k=50,
                generator=generator,
            )
        self.model.train()
        text = self.corpus.tokenizer.decode(ids[0, 1:].tolist())
        with open(self.run.samples, "a", encoding="utf-8") as f:
            f.write(f"=== step {self.step}\n{text}\n\n")

    # -- one update

    def train_step(self) -> tuple[float, float]:
        """One optimizer update over ``grad_accum`` micro-batches; returns (loss, grad norm)."""
        t = self.cfg.training
        total = 0.0
        for micro in range(t.grad_accum):
            x, y = sample_batch(
                self.corpus.train,
                self.cfg.model.block_size,
                t.batch_size,
                seed=t.seed,
                split="train",
                step=self.step,
                rank=self.dist.rank,
                micro=micro,
            )
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == t.grad_accum - 1
            # DDP all-reduces gradients only on the last micro-batch of the update.
            sync = (
                contextlib.nullcontext()
                if last or not self.dist.enabled
                else (self.forward_model.no_sync())
            )
            with sync:
                with self.autocast:
                    _, loss = self.forward_model(x, y)
                self.scaler.scale(loss / t.grad_accum).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip).item()
            if t.grad_clip > 0
            else 0.0
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += (
            t.batch_size * self.cfg.model.block_size * t.grad_accum * (self.dist.world_size)
        )
        return total / t.grad_accum, grad_norm

    def _mean_across_ranks(self, value: float) -> float:
        if not self.dist.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.dist.world_size

    def _stop_requested(self) -> bool:
        local = self.stop.signame is not None
        if not self.dist.enabled:
            return local
        flag = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() and self.stop.signame is None:
            self.stop.signame = "SIGTERM (another rank)"
        return bool(flag.item())

    # -- logging

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        self.metrics.log(record)
        if self.wandb is not None:
            self.wandb.log(record)

    # -- the loop

    def fit(self) -> float | None:
        """Train to ``max_steps``; returns the last validation loss (what sweepers minimise)."""
        t, ck = self.cfg.training, self.cfg.checkpoint
        if self.dist.is_main:
            self.run.tokenizer.write_text(self.corpus.tokenizer.to_json(), encoding="utf-8")
            if self.cfg.logger.wandb:
                self.wandb = WandbMirror(
                    self.cfg.logger,
                    self.run.path,
                    self.wandb_id,
                    config_to_dict(self.cfg),
                    name=self.wandb_name or self.run.path.name,
                    group=self.wandb_group,
                )
                self.run.update_status(wandb_id=self.wandb_id, wandb_mode=self.wandb.mode)
        n_params = self.model.num_parameters()
        log.info(
            "model: %.2fM parameters (non-embedding), vocab %d, device %s, %s",
            n_params / 1e6,
            self.corpus.tokenizer.vocab_size,
            self.device,
            t.precision,
        )
        if self.dist.is_main:
            self.run.update_status(parameters=n_params, vocab_size=self.corpus.tokenizer.vocab_size)
        if self.step == 0 and t.eval_every:
            self.last_val_loss = self.evaluate()
            self.log_metrics({"step": 0, "val/loss": self.last_val_loss})
            log.info("step 0: val/loss %.4f", self.last_val_loss)

        if ck.on_signal:
            self.stop.install()
        progress = Progress(self.dist.is_main, t.progress, self.step, t.max_steps)
        # Throughput counts the time of the updates (and checkpoint stalls), not evaluation.
        window_seconds, window_tokens = 0.0, 0
        if self.step >= t.max_steps:
            log.info("step %d already reaches training.max_steps=%d", self.step, t.max_steps)
        try:
            while self.step < t.max_steps:
                if self._stop_requested():
                    self._save_on_signal()
                started = time.perf_counter()
                loss, grad_norm = self.train_step()
                window_seconds += time.perf_counter() - started
                window_tokens += t.batch_size * self.cfg.model.block_size * t.grad_accum
                final = self.step == t.max_steps
                record: dict[str, Any] = {"step": self.step}
                if self.step % t.log_every == 0 or final:
                    tokens_per_s = window_tokens * self.dist.world_size / max(window_seconds, 1e-9)
                    self.tokens_per_s.append(tokens_per_s)
                    window_seconds, window_tokens = 0.0, 0
                    self.last_train_loss = self._mean_across_ranks(loss)
                    record |= {
                        "train/loss": self.last_train_loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens": self.tokens_seen,
                        "throughput/tokens_per_s": tokens_per_s,
                    }
                evaluated = final or (t.eval_every and self.step % t.eval_every == 0)
                if evaluated:
                    self.last_val_loss = self.evaluate()
                    record["val/loss"] = self.last_val_loss
                if len(record) > 1:
                    self.log_metrics(record)
                if self.dist.is_main and (
                    final or (t.sample_every and self.step % t.sample_every == 0)
                ):
                    self.write_sample()

                metric = None
                if evaluated:
                    metric = self.last_val_loss if ck.monitor == "val/loss" else loss
                    if math.isfinite(metric) and (
                        self.best_metric is None
                        or self.checkpoints.is_better(metric, self.best_metric)
                    ):
                        self.best_metric = metric
                if math.isnan(loss):
                    raise FloatingPointError(f"train/loss is NaN at step {self.step}")
                started = time.perf_counter()
                self._maybe_save(metric, final)
                window_seconds += time.perf_counter() - started

                if "train/loss" in record or evaluated:
                    postfix = {"loss": f"{loss:.4f}"}
                    if self.last_val_loss is not None:
                        postfix["val"] = f"{self.last_val_loss:.4f}"
                    if self.tokens_per_s:
                        postfix["tok/s"] = f"{self.tokens_per_s[-1]:,.0f}"
                    progress.update(self.step, postfix)
            self.checkpoints.wait()
        finally:
            progress.close()
            self.stop.uninstall()
        return self.last_val_loss

    def _maybe_save(self, metric: float | None, final: bool) -> None:
        # Periodic, milestone and final saves depend on the step alone, so every rank decides
        # them itself; "best" ranks against the manifest, which rank 0 alone reads, so at an
        # evaluation rank 0's decision is broadcast (every rank joins the RNG gather).
        reasons = self.checkpoints.wants(self.step, metric if self.dist.is_main else None, final)
        if self.dist.enabled and metric is not None:
            box = [reasons]
            dist.broadcast_object_list(box, src=0)
            reasons = box[0]
        if not reasons:
            return
        state = self.state_dict(metric)
        if self.dist.is_main:
            self.checkpoints.save(state, self.step, metric, reasons)

    def _save_on_signal(self) -> None:
        if self.cfg.checkpoint.enabled:
            state = self.state_dict(None)
            if self.dist.is_main:
                self.checkpoints.save(state, self.step, None, ["signal"], asynchronous=False)
                log.warning("saved checkpoint at step %d", self.step)
        raise TrainingInterrupted(self.stop.signame or "signal", self.step)

    def close(self, status: str) -> None:
        # Drop the DDP wrapper before the process group is destroyed: a reducer that outlives
        # it can abort the process at exit ("terminate called without an active exception").
        self.forward_model = self.model
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.summary(self.summary())
            self.wandb.finish(exit_code=0 if status == FINISHED else 1)

    def summary(self) -> dict[str, Any]:
        speeds = sorted(self.tokens_per_s[1:] or self.tokens_per_s)
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "parameters": self.model.num_parameters(),
            "best/" + self.cfg.checkpoint.monitor: self.best_metric,
            "final/val_loss": self.last_val_loss,
            "final/train_loss": self.last_train_loss,
            "throughput/tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
        }


# ----------------------------------------------------------------------------- one run


def init_distributed(dist_ctx: Distributed, device_kind: str) -> None:
    if dist_ctx.enabled and not dist.is_initialized():
        backend = (
            "nccl" if device_kind in ("cuda", "auto") and torch.cuda.is_available() else "gloo"
        )
        dist.init_process_group(backend=backend)


def shutdown_distributed(dist_ctx: Distributed) -> None:
    if dist_ctx.enabled and dist.is_initialized():
        gc.collect()  # a DDP wrapper caught in a reference cycle is freed now, not at exit
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()


def run_training(
    cfg: TrainConfig,
    run: RunDirectory,
    *,
    resume: bool,
    resume_note: dict[str, Any] | None = None,
    wandb_group: str | None = None,
    wandb_name: str | None = None,
) -> float | None:
    """Train (or resume) the run in ``run``: lock, status, checkpoints, logs.

    Raises the user errors of :data:`USER_ERRORS` before any write when the input is bad,
    TrainingInterrupted after a clean stop on a signal.
    """
    dist_ctx = Distributed.from_env()
    init_distributed(dist_ctx, cfg.training.device)
    if dist_ctx.is_main:
        start_git_commit()  # in the background: run.json collects it, the first step does not
    status = FAILED
    lock = run.lock() if dist_ctx.is_main else contextlib.nullcontext()
    try:
        with lock:
            found = _latest_checkpoint(run, cfg) if resume else None
            trainer = Trainer(
                cfg, run, dist_ctx, found[1] if found else None, wandb_group, wandb_name
            )
            if dist_ctx.is_main:
                # Validation passed: from here on the run directory is written to.
                if resume:
                    _rewind_metrics(run, found[0].step if found else None)
                _start_status(run, cfg, trainer, dist_ctx, resume, resume_note)
            log.info("run directory: %s", run.path)
            try:
                result = trainer.fit()
                status = FINISHED
                log.info(
                    "finished at step %d: val/loss %s; evaluate with: python -m gptexp.eval run=%s",
                    trainer.step,
                    "n/a" if result is None else f"{result:.4f}",
                    run.path,
                )
                return result
            except (TrainingInterrupted, KeyboardInterrupt):
                status = INTERRUPTED
                raise
            finally:
                if dist_ctx.is_main:
                    fields: dict[str, Any] = {
                        "status": status,
                        "ended": now(),
                        "step": trainer.step,
                    }
                    fields |= {k: v for k, v in trainer.summary().items() if v is not None}
                    run.update_status(**fields)
                trainer.close(status)
    finally:
        shutdown_distributed(dist_ctx)


def _latest_checkpoint(run: RunDirectory, cfg: TrainConfig):
    """(entry, state) of the newest valid checkpoint, or None (training restarts at 0)."""
    found = CheckpointManager(run.checkpoints, cfg.checkpoint).load_latest_valid()
    if found is None:
        log.warning("%s has no valid checkpoint: training restarts from step 0", run.path)
    else:
        log.info("resuming from %s (step %d)", found[0].file, found[0].step)
    return found


def _rewind_metrics(run: RunDirectory, step: int | None) -> None:
    """Drop the records logged after the checkpoint: they will be logged again, identically."""
    dropped = MetricsFile(run.metrics).rewind(-1 if step is None else step)
    if dropped:
        log.info("metrics.jsonl: dropped %d records logged after step %s", dropped, step)


def _start_status(run, cfg, trainer, dist_ctx, resume, resume_note) -> None:
    previous = run.read_status()
    fields: dict[str, Any] = {
        "status": RUNNING,
        "experiment": cfg.experiment,
        "seed": cfg.training.seed,
        "world_size": dist_ctx.world_size,
        "data_fingerprint": trainer.corpus.fingerprint,
        "wandb_id": trainer.wandb_id,
        "wandb_group": trainer.wandb_group,
        "wandb_name": trainer.wandb_name,
        "max_steps": cfg.training.max_steps,
        "config": config_to_dict(cfg),
        "ended": None,
        **environment(),
    }
    if not previous.get("started"):
        fields["started"] = now()
    if resume:
        resumes = previous.get("resumes", [])
        resumes.append({"at": now(), "from_step": trainer.step, **(resume_note or {})})
        fields["resumes"] = resumes
    run.update_status(**fields)
    if cfg.checkpoint.enabled:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        trainer.checkpoints.remove_stale_temporaries()
