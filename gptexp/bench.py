"""``python -m gptexp.bench [--corpus PATH] [--quick] [--out DIR]``: the framework's costs as
ratios to what plain PyTorch does on the same machine, in the same run.

A shared machine's speed drifts from minute to minute, so every figure is measured next to its
yardstick, in alternation, and reported as a median over repeats:

1. training throughput of ``python -m gptexp.train`` (a real subprocess) next to a minimal
   plain-PyTorch loop that trains the same model on the same batches;
2. efficiency: training FLOP/s (nanoGPT's MFU count) over the FLOP/s of a large matmul of the
   same precision, for fp32 and for the best precision/compile setting;
3. checkpoint cost: the training stall per save (tiny, and the 124M GPT-2 shape) next to a
   plain synchronous ``torch.save`` of the same state, load time, bytes on disk;
4. start-up: command to first optimizer step, fresh and resumed, next to ``import torch``;
5. eval throughput of ``python -m gptexp.eval`` and the peak resident memory of training.

The results go to ``<out>/<date>.json`` (``outputs/bench`` by default) with the machine they
were measured on, and a table is printed. ``--quick`` runs every part at toy sizes in seconds
(a smoke test of the bench itself; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from gptexp.checkpoint import CheckpointManager, snapshot
from gptexp.config import CheckpointConfig, DataConfig, ModelConfig, TrainConfig, TrainingConfig
from gptexp.data import global_batch_slice, prepare_corpus
from gptexp.evaluation import evaluate_loss
from gptexp.model import GPT
from gptexp.optim import lr_factor
from gptexp.rundir import RunDirectory
from gptexp.runtime import Distributed
from gptexp.trainer import Trainer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = Path(__file__).resolve().parent / "conf"
GPT2_VOCAB = 50257
BENCH_FORMAT = 1
# A step line of the trainer's log: "[2026-11-28 19:09:12,303][gptexp.trainer][INFO] step 1/3 |"
STEP_LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[gptexp\.trainer\]\[INFO\] step (\d+)/"
)


class BenchError(RuntimeError):
    """A part of the bench could not run; the message says which and why."""


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class BenchPlan:
    """Sizes and repeat counts of one bench run."""

    mode: str  # full | quick
    model_name: str  # the conf/model/ option trained through the entry point
    batch_size: int
    steps: int  # optimizer steps per training run
    skipped_steps: int  # warm-up steps left out of the steady-state throughput
    repeats: int
    matmul_size: int
    eval_batches: tuple[int, int]  # the eval entry runs with both; the difference is the work
    checkpoint_repeats: int
    gpt2: bool
    compile: bool
    threads: int

    @classmethod
    def full(cls, threads: int, compile: bool) -> BenchPlan:
        return cls("full", "tiny", 32, 30, 3, 7, 2048, (4, 84), 5, True, compile, threads)

    @classmethod
    def quick(cls, threads: int, compile: bool) -> BenchPlan:
        return cls("quick", "nano", 4, 4, 1, 1, 256, (1, 3), 1, False, compile, threads)

    def model_config(self, name: str | None = None) -> ModelConfig:
        """The shape of ``conf/model/<name>.yaml``, the file the entry point composes."""
        from omegaconf import OmegaConf

        path = CONF_DIR / "model" / f"{name or self.model_name}.yaml"
        return ModelConfig(**OmegaConf.to_container(OmegaConf.load(path)))  # type: ignore[arg-type]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model_config().block_size


# ----------------------------------------------------------------------------- helpers


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("median of no measurements")
    return float(statistics.median(values))


def machine_info(threads: int) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = ""
    if cpuinfo.is_file():
        flags = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "memory_gib": _memory_gib(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
    }


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def training_flops_per_token(model: GPT) -> int:
    """nanoGPT's MFU count: 6 per parameter (forward + backward) plus attention's
    12 x layers x width x block (the position embeddings are not counted as parameters)."""
    cfg = model.cfg
    return 6 * model.num_parameters(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * (
        cfg.block_size
    )


def matmul_flops_per_s(dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical peak of this machine for ``dtype``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(2):  # first calls pick kernels and fault the pages in
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / median(times)


def raw_tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors in a nested state (a tied tensor counts once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(raw_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(raw_tensor_bytes(v, seen) for v in obj)
    return 0


# ----------------------------------------------------------------------------- subprocesses


@dataclass
class ChildResult:
    wall_s: float
    launched_at: float  # time.time() just before the process was started
    max_rss_bytes: int
    stderr: str


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child imports this gptexp, wherever the bench is started from.
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def run_child(args: list[str], workdir: Path, timeout: float = 600) -> ChildResult:
    """Run ``python args...`` to completion; its own peak RSS comes from wait4."""
    log_path = workdir / f"child-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as output:
        launched_at = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=PROJECT_ROOT,
            env=child_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    text = log_path.read_text(errors="replace")
    if process.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise BenchError(f"python {' '.join(args)} exited with {process.returncode}:\n{tail}")
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return ChildResult(wall, launched_at, usage.ru_maxrss * scale, text)


def step_times(train_log: Path, offset: int = 0) -> dict[int, float]:
    """Wall-clock time (epoch seconds, ms resolution) of each step line in the trainer's log
    after byte ``offset``. The line is written once the step's update and logging are done."""
    times: dict[int, float] = {}
    with open(train_log, encoding="utf-8") as f:
        f.seek(offset)
        for line in f:
            match = STEP_LINE.match(line)
            if match:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                times.setdefault(int(match.group(2)), stamp)
    return times


# ----------------------------------------------------------------------------- training


@dataclass
class TrainingRun:
    tokens_per_s: float  # steady state, wall clock between the trainer's step lines
    logged_tokens_per_s: float  # median of the trainer's own throughput/tokens_per_s
    loop_overhead_s: float  # per step: wall clock minus the trainer's own train_step time
    first_step_s: float  # command to the end of the first optimizer step
    max_rss_bytes: int
    losses: list[float]


def train_overrides(plan: BenchPlan, data: DataConfig, precision: str, compile: bool) -> list[str]:
    overrides = [
        f"model={plan.model_name}",
        f"training.batch_size={plan.batch_size}",
        f"training.max_steps={plan.steps}",
        "training.log_every=1",  # a line per step: step times and losses to compare
        "training.eval_every=0",  # no evaluation before step 1 or in between (only the final)
        "training.eval_batches=2",
        "training.sample_tokens=0",
        "training.progress=false",
        "training.device=cpu",
        f"training.num_threads={plan.threads}",
        f"training.precision={precision}",
        f"training.compile={str(compile).lower()}",
    ]
    if data.name == "text":
        overrides += ["data=text", f"data.path={data.path}"]
    return overrides


def framework_training(
    plan: BenchPlan,
    data: DataConfig,
    run_dir: Path,
    workdir: Path,
    precision: str = "fp32",
    compile: bool = False,
) -> TrainingRun:
    """A real ``python -m gptexp.train`` of ``plan.steps`` steps into ``run_dir``."""
    args = ["-m", "gptexp.train", *train_overrides(plan, data, precision, compile)]
    child = run_child([*args, f"hydra.run.dir={run_dir}"], workdir)
    times = step_times(run_dir / "train.log")
    first, last = plan.skipped_steps, plan.steps - 1  # the final step also evaluates and saves
    if not {1, first, last} <= times.keys():
        raise BenchError(f"{run_dir / 'train.log'}: step lines missing\n{child.stderr[-2000:]}")
    steady_s = (times[last] - times[first]) / (last - first)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if first < r["step"] <= last]
    logged = [r["throughput/tokens_per_s"] for r in steady]
    # The trainer times train_step alone; the rest of the wall clock is its loop's own cost
    # (logging, metrics, checkpoint policy, signal checks).
    update_s = statistics.mean(plan.tokens_per_step / value for value in logged)
    return TrainingRun(
        tokens_per_s=plan.tokens_per_step / steady_s,
        logged_tokens_per_s=median(logged),
        loop_overhead_s=steady_s - update_s,
        first_step_s=times[1] - child.launched_at,
        max_rss_bytes=child.max_rss_bytes,
        losses=[r["train/loss"] for r in records if "train/loss" in r],
    )


def reference_training(
    plan: BenchPlan, train_config: TrainConfig, tokens: torch.Tensor, vocab: int
) -> tuple[float, list[float], GPT]:
    """A minimal plain-PyTorch loop: the same model, initialisation, optimizer, schedule,
    clipping and batches as the trainer, and nothing else. Returns (tokens/s, losses, model)."""
    t, shape = train_config.training, train_config.model
    torch.manual_seed(t.seed)  # the trainer seeds the same way before building the model
    model = GPT(shape, vocab)
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2)
    )
    losses, seconds = [], []
    for step in range(plan.steps):
        started = time.perf_counter()
        x, y = global_batch_slice(
            tokens,
            shape.block_size,
            t.batch_size,
            seed=t.seed,
            split="train",
            step=step,
            rank=0,
            micro=0,
            grad_accum=1,
            world_size=1,
        )
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(step, t)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - started)
    # The same steps as the framework's steady window: skipped_steps + 1 .. steps - 1.
    steady = seconds[plan.skipped_steps : plan.steps - 1]
    return plan.tokens_per_step / (sum(steady) / len(steady)), losses, model


def bench_train_config(plan: BenchPlan, data: DataConfig) -> TrainConfig:
    """The typed config the entry point composes from :func:`train_overrides` (fp32)."""
    from gptexp.config import LoggerConfig

    training = TrainingConfig(
        batch_size=plan.batch_size,
        max_steps=plan.steps,
        log_every=1,
        eval_every=0,
        eval_batches=2,
        sample_tokens=0,
        progress=False,
        device="cpu",
        num_threads=plan.threads,
        precision="fp32",
    )
    return TrainConfig(
        model=plan.model_config(),
        data=data,
        training=training,
        checkpoint=CheckpointConfig(),
        logger=LoggerConfig(),
    )


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_cost(
    state: dict[str, Any],
    directory: Path,
    repeats: int,
    make_state: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Stall and write time of ``CheckpointManager.save`` (asynchronous) next to a plain
    synchronous ``torch.save`` of the same state, in alternation; then load times and bytes.

    ``make_state`` (optional) is what the training loop calls before saving (the trainer's
    ``state_dict``): its time is part of the stall.
    """
    policy = CheckpointConfig(every_steps=1, keep_last=1, keep_best=0)
    manager = CheckpointManager(directory / "managed", policy)
    plain_path = directory / "plain.pt"
    stalls, save_calls, writes, plain = [], [], [], []
    for i in range(repeats):
        started = time.perf_counter()
        current = make_state() if make_state is not None else state
        manager.save(current, i + 1, None, ["bench"], asynchronous=True)
        stalls.append(time.perf_counter() - started)
        save_calls.append(manager.save_seconds[-1])
        manager.wait()
        writes.append(manager.write_seconds[-1])

        started = time.perf_counter()
        torch.save(state, plain_path)
        plain.append(time.perf_counter() - started)

    # How much of the stall is snapshot() alone: into fresh memory, and into the buffers of
    # an earlier snapshot (what the manager does from its second save on).
    started = time.perf_counter()
    buffers: dict[tuple, torch.Tensor] = {}
    snapshot(state, buffers)
    snapshot_fresh_s = time.perf_counter() - started
    started = time.perf_counter()
    snapshot(state, buffers)
    snapshot_reused_s = time.perf_counter() - started
    del buffers

    steady = median(stalls[1:]) if len(stalls) > 1 else stalls[0]
    entry = manager.find("last")
    started = time.perf_counter()
    manager.load(entry)  # sha256 verification + torch.load(weights_only=True)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    torch.load(plain_path, map_location="cpu", weights_only=True)
    plain_load_s = time.perf_counter() - started
    return {
        # The first save of a run allocates the snapshot's memory; later ones reuse it.
        "first_stall_s": stalls[0],
        "stall_s": steady,
        "stall_s_each": stalls,
        "save_call_s_each": save_calls,
        "snapshot_fresh_s": snapshot_fresh_s,
        "snapshot_reused_s": snapshot_reused_s,
        "write_s": median(writes),
        "plain_torch_save_s": median(plain),
        "plain_torch_save_s_each": plain,
        "stall_over_plain_save": steady / median(plain),
        "first_stall_over_plain_save": stalls[0] / median(plain),
        "load_s": load_s,
        "plain_torch_load_s": plain_load_s,
        "checkpoint_bytes": entry.bytes,
        "plain_torch_save_bytes": plain_path.stat().st_size,
        "raw_tensor_bytes": raw_tensor_bytes(state),
    }


def tiny_checkpoint_cost(plan: BenchPlan, data: DataConfig, workdir: Path) -> dict[str, Any]:
    """The trainer's own state after one update, saved as the training loop saves it."""
    cfg = bench_train_config(plan, data)
    run = RunDirectory(workdir / "tiny-checkpoints")
    run.path.mkdir(parents=True)
    corpus = prepare_corpus(cfg.data, cfg.model.block_size)
    trainer = Trainer(cfg, run, Distributed(), corpus)
    trainer.train_step()
    result = checkpoint_cost(
        trainer.state_dict(None),
        run.path,
        plan.checkpoint_repeats,
        make_state=lambda: trainer.state_dict(None),
    )
    result["parameters"] = trainer.model.num_parameters(non_embedding=False)
    return result


def gpt2_checkpoint_cost(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """The 124M GPT-2 shape with AdamW state (one optimizer step so that the moments exist):
    one save as training would do it (not trained; the values do not change the cost)."""
    shape = plan.model_config("gpt2")
    torch.manual_seed(0)
    model = GPT(shape, GPT2_VOCAB)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=6e-4)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {
        "format_version": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": 1,
        "rng": [{"torch": torch.get_rng_state()}],
        "config": {"model": shape.__dict__},
    }
    directory = workdir / "gpt2-checkpoints"
    directory.mkdir()
    result = checkpoint_cost(state, directory, repeats=3)
    result["parameters"] = model.num_parameters(non_embedding=False)
    shutil.rmtree(directory)
    return result


# ----------------------------------------------------------------------------- eval


def eval_entry_seconds(run_dir: Path, batches: int, workdir: Path) -> float:
    args = ["-m", "gptexp.eval", f"run={run_dir}", "samples=0", f"batches={batches}"]
    return run_child(args, workdir).wall_s


def eval_in_process(plan: BenchPlan, model: GPT, tokens: torch.Tensor) -> float:
    """Tokens/s of :func:`gptexp.trainer.evaluate_loss`, the function the entry point runs."""
    batches = plan.eval_batches[1]
    score = functools.partial(
        evaluate_loss,
        model,
        tokens,
        block_size=model.cfg.block_size,
        batch_size=plan.batch_size,
        seed=0,
        split="val",
        device=torch.device("cpu"),
    )
    score(batches=1)  # warm-up
    started = time.perf_counter()
    score(batches=batches)
    return batches * plan.tokens_per_step / (time.perf_counter() - started)


# ----------------------------------------------------------------------------- the bench


@dataclass
class Measurements:
    import_torch_s: list[float] = field(default_factory=list)
    matmul_flops_per_s: dict[str, list[float]] = field(default_factory=dict)
    framework: list[TrainingRun] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    reference_losses: list[float] = field(default_factory=list)
    best: dict[str, list[TrainingRun]] = field(default_factory=dict)
    resume_first_step_s: list[float] = field(default_factory=list)
    eval_entry_s: list[tuple[float, float]] = field(default_factory=list)


def resume_first_step(plan: BenchPlan, run_dir: Path, workdir: Path) -> float:
    """``python -m gptexp.resume`` of a finished run, extended by a few steps: command to the
    end of the first new optimizer step."""
    log = run_dir / "train.log"
    offset = log.stat().st_size
    extended = plan.steps + 2
    args = ["-m", "gptexp.resume", f"run={run_dir}", f"training.max_steps={extended}"]
    child = run_child(args, workdir)
    times = step_times(log, offset)
    if plan.steps + 1 not in times:
        raise BenchError(f"{log}: no step {plan.steps + 1} after resume\n{child.stderr[-2000:]}")
    return times[plan.steps + 1] - child.launched_at


def best_settings(plan: BenchPlan) -> dict[str, tuple[str, bool]]:
    """The faster settings the framework offers on a CPU: bf16 autocast where the CPU has bf16
    support, and torch.compile when asked (its cold compile costs ~30 s per run)."""
    settings = {"bf16": ("bf16", False)}
    if plan.compile:
        settings |= {"fp32+compile": ("fp32", True), "bf16+compile": ("bf16", True)}
    return settings


def measure(plan: BenchPlan, data: DataConfig, workdir: Path, say: Callable[[str], None]):
    torch.set_num_threads(plan.threads)
    results: dict[str, Any] = {}

    train_config = bench_train_config(plan, data)
    corpus = prepare_corpus(data, train_config.model.block_size)
    vocab = corpus.tokenizer.vocab_size
    m = Measurements()
    settings = best_settings(plan)
    reference_model: GPT | None = None
    for repeat in range(plan.repeats):
        say(
            f"repeat {repeat + 1}/{plan.repeats}: import torch, matmul peaks, gptexp.train, "
            "plain loop, " + ", ".join(settings)
        )
        m.import_torch_s.append(run_child(["-c", "import torch"], workdir).wall_s)
        # The peaks in alternation with the training they are compared with.
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            m.matmul_flops_per_s.setdefault(name, []).append(
                matmul_flops_per_s(dtype, plan.matmul_size)
            )
        m.framework.append(framework_training(plan, data, workdir / f"fp32-{repeat}", workdir))
        tokens_per_s, losses, reference_model = reference_training(
            plan, train_config, corpus.train, vocab
        )
        m.reference.append(tokens_per_s)
        m.reference_losses = losses
        for name, (precision, compile) in settings.items():
            if compile and repeat > 0:
                continue  # one compiled run: the cold compile alone costs half a minute
            run = framework_training(
                plan, data, workdir / f"{name}-{repeat}", workdir, precision, compile
            )
            m.best.setdefault(name, []).append(run)
        m.resume_first_step_s.append(resume_first_step(plan, workdir / f"fp32-{repeat}", workdir))
    torch.set_num_threads(plan.threads)  # the trainer of a resumed run may have changed it

    say("eval: python -m gptexp.eval, two batch counts in alternation")
    low, high = plan.eval_batches
    for _ in range(min(plan.repeats, 3)):
        m.eval_entry_s.append(
            (
                eval_entry_seconds(workdir / "fp32-0", low, workdir),
                eval_entry_seconds(workdir / "fp32-0", high, workdir),
            )
        )
    assert reference_model is not None
    eval_engine = eval_in_process(plan, reference_model, corpus.val)

    say("checkpoint cost: tiny")
    tiny = tiny_checkpoint_cost(plan, data, workdir)
    gpt2 = None
    if plan.gpt2:
        say("checkpoint cost: 124M GPT-2 shape")
        gpt2 = gpt2_checkpoint_cost(plan, workdir)

    flops_per_token = training_flops_per_token(GPT(train_config.model, vocab))
    results["settings"] = {
        "model": plan.model_name,
        "shape": train_config.model.__dict__,
        "vocab_size": vocab,
        "corpus": data.path or data.name,
        "batch_size": plan.batch_size,
        "block_size": train_config.model.block_size,
        "steps_per_run": plan.steps,
        "steady_steps": f"{plan.skipped_steps + 1}..{plan.steps - 1}",
        "repeats": plan.repeats,
        "threads": plan.threads,
        "matmul_size": plan.matmul_size,
        "flops_per_token": flops_per_token,
    }
    results.update(summarise(plan, m, flops_per_token, eval_engine, tiny, gpt2))
    return results


def summarise(
    plan: BenchPlan,
    m: Measurements,
    flops_per_token: int,
    eval_engine: float,
    tiny: dict[str, Any],
    gpt2: dict[str, Any] | None,
) -> dict[str, Any]:
    framework = median([r.tokens_per_s for r in m.framework])
    peaks = {name: median(values) for name, values in m.matmul_flops_per_s.items()}
    reference = median(m.reference)
    best_tokens = {name: median([r.tokens_per_s for r in runs]) for name, runs in m.best.items()}
    best_name = max(best_tokens, key=best_tokens.__getitem__)
    best_precision = "bf16" if best_name.startswith("bf16") else "fp32"
    fresh = median([r.first_step_s for r in m.framework])
    resumed = median(m.resume_first_step_s)
    import_torch = median(m.import_torch_s)
    low, high = plan.eval_batches
    eval_extra = median([b - a for a, b in m.eval_entry_s])
    eval_tokens = (high - low) * plan.tokens_per_step
    framework_losses = m.framework[-1].losses
    return {
        "throughput": {
            "framework_tokens_per_s": framework,
            "framework_tokens_per_s_each": [r.tokens_per_s for r in m.framework],
            "framework_logged_tokens_per_s": median([r.logged_tokens_per_s for r in m.framework]),
            "reference_tokens_per_s": reference,
            "reference_tokens_per_s_each": m.reference,
            "framework_over_reference": framework / reference,
            "framework_over_reference_each": [
                r.tokens_per_s / ref for r, ref in zip(m.framework, m.reference, strict=True)
            ],
            # Time per step the trainer's loop spends outside train_step (median over runs).
            "framework_loop_overhead_ms_per_step": 1000
            * median([r.loop_overhead_s for r in m.framework]),
            "framework_ms_per_step": 1000 * plan.tokens_per_step / framework,
            "reference_ms_per_step": 1000 * plan.tokens_per_step / reference,
            # The reference trains the same model on the same batches: equal losses show it.
            "same_losses_as_reference": framework_losses == m.reference_losses,
            "settings_tokens_per_s": best_tokens,
        },
        "efficiency": {
            "matmul_flops_per_s": peaks,
            "matmul_flops_per_s_each": m.matmul_flops_per_s,
            "flops_per_token": flops_per_token,
            "fp32_framework_flops_per_s": framework * flops_per_token,
            "fp32_framework_share_of_peak": framework * flops_per_token / peaks["fp32"],
            "fp32_reference_share_of_peak": reference * flops_per_token / peaks["fp32"],
            "best_setting": best_name,
            "best_tokens_per_s": best_tokens[best_name],
            "best_over_fp32_reference": best_tokens[best_name] / reference,
            "best_share_of_peak": best_tokens[best_name] * flops_per_token / peaks[best_precision],
            "best_share_of_fp32_peak": best_tokens[best_name] * flops_per_token / peaks["fp32"],
        },
        "checkpoint": {"tiny": tiny, "gpt2_124m": gpt2},
        "startup": {
            "import_torch_s": import_torch,
            "import_torch_s_each": m.import_torch_s,
            "fresh_first_step_s": fresh,
            "fresh_first_step_s_each": [r.first_step_s for r in m.framework],
            "resume_first_step_s": resumed,
            "resume_first_step_s_each": m.resume_first_step_s,
            "fresh_over_import_torch": fresh / import_torch,
            "resume_over_fresh": resumed / fresh,
        },
        "eval": {
            # Command to exit, start-up included: what a user of the entry point gets.
            "entry_tokens_per_s": high
            * plan.tokens_per_step
            / median([b for _, b in m.eval_entry_s]),
            # The entry point at two batch counts: the difference is the evaluation alone,
            # start-up cancels out (None when start-up noise swamps it, as in --quick).
            "entry_marginal_tokens_per_s": eval_tokens / eval_extra if eval_extra > 0 else None,
            "entry_wall_s": {
                str(low): median([a for a, _ in m.eval_entry_s]),
                str(high): median([b for _, b in m.eval_entry_s]),
            },
            "evaluate_loss_tokens_per_s": eval_engine,
            "batches": [low, high],
        },
        "memory": {
            "train_peak_rss_bytes": int(median([r.max_rss_bytes for r in m.framework])),
            "train_peak_rss_bytes_by_setting": {
                name: int(median([r.max_rss_bytes for r in runs])) for name, runs in m.best.items()
            },
        },
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    t, e, c, s = (results[k] for k in ("throughput", "efficiency", "checkpoint", "startup"))
    gpt2 = c["gpt2_124m"]
    rows = [
        (
            "framework overhead within 3% of the reference loop",
            t["framework_over_reference"],
            ">=",
            0.97,
        ),
        (
            "fp32 efficiency >= 70% of the fp32 matmul peak",
            e["fp32_framework_share_of_peak"],
            ">=",
            0.70,
        ),
        (
            f"best setting ({e['best_setting']}) >= 1.3x the fp32 reference",
            e["best_over_fp32_reference"],
            ">=",
            1.3,
        ),
        (
            "124M checkpoint stall (2nd save on) <= 10% of a plain torch.save",
            gpt2["stall_over_plain_save"] if gpt2 else None,
            "<=",
            0.10,
        ),
        ("fresh start to first step <= 2x import torch", s["fresh_over_import_torch"], "<=", 2.0),
        ("resume to first step <= 1.5x fresh start", s["resume_over_fresh"], "<=", 1.5),
    ]
    out = []
    for name, value, op, limit in rows:
        holds = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append({"target": name, "value": value, "limit": f"{op} {limit}", "holds": holds})
    return out


# ----------------------------------------------------------------------------- the table


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def table(results: dict[str, Any]) -> str:
    t, e, c, s, ev, mem = (
        results[k] for k in ("throughput", "efficiency", "checkpoint", "startup", "eval", "memory")
    )
    model = results["settings"]["model"]
    marginal = ev["entry_marginal_tokens_per_s"]
    rows: list[tuple[str, str, str, str]] = [
        ("figure (medians)", "gptexp", "yardstick", "ratio"),
        (
            f"train tokens/s, {model} fp32",
            f"{t['framework_tokens_per_s']:,.0f}",
            f"{t['reference_tokens_per_s']:,.0f} plain loop",
            f"{t['framework_over_reference']:.3f}",
        ),
        (
            "  trainer loop outside train_step",
            f"{t['framework_loop_overhead_ms_per_step']:.2f} ms/step",
            f"{t['reference_ms_per_step']:.1f} ms/step plain loop",
            f"{t['framework_loop_overhead_ms_per_step'] / t['reference_ms_per_step']:.4f}",
        ),
    ]
    for name, value in t["settings_tokens_per_s"].items():
        rows.append(
            (
                f"train tokens/s, {model} {name}",
                f"{value:,.0f}",
                f"{t['reference_tokens_per_s']:,.0f} fp32 loop",
                f"{value / t['reference_tokens_per_s']:.3f}",
            )
        )
    peaks = e["matmul_flops_per_s"]
    rows += [
        (
            "train FLOP/s, fp32",
            _si(e["fp32_framework_flops_per_s"], "FLOP/s"),
            _si(peaks["fp32"], "FLOP/s") + " matmul",
            f"{e['fp32_framework_share_of_peak']:.1%}",
        ),
        (
            f"train FLOP/s, {e['best_setting']}",
            _si(e["best_tokens_per_s"] * e["flops_per_token"], "FLOP/s"),
            _si(peaks["bf16" if e["best_setting"].startswith("bf16") else "fp32"], "FLOP/s")
            + " matmul",
            f"{e['best_share_of_peak']:.1%}",
        ),
    ]
    for label, cost in (("tiny", c["tiny"]), ("124M", c["gpt2_124m"])):
        if cost is None:
            continue
        rows += [
            (
                f"checkpoint stall, {label}, first save",
                f"{cost['first_stall_s'] * 1000:,.1f} ms",
                f"{cost['plain_torch_save_s'] * 1000:,.1f} ms torch.save",
                f"{cost['first_stall_over_plain_save']:.3f}",
            ),
            (
                f"checkpoint stall, {label}, later saves",
                f"{cost['stall_s'] * 1000:,.1f} ms",
                f"{cost['plain_torch_save_s'] * 1000:,.1f} ms torch.save",
                f"{cost['stall_over_plain_save']:.3f}",
            ),
            (f"  background write, {label}", f"{cost['write_s'] * 1000:,.1f} ms", "", ""),
            (
                f"checkpoint load, {label}",
                f"{cost['load_s'] * 1000:,.1f} ms",
                f"{cost['plain_torch_load_s'] * 1000:,.1f} ms torch.load",
                f"{cost['load_s'] / cost['plain_torch_load_s']:.2f}",
            ),
            (
                f"checkpoint bytes, {label}",
                _si(cost["checkpoint_bytes"], "B"),
                _si(cost["raw_tensor_bytes"], "B") + " tensors",
                f"{cost['checkpoint_bytes'] / cost['raw_tensor_bytes']:.3f}",
            ),
        ]
    rows += [
        (
            "command to first step, fresh",
            f"{s['fresh_first_step_s']:.2f} s",
            f"{s['import_torch_s']:.2f} s import torch",
            f"{s['fresh_over_import_torch']:.2f}",
        ),
        (
            "command to first step, resume",
            f"{s['resume_first_step_s']:.2f} s",
            f"{s['fresh_first_step_s']:.2f} s fresh",
            f"{s['resume_over_fresh']:.2f}",
        ),
        (
            f"eval tokens/s, entry point, {ev['batches'][1]} batches",
            f"{ev['entry_tokens_per_s']:,.0f}",
            f"{ev['evaluate_loss_tokens_per_s']:,.0f} evaluate_loss",
            f"{ev['entry_tokens_per_s'] / ev['evaluate_loss_tokens_per_s']:.3f}",
        ),
        (
            "eval tokens/s, entry point, marginal",
            f"{marginal:,.0f}" if marginal else "n/a (noise)",
            f"{ev['evaluate_loss_tokens_per_s']:,.0f} evaluate_loss",
            f"{marginal / ev['evaluate_loss_tokens_per_s']:.3f}" if marginal else "",
        ),
        ("train peak RSS, fp32", _si(mem["train_peak_rss_bytes"], "B"), "", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for target in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[target["holds"]]
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"{verdict}  {target['target']}: {value} ({target['limit']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gptexp.bench",
        description="Measure gptexp's speed, efficiency and checkpoint cost as ratios.",
    )
    parser.add_argument("--corpus", type=Path, help="a UTF-8 text file (default: pydocs)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, seconds: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="results dir")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: the usable cores)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile (~30 s cold per run)"
    )
    return parser.parse_args(argv)


def run_bench(args: argparse.Namespace, say: Callable[[str], None] = print) -> Path:
    threads = args.threads or len(os.sched_getaffinity(0))
    plan = (BenchPlan.quick if args.quick else BenchPlan.full)(threads, args.compile)
    data = DataConfig()
    if args.corpus is not None:
        if not args.corpus.is_file():
            raise BenchError(f"--corpus {args.corpus}: no such file")
        data = DataConfig(name="text", path=str(args.corpus.resolve()))
    load_before = load_average()
    if load_before and load_before[0] > 0.5 * threads:
        say(
            f"note: load average {load_before[0]} on {threads} threads: the machine is busy, "
            "figures will be noisy"
        )
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gptexp-bench-"))
    try:
        results: dict[str, Any] = {
            "format": BENCH_FORMAT,
            "date": datetime.now().isoformat(timespec="seconds"),
            "mode": plan.mode,
            "machine": machine_info(threads),
        }
        results.update(measure(plan, data, workdir, say))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["targets"] = targets(results)
    results["load_average"] = {"before": load_before, "after": load_average()}
    results["bench_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    say("")
    say(table(results))
    say(f"\n{plan.mode} bench in {results['bench_seconds']:.0f} s; results: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run_bench(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
