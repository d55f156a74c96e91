"""The training loop: a step is one optimizer update, and ``fit`` reads as the sequence of what
happens around it (train, log, evaluate, sample, keep the best, save, report).

``step`` counts completed updates: the checkpoint of step s holds the state after s updates,
and resuming from it continues with update s + 1 on exactly the batches and random numbers the
uninterrupted run would have used.

Nothing is read back from the device in a step that neither logs, evaluates, samples nor
saves: losses and gradient norms stay on the device, where the spike guard decides each update
(gptexp.training.device_guard), and the host counts every attempt as applied. At a *sync step*
(one the host's count says logs, evaluates, samples, saves, ends the run, or a signal stops) it
reads the attempts since the last one at once (:meth:`Trainer.sync`), corrects its count to the
truth and records the guard's events at their exact steps.

The life of the run around the loop (lock, run.json, which checkpoint to resume, W&B) is
:mod:`gptexp.run.session`'s; what the trainer does when its spike guard refuses an update is
:mod:`gptexp.training.spikes`'.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptexp.checkpoint.format import CHECKPOINT_KEYS, FORMAT_VERSION
from gptexp.checkpoint.manager import run_checkpoints
from gptexp.core.config import TrainConfig, config_to_dict
from gptexp.core.errors import TrainingInterrupted
from gptexp.data.batches import train_batch
from gptexp.data.cache import cache_dir
from gptexp.data.corpus import Corpus
from gptexp.data.prefetch import Prefetcher
from gptexp.model.gpt import GPT
from gptexp.observe.metrics import (
    FINAL_TRAIN_LOSS,
    FINAL_VAL_LOSS,
    FINAL_VAL_LOSS_EMA,
    GRAD_NORM,
    LR,
    MEDIAN_TOKENS_PER_S,
    MFU,
    STEP,
    STEP_SECONDS,
    TOKENS,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_LOSS_EMA,
    best_metric_name,
    median_throughput,
)
from gptexp.observe.rundir import RunDirectory
from gptexp.training.compile_policy import compile_options, should_compile
from gptexp.training.device_guard import DeviceGuard, masked_step
from gptexp.training.ema import WeightAverage
from gptexp.training.guard import ROLLBACK, SKIP
from gptexp.training.mfu import (
    Peak,
    ThroughputWindow,
    flops_per_token,
    mfu,
    peak_for,
    precision_advice,
)
from gptexp.training.optim import (
    apply_configured_hyperparameters,
    build_optimizer,
    build_scheduler,
    hyperparameters,
    lr_table,
    set_schedule_step,
)
from gptexp.training.parallel import (
    is_named_layout,
    keep_global_batch,
    load_named_state,
    named_state,
    refuse_positional_state,
    say_world_change,
    shard_model,
    uses_named_state,
)
from gptexp.training.progress import Progress, plural
from gptexp.training.runtime import (
    Distributed,
    StopRequest,
    autocast_context,
    capture_rng_state,
    check_precision,
    resolve_device,
    restore_rng_state,
    seed_everything,
)
from gptexp.training.scoring import evaluate_loss, generate_text
from gptexp.training.speed import keep_freed_memory
from gptexp.training.spikes import SpikeResponse
from gptexp.training.state import TrainState

log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...


class Attempt(NamedTuple):
    """An update not yet read back: its batch index and, on the device, (this rank's loss,
    the loss's mean across ranks, gradient norm, the norm the guard judged, masked)."""

    batch: int
    record: torch.Tensor


class Logged(NamedTuple):
    """The last applied update's figures, read back: what a logged step reports."""

    own_loss: float  # this rank's (the monitored metric when checkpoint.monitor=train/loss)
    loss: float  # the mean across ranks: train/loss
    grad_norm: float


class Trainer(SpikeResponse):
    """Model, optimizer and schedule of one run, and the loop that trains them to max_steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        run: RunDirectory,
        dist_ctx: Distributed,
        corpus: Corpus,
        resume_state: dict[str, Any] | None = None,
        sinks: Sequence[MetricsSink] = (),
        init_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.dist = dist_ctx
        self.corpus = corpus
        self.sinks = list(sinks)
        t = cfg.training
        self.device = resolve_device(t.device, dist_ctx.local_rank)
        if self.device.type == "cpu":
            keep_freed_memory()  # no fresh page faults for each step's activations
        check_precision(self.device, t.precision)
        advice = precision_advice(self.device, t.precision)
        if advice is not None and dist_ctx.is_main:
            log.warning(advice)

        seed_everything(t.seed + dist_ctx.rank)
        self.model = GPT(cfg.model, corpus.tokenizer.vocab_size)
        if init_weights is not None:  # a model imported from elsewhere (model.init_from)
            self.model.load_state_dict(init_weights)
        self.model.to(self.device)
        # FSDP: shard before the optimizer is built, so that it holds the shards.
        self.sharded = t.parallel == "fsdp" and dist_ctx.enabled
        if self.sharded:
            shard_model(self.model)
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.scheduler = build_scheduler(self.optimizer, t)
        # After sharding: the average of a sharded model is sharded like its weights.
        self.ema = WeightAverage(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.checkpoints = run_checkpoints(run, cfg.checkpoint)
        self.state = TrainState.fresh(t.guard)  # a resumed run's is its checkpoint's
        self.device_guard = DeviceGuard(t.guard, self.device)
        self.batches = Prefetcher(self._make_batch, t.grad_accum, self.device)
        self.pending: list[Attempt] = []  # attempts not yet read back (see sync)
        self.window_start = (0, 0, 0)  # (step, tokens_seen, schedule step) before them
        self._lr_table: torch.Tensor | None = None  # guard.action=skip: lr by schedule step
        self.last_update = Logged(math.nan, math.nan, math.nan)
        if resume_state is not None:
            self.load_state(resume_state)

        self.forward_model: torch.nn.Module = self.model
        if should_compile(t, self.state.step):  # training.compile=auto|true|false
            self.forward_model = torch.compile(self.model, **compile_options(t))
        if dist_ctx.enabled and not self.sharded:
            self.forward_model = DistributedDataParallel(
                self.forward_model,
                device_ids=[dist_ctx.local_rank] if self.device.type == "cuda" else None,
            )
        self.autocast = autocast_context(self.device, t.precision)
        self.stop = StopRequest()
        self.last_val_loss: float | None = None
        self.last_val_loss_ema: float | None = None  # where the run keeps an average
        self.last_train_loss: float | None = None
        self.tokens_per_s: list[float] = []
        self.window = ThroughputWindow()
        self._save_buffers_ready = False
        self.peak: Peak | None = None  # of the device, for throughput/mfu (rank 0, in fit)
        self.flops_per_token = flops_per_token(
            self.model.num_parameters(), cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size
        )

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.training
        return t.batch_size * self.cfg.model.block_size * t.grad_accum * self.dist.world_size

    # ------------------------------------------------------------------------- state

    def state_dict(self, metric: float | None) -> dict[str, Any]:
        """The checkpoint of this step (every rank takes part: RNG states are gathered)."""
        rng = capture_rng_state()
        if self.dist.enabled:
            rng_per_rank: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(rng_per_rank, rng)
        else:
            rng_per_rank = [rng]
        model_state, optimizer_state = self._model_optimizer_state()
        checkpoint = self.state.to_dict() | {
            "format_version": FORMAT_VERSION,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "metric": metric,
            "monitor": self.cfg.checkpoint.monitor,
            "rng": rng_per_rank,
            "config": config_to_dict(self.cfg),
            "tokenizer": self.corpus.tokenizer.to_json(),
            "data_fingerprint": self.corpus.fingerprint,
            "vocab_size": self.corpus.tokenizer.vocab_size,
            "world_size": self.dist.world_size,
        }
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict(
                full=self.cfg.checkpoint.format == "file",
                is_main=self.dist.is_main,
            )
        return {key: checkpoint[key] for key in CHECKPOINT_KEYS if key in checkpoint}

    def _model_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """FSDP or DCP: the named layout (gptexp.training.parallel), whole tensors for the file
        format, each rank's shards for DCP; otherwise the plain state dicts."""
        if uses_named_state(self.cfg):
            return named_state(
                self.model, self.optimizer, full=self.cfg.checkpoint.format == "file"
            )
        return self.model.state_dict(), self.optimizer.state_dict()

    def _load_model_optimizer(self, state: dict[str, Any]) -> None:
        if is_named_layout(state["optimizer"]):
            load_named_state(self.model, self.optimizer, state["model"], state["optimizer"])
            return
        refuse_positional_state(self.sharded)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def load_state(self, state: dict[str, Any]) -> None:
        """Carry on from a checkpoint: its tensors' states, its TrainState, its RNG."""
        train_state = TrainState.from_dict(state, self.cfg.training.guard)  # checked first
        # The loaded optimizer and schedule hold the hyperparameters of the run that saved
        # them; a resume or fork that overrides training.lr, beta1, weight_decay... must train
        # update step + 1 with the new ones (an unchanged config gives the same values).
        configured = hyperparameters(self.optimizer)
        self._load_model_optimizer(state)
        self.scheduler.load_state_dict(state["scheduler"])
        apply_configured_hyperparameters(
            self.optimizer, self.scheduler, configured, self.cfg.training
        )
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._load_average(state.get("ema"))
        self.state = train_state
        saved_world = int(state["world_size"])
        if self.state.data_order >= 2:
            saved = state["config"]["training"]
            keep_global_batch(self.cfg.training, saved, saved_world, self.dist.world_size)
        if saved_world != self.dist.world_size:
            say_world_change(saved_world, self.dist.world_size, self.state.data_order)
        restore_rng_state(state["rng"][self.dist.rank % saved_world])
        self._lr_table = None  # the configured base lrs, the schedule's max_steps
        # The data position and order are the checkpoint's, and on another world size
        # keep_global_batch may have changed grad_accum: nothing prefetched stands.
        self.batches = Prefetcher(self._make_batch, self.cfg.training.grad_accum, self.device)

    def _load_average(self, average: Any) -> None:
        """The checkpoint's average, where this run keeps one; one that the checkpoint lacks
        (training.ema_decay set on a resume or fork) starts from the loaded weights."""
        if self.ema is None:
            if average is not None and self.dist.is_main:
                log.info("the checkpoint's weight average is dropped (training.ema_decay=0)")
            return
        if average is None:
            if self.dist.is_main:
                log.info("the checkpoint holds no weight average: it starts from its weights")
            self.ema.load_from_weights()
            return
        self.ema.load_state_dict(average)

    def restart(self, parts: Collection[str], state: TrainState) -> None:
        """A fork's start (gptexp.run.forking): carry on from ``state``, with ``parts`` of what
        was loaded started again: ``optimizer`` a fresh AdamW, ``scheduler`` (and ``step``)
        the schedule at its step 0, ``rng`` every generator seeded from training.seed."""
        t = self.cfg.training
        configured = hyperparameters(self.optimizer)  # the config's (load_state)
        if "optimizer" in parts:
            self.optimizer = build_optimizer(self.model, t, self.device)
        if {"optimizer", "scheduler", "step"} & set(parts):
            loaded = self.scheduler.state_dict()
            self.scheduler = build_scheduler(self.optimizer, t)
            if not {"scheduler", "step"} & set(parts):  # a fresh AdamW, the same place
                self.scheduler.load_state_dict(loaded)
                apply_configured_hyperparameters(self.optimizer, self.scheduler, configured, t)
        if "rng" in parts:
            seed_everything(t.seed + self.dist.rank)
        self.state = state
        self._lr_table = None
        self.batches.discard()

    # ------------------------------------------------------------------------- one update

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One attempt at an optimizer update over ``grad_accum`` micro-batches; returns
        (loss, grad norm) as device tensors: nothing is read back.

        The update trains on the batch of index ``data_step`` (the next one the guard has not
        put on its skip list), which is used up whatever the guard decides. The guard decides
        on the device; a rejected update is masked there (no parameter, moment or count
        changes). Until :meth:`sync` reads the attempts back, ``step`` and ``tokens_seen``
        count this one as applied (the loop syncs after every attempt under
        ``training.guard.action=rollback``, whose action the host carries out)."""
        t = self.cfg.training
        if not self.pending:
            self._open_window()
        self.state.data_step = self.state.guard.next_batch(self.state.data_step)
        total = torch.zeros((), dtype=self.device_guard.dtype, device=self.device)
        for micro, (x, y) in enumerate(self.batches.take(self.state.data_step)):
            last = micro == t.grad_accum - 1
            with self._gradient_sync(last):
                with self.autocast:
                    _, loss = self.forward_model(x, y)
                self.scaler.scale(loss / t.grad_accum).backward()
            total = total + loss.detach().to(total.dtype)  # in order, as Python's sum was
        own_loss = total / t.grad_accum
        loss = self._mean_across_ranks(own_loss)
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm().to(total.dtype)
        lrs = None
        if t.guard.action == SKIP:  # the schedule step is the device's: skips do not count
            lrs = self.device_guard.learning_rates(self._learning_rates())
        masked, norm = self.device_guard.judge(loss, grad_norm, self.scaler.is_enabled())
        masked_step(self.optimizer, self.scaler, masked, lrs)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(applied=~masked)
        self.optimizer.zero_grad(set_to_none=True)
        record = torch.stack([own_loss, loss, grad_norm, norm, masked.to(total.dtype)])
        self.pending.append(Attempt(self.state.data_step, record))
        self.state.data_step += 1
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        # The next update's batches, built while the device works through this one's kernels
        # (on CUDA copied from pinned memory without waiting); a rollback or the guard's skip
        # list may move the index, and take() then builds the right ones.
        self.batches.prefetch(self.state.guard.next_batch(self.state.data_step))
        return own_loss, grad_norm

    def _make_batch(self, index: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``micro`` of the update that trains on batch ``index`` (this rank's)."""
        t = self.cfg.training
        return train_batch(
            self.state.data_order,
            self.corpus.train,
            self.cfg.model.block_size,
            t.batch_size,
            seed=t.seed,
            step=index,
            rank=self.dist.rank,
            micro=micro,
            grad_accum=t.grad_accum,
            world_size=self.dist.world_size,
        )

    def _grad_norm(self) -> torch.Tensor:
        """The gradients' total norm (clipped to ``grad_clip`` when it is set), a plain
        tensor on the device (under FSDP the shards' norms are combined: a DTensor's whole)."""
        t = self.cfg.training
        if t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
        full_tensor = getattr(norm, "full_tensor", None)  # a DTensor (FSDP2)
        return full_tensor() if full_tensor is not None else norm

    def _learning_rates(self) -> torch.Tensor:
        if self._lr_table is None:
            self._lr_table = lr_table(self.scheduler, self.cfg.training, self.device)
        return self._lr_table

    def _open_window(self) -> None:
        """The first attempt after a sync: the device guard starts from the host's."""
        self.window_start = (self.state.step, self.state.tokens_seen, self.scheduler.last_epoch)
        self.device_guard.load(self.state.guard, self.scheduler.last_epoch)

    def sync(self) -> bool:
        """Read back the attempts since the last sync (one read), and bring the host to the
        truth: ``step``, ``tokens_seen`` and the schedule count the applied updates only, the
        guard replays every decision and records each rejected update's event at its exact
        step and batch (or stops the run, TrainingDiverged, or rolls back). Returns whether
        the last attempt was applied (False: nothing to read)."""
        if not self.pending:
            return False
        attempts, self.pending = self.pending, []
        rows = torch.stack([a.record for a in attempts]).tolist()  # the one read
        self.state.step, self.state.tokens_seen, schedule_step = self.window_start
        rollbacks = self.state.guard.rollbacks
        applied = False
        for attempt, (own_loss, loss, grad_norm, norm, masked) in zip(attempts, rows, strict=True):
            self.state.data_step = attempt.batch
            applied = self._guard_admits(loss, norm, grad_norm, bool(masked))
            if self.state.guard.rollbacks != rollbacks:
                return False  # the checkpoint's state is the truth (one attempt: rollback syncs)
            if applied:
                self.state.data_step += 1
                self.state.step += 1
                self.state.tokens_seen += self.tokens_per_step
                schedule_step += 1
                self.last_update = Logged(own_loss, loss, grad_norm)
        if self.scheduler.last_epoch != schedule_step:  # skipped updates: the schedule waited
            set_schedule_step(self.scheduler, schedule_step)
        return applied

    # --------------------------------------------------------------- gradients, evaluation, samples

    def _gradient_sync(self, last: bool):
        """DDP all-reduces (FSDP reduce-scatters) gradients only on the last micro-batch."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def evaluate(self, split: str = "val") -> float:
        """Mean loss over the fixed evaluation batches of ``split``."""
        t = self.cfg.training
        return evaluate_loss(
            self.model,
            self.corpus.val if split == "val" else self.corpus.train,
            block_size=self.cfg.model.block_size,
            batch_size=t.batch_size,
            seed=t.seed,
            split=split,
            batches=t.eval_batches,
            device=self.device,
            precision=t.precision,
        )

    def write_sample(self) -> None:
        """Append a short generated text to samples.txt (its own RNG: training's is untouched).
        It starts from token 0, as ``python -m gptexp.eval`` does for an empty prompt.
        A sharded model generates on every rank (each forward gathers the shards); rank 0
        writes."""
        t = self.cfg.training
        (ids,) = generate_text(
            self.model,
            [0],
            1,
            t.sample_tokens,
            temperature=0.8,
            top_k=50,
            seed=t.seed,
            device=self.device,
            precision=t.precision,
        )
        if not self.dist.is_main:
            return
        with open(self.run.samples, "a", encoding="utf-8") as f:
            f.write(f"=== step {self.state.step}\n{self.corpus.tokenizer.decode(ids)}\n\n")

    # ------------------------------------------------------------------------- the loop

    def fit(self) -> float | None:
        """Train to ``max_steps``; returns the last validation loss (what sweepers minimise)."""
        t = self.cfg.training
        self._announce()
        if self.dist.is_main:  # MFU: the model's FLOPs per token against this device's peak
            self.peak = peak_for(self.device, t.precision, cache_dir())
            if self.peak.flops is None:
                log.info("throughput/mfu not logged: %s", self.peak.source)
        if (
            self.state.step == 0
            and not self.state.from_checkpoint
            and (t.eval_every or t.max_steps == 0)
        ):
            self.last_val_loss = self.evaluate()
            self._log({STEP: 0, VAL_LOSS: self.last_val_loss, **self._evaluate_average()})
            log.info("step 0: val/loss %.4f", self.last_val_loss)
            if t.max_steps == 0:
                return self._finish_at_step_zero()
        if self.state.step >= t.max_steps:
            log.info("step %d already reaches training.max_steps=%d", self.state.step, t.max_steps)
        progress = Progress(self.dist.is_main, t.progress, self.state.step, t.max_steps)
        if self.cfg.checkpoint.on_signal:
            self.stop.install()
        try:
            synced = True
            while self.state.step < t.max_steps:
                # Under torchrun the ranks agree on a stop at sync steps only (a collective
                # read); one process looks at its own flag before every update.
                if synced or not self.dist.enabled:
                    self._stop_if_requested()
                with self.window.timing(self.tokens_per_step, updates=1):
                    self.train_step()
                self._prepare_save_buffers()
                synced = self._sync_due(self.state.step)
                if not synced:
                    continue  # nothing is read back: the host counts the update as applied
                with self.window.timing():
                    if not self.sync():
                        continue  # the guard dropped the last update or rolled back
                final = self.state.step == t.max_steps
                record = self._train_record(self.last_update, final)
                metric = self._evaluate_if_due(record, self.last_update.own_loss, final)
                self._log(record)
                self._sample_if_due(final)
                self._track_best(metric)
                with self.window.timing():
                    self._save_if_due(metric, final)
                self._report(progress, record)
            self.checkpoints.wait()
        except BaseException:
            self._read_back_after_failure()
            raise
        finally:
            progress.close()
            self.stop.uninstall()
        return self.last_val_loss

    def _read_back_after_failure(self) -> None:
        """A failure between two reads (a crash, Ctrl-C without checkpoint.on_signal): the
        attempts not yet read back are read where the device still answers, so that what the
        run reports (run.json's step and tokens, the guard's events) is the truth, as when
        every step was read; the failure stays the one raised. Not under ``rollback``, which
        reads every step (its sync may wait for the other ranks)."""
        if not self.pending or self.cfg.training.guard.action == ROLLBACK:
            return
        with contextlib.suppress(Exception):  # a lost device; a halt in the window is logged
            self.sync()

    def _finish_at_step_zero(self) -> float | None:
        """training.max_steps=0 (only with model.init_from): the imported model's baseline,
        evaluated, sampled and checkpointed as step 0 (what fine-tuning is compared with)."""
        metric = self.last_val_loss if self.cfg.checkpoint.monitor == VAL_LOSS else None
        self._track_best(metric)
        self._sample_if_due(final=True)
        self._save_if_due(metric, final=True)
        self.checkpoints.wait()
        return self.last_val_loss

    def _announce(self) -> None:
        log.info(
            "model: %.2fM parameters (non-embedding), vocab %d, device %s, %s, %s",
            self.model.num_parameters() / 1e6,
            self.corpus.tokenizer.vocab_size,
            self.device,
            self.cfg.training.precision,
            plural(torch.get_num_threads(), "thread"),
        )

    def _sync_due(self, step: int) -> bool:
        """Whether the host reads the device back after the update the host counts as
        ``step``: it may log, evaluate, sample, save or end the run there (the step the host
        counts is never behind the true one, so no such step passes unread), and under
        ``rollback`` after every update. Every rank decides alike (they agree on a stop
        there)."""
        t = self.cfg.training
        final = step >= t.max_steps
        return (
            t.guard.action == ROLLBACK
            or self._logs(step, final)
            or self._evaluates(step, final)
            or self._samples(step, final)
            or bool(self.checkpoints.wants(step, None, final))
        )

    def _stop_if_requested(self) -> None:
        """Every rank stops at the same step: one rank's signal is everyone's. The attempts
        not yet read back are read first: the checkpoint is of the true step."""
        requested = self.stop.signame is not None
        if self.dist.enabled:
            flag = torch.tensor([int(requested)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())  # one read: at sync steps only (see fit)
            if requested:
                self.stop.mark_stopped_elsewhere()
        if not requested:
            return
        self.sync()
        if self.cfg.checkpoint.enabled:
            state = self.state_dict(None)
            if self.dist.is_main or self.checkpoints.collective:
                self.checkpoints.save(state, self.state.step, None, ["signal"], asynchronous=False)
            if self.dist.is_main:
                log.warning("saved checkpoint at step %d", self.state.step)
        raise TrainingInterrupted(
            self.stop.signame or "signal", self.state.step, str(self.run.path), self.dist.world_size
        )

    def _logs(self, step: int, final: bool) -> bool:
        return final or step % self.cfg.training.log_every == 0

    def _evaluates(self, step: int, final: bool) -> bool:
        every = self.cfg.training.eval_every
        return final or bool(every and step % every == 0)

    def _samples(self, step: int, final: bool) -> bool:
        every = self.cfg.training.sample_every
        return final or bool(every and step % every == 0)

    def _train_record(self, logged: Logged, final: bool) -> dict[str, Any]:
        """The step's record: training metrics on logging steps (and the last one)."""
        record: dict[str, Any] = {STEP: self.state.step}
        if not self._logs(self.state.step, final):
            return record
        tokens_per_s, step_seconds = self.window.take()
        self.tokens_per_s.append(tokens_per_s)
        self.last_train_loss = logged.loss
        if self.peak is not None and self.peak.flops is not None:
            record[MFU] = mfu(
                tokens_per_s, self.flops_per_token, self.peak.flops, self.dist.world_size
            )
        return record | {
            TRAIN_LOSS: self.last_train_loss,
            LR: self.scheduler.get_last_lr()[0],
            GRAD_NORM: logged.grad_norm,
            TOKENS: self.state.tokens_seen,
            TOKENS_PER_S: tokens_per_s,
            STEP_SECONDS: step_seconds,
        }

    def _evaluate_if_due(self, record: dict[str, Any], loss: float, final: bool) -> float | None:
        """Evaluate at eval_every and at the last step; returns the monitored metric then."""
        if not self._evaluates(self.state.step, final):
            return None
        self.last_val_loss = record[VAL_LOSS] = self.evaluate()
        record.update(self._evaluate_average())
        return self.last_val_loss if self.cfg.checkpoint.monitor == VAL_LOSS else loss

    def _evaluate_average(self) -> dict[str, float]:
        """``val/loss_ema``: the weight average evaluated in the model's place (its weights
        back bit for bit after), where the run keeps one."""
        if self.ema is None:
            return {}
        with self.ema.swapped_in():
            self.last_val_loss_ema = self.evaluate()
        return {VAL_LOSS_EMA: self.last_val_loss_ema}

    def _sample_if_due(self, final: bool) -> None:
        if (self.dist.is_main or self.sharded) and self._samples(self.state.step, final):
            self.write_sample()

    def _track_best(self, metric: float | None) -> None:
        if metric is None or not math.isfinite(metric):
            return
        if self.state.best_metric is None or self.checkpoints.is_better(
            metric, self.state.best_metric
        ):
            self.state.best_metric = metric

    def _prepare_save_buffers(self) -> None:
        """Once the optimizer has its state (after a run's first update), allocate what an
        asynchronous save copies into: the first save then stalls for a copy only."""
        if self._save_buffers_ready or not self.dist.is_main or not self.optimizer.state:
            return
        if uses_named_state(self.cfg):  # FSDP or DCP: not the plain state dicts below
            return
        self._save_buffers_ready = True
        if self.cfg.checkpoint.enabled and self.cfg.checkpoint.async_save:
            average = {"ema": self.ema.state_dict(full=True, is_main=True)} if self.ema else {}
            self.checkpoints.prepare(
                {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
                | average
            )

    def _save_if_due(self, metric: float | None, final: bool) -> None:
        # Periodic, milestone and final saves depend on the step alone, so every rank decides
        # them itself; "best" ranks against the manifest, which rank 0 alone reads, so at an
        # evaluation rank 0's decision is broadcast (every rank joins the RNG gather).
        reasons = self.checkpoints.wants(
            self.state.step, metric if self.dist.is_main else None, final
        )
        if metric is not None:
            reasons = self.dist.broadcast(reasons)
        if not reasons:
            return
        state = self.state_dict(metric)
        if self.dist.is_main or self.checkpoints.collective:  # DCP: every rank writes shards
            self.checkpoints.save(state, self.state.step, metric, reasons)

    def _report(self, progress: Progress, record: dict[str, Any]) -> None:
        """The progress line shows what metrics.jsonl holds: under torchrun the loss is the
        mean across ranks (``_train_record``), never this rank's own."""
        if TRAIN_LOSS not in record and VAL_LOSS not in record:
            return
        postfix = {"loss": f"{record[TRAIN_LOSS]:.4f}"} if TRAIN_LOSS in record else {}
        if self.last_val_loss is not None:
            postfix["val"] = f"{self.last_val_loss:.4f}"
        if self.tokens_per_s:
            postfix["tok/s"] = f"{self.tokens_per_s[-1]:,.0f}"
        progress.update(self.state.step, postfix)

    def _log(self, record: dict[str, Any]) -> None:
        if len(record) > 1 and self.dist.is_main:
            for sink in self.sinks:
                sink.log(record)

    def _mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a 0-d float64 tensor across ranks, on the device (no read)."""
        if not self.dist.enabled:
            return value
        tensor = value.reshape(1).clone()
        dist.all_reduce(tensor)
        return tensor.reshape(()) / self.dist.world_size

    # ------------------------------------------------------------------------- the end

    def summary(self) -> dict[str, Any]:
        """The run's figures for run.json and the W&B summary (one spelling each)."""
        return {
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "parameters": self.model.num_parameters(),
            best_metric_name(self.cfg.checkpoint.monitor): self.state.best_metric,
            FINAL_VAL_LOSS: self.last_val_loss,
            FINAL_VAL_LOSS_EMA: self.last_val_loss_ema,
            FINAL_TRAIN_LOSS: self.last_train_loss,
            MEDIAN_TOKENS_PER_S: median_throughput(self.tokens_per_s),
            "guard": self.state.guard.report(),
        }

    def release(self) -> None:
        # Drop the DDP wrapper before the process group is destroyed: a reducer that outlives
        # it can abort the process at exit ("terminate called without an active exception").
        self.forward_model = self.model
