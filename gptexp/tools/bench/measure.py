"""The bench's measurements. Every gptexp command is a real subprocess, launched through
:mod:`gptexp.tools.bench.probe` so that its wall time comes with the instants of its phases; the
plain script (``plain_train.py``) is its yardstick, run in alternation with it."""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptexp.checkpoint.format import snapshot
from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import CheckpointConfig
from gptexp.model.gpt import GPT
from gptexp.observe.metrics import TOKENS_PER_S, TRAIN_LOSS, VAL_LOSS, read_metrics
from gptexp.observe.rundir import RunDirectory
from gptexp.tools.bench.plan import GPT2_VOCAB, PROJECT_ROOT, BenchPlan
from gptexp.training.speed import MKL_CBWR, STRICT_REPRODUCIBILITY

PLAIN_SCRIPT = Path(__file__).resolve().parent / "plain_train.py"


class BenchError(RuntimeError):
    """A part of the bench could not run; the message says which and why."""


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("median of no measurements")
    return float(statistics.median(values))


# ----------------------------------------------------------------------------- subprocesses


@dataclass
class ChildResult:
    wall_s: float
    launched_at: float  # time.time() just before the process was started
    max_rss_bytes: int
    output: str


def child_env(cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The child imports this gptexp, wherever the bench is started from.
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("WANDB_MODE", "disabled")
    # The plain script's matmuls as exact as gptexp's own (which sets this in its process):
    # without it, on a busy Intel machine the two parted in the last bits of a loss.
    env.setdefault(MKL_CBWR, STRICT_REPRODUCIBILITY)
    if cache is not None:
        env["GPTEXP_CACHE"] = str(cache)  # the bench's own corpus cache, not the user's
    return env


def run_child(
    args: list[str], workdir: Path, timeout: float = 900, cache: Path | None = None
) -> ChildResult:
    """Run ``python args...`` to completion; its own peak RSS comes from wait4."""
    log_path = workdir / f"child-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as output:
        launched_at = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=PROJECT_ROOT,
            env=child_env(cache),
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


# ----------------------------------------------------------------------------- whole runs


@dataclass
class WholeRun:
    """One process from exec to exit: its wall time, phases (seconds) and step times."""

    wall_s: float
    phases: dict[str, float]  # in process order; they add up to wall_s
    step_s: list[float]  # wall clock between consecutive step ends (steps 2..n)
    first_step_s: float  # launch to the end of the first optimizer step
    max_rss_bytes: int
    losses: list[float]
    val_loss: float | None
    logged_step_s: list[float] = field(default_factory=list)  # gptexp: train_step alone

    @classmethod
    def timed(
        cls,
        child: ChildResult,
        marks: list[tuple[str, float]],
        step_ends: list[float],
        losses: list[float],
        val_loss: float | None,
        logged_step_s: list[float] | None = None,
    ) -> WholeRun:
        """The run of ``child`` from the instants of its phases (``marks``, in process order;
        each phase is named by the mark that ends it) and of its step ends."""
        phases, previous = {}, child.launched_at
        for name, instant in marks:
            phases[name] = instant - previous
            previous = instant
        phases["teardown"] = child.launched_at + child.wall_s - previous
        return cls(
            wall_s=child.wall_s,
            phases=phases,
            step_s=[b - a for a, b in zip(step_ends, step_ends[1:], strict=False)],
            first_step_s=step_ends[0] - child.launched_at,
            max_rss_bytes=child.max_rss_bytes,
            losses=losses,
            val_loss=val_loss,
            logged_step_s=logged_step_s or [],
        )


def gptexp_overrides(
    plan: BenchPlan,
    corpus: Path,
    precision: str = "fp32",
    compile: bool = False,
    steps: int | None = None,
    checkpoint: bool = False,
) -> list[str]:
    return [
        f"model={plan.model_name}",
        "data=text",
        f"data.path={corpus}",
        f"training.batch_size={plan.batch_size}",
        f"training.max_steps={steps or plan.steps}",
        "training.log_every=1",  # a metrics record per step: losses to compare
        "training.eval_every=0",  # one evaluation, at the end
        f"training.eval_batches={plan.eval_batches}",
        "training.progress=false",
        "training.device=cpu",
        f"training.num_threads={plan.threads}",
        f"training.precision={precision}",
        f"training.compile={str(compile).lower()}",
        f"checkpoint.enabled={str(checkpoint).lower()}",  # the final step's save alone
    ]


def gptexp_run(
    plan: BenchPlan,
    corpus: Path,
    run_dir: Path,
    workdir: Path,
    precision: str = "fp32",
    compile: bool = False,
    steps: int | None = None,
    checkpoint: bool = False,
) -> WholeRun:
    """``python -m gptexp.train`` of ``plan.steps`` steps (through the probe) into run_dir."""
    marks_path = workdir / f"marks-{time.monotonic_ns()}.json"
    overrides = gptexp_overrides(plan, corpus, precision, compile, steps, checkpoint)
    steps = steps or plan.steps
    child = run_child(
        ["-m", "gptexp.tools.bench.probe", str(marks_path), "gptexp.train", *overrides,
         f"hydra.run.dir={run_dir}"],
        workdir,
        cache=workdir / "cache",
    )  # fmt: skip
    m = json.loads(marks_path.read_text())
    ends = m["step_ends"]
    if len(ends) != steps:
        raise BenchError(f"{run_dir}: {len(ends)} steps timed, {steps} expected")
    order = [
        ("interpreter", m["started"]),
        ("import torch", m["torch_imported"]),
        ("import gptexp.training.trainer", m["entry_imported"]),
        ("import hydra + compose config", m["corpus_start"]),
        ("corpus read + tokenize", m["corpus_end"]),
        ("model + optimizer", m["trainer_built"]),
        ("run dir + provenance", m["status_end"]),
        ("first step", ends[0]),
        ("later steps", ends[-1]),
        ("evaluation", m["eval_end"]),
        ("final sample", m["sample_end"]),
        ("run end (run.json, close)", m["exit"]),
    ]
    records = read_metrics(RunDirectory(run_dir).metrics)
    tokens_per_step = plan.tokens_per_step
    return WholeRun.timed(
        child,
        order,
        ends,
        losses=[r[TRAIN_LOSS] for r in records if TRAIN_LOSS in r],
        val_loss=next((r[VAL_LOSS] for r in reversed(records) if VAL_LOSS in r), None),
        logged_step_s=[tokens_per_step / r[TOKENS_PER_S] for r in records[1:] if TOKENS_PER_S in r],
    )


def plain_run(plan: BenchPlan, corpus: Path, workdir: Path) -> WholeRun:
    """The standalone plain script on the same text, sizes and seed."""
    shape = plan.model_config()
    if shape.bias or shape.dropout:
        raise BenchError(f"model={plan.model_name}: the plain script has no biases or dropout")
    timings = workdir / f"plain-{time.monotonic_ns()}.json"
    child = run_child(
        [str(PLAIN_SCRIPT), "--data", str(corpus), "--steps", str(plan.steps),
         "--batch-size", str(plan.batch_size), "--block-size", str(shape.block_size),
         "--n-layer", str(shape.n_layer), "--n-head", str(shape.n_head),
         "--n-embd", str(shape.n_embd), "--eval-batches", str(plan.eval_batches),
         "--threads", str(plan.threads), "--timings", str(timings)],
        workdir,
    )  # fmt: skip
    t = json.loads(timings.read_text())
    m, ends = t["marks"], t["step_ends"]
    order = [
        ("interpreter", m["started"]),
        ("import torch", m["imported"]),
        ("corpus read + tokenize", m["data"]),
        ("model + optimizer", m["model"]),
        ("first step", ends[0]),
        ("later steps", ends[-1]),
        ("evaluation", m["evaluated"]),
    ]
    return WholeRun.timed(child, order, ends, losses=t["losses"], val_loss=t["val_loss"])


def resume_first_step(plan: BenchPlan, run_dir: Path, steps: int, workdir: Path) -> float:
    """``python -m gptexp.resume`` of a finished run of ``steps`` steps (with a checkpoint),
    extended by 2 steps: launch to the end of its first new optimizer step."""
    marks_path = workdir / f"marks-{time.monotonic_ns()}.json"
    child = run_child(
        ["-m", "gptexp.tools.bench.probe", str(marks_path), "gptexp.resume", f"run={run_dir}",
         f"training.max_steps={steps + 2}"],
        workdir,
        cache=workdir / "cache",
    )  # fmt: skip
    ends = json.loads(marks_path.read_text())["step_ends"]
    if not ends:
        raise BenchError(f"{run_dir}: no step after resume\n{child.output[-2000:]}")
    return ends[0] - child.launched_at


def import_profile(workdir: Path) -> dict[str, float]:
    """Cumulative import seconds of the top-level packages ``gptexp.train`` pulls in
    (``python -X importtime``; a package imported by another is counted in both)."""
    child = run_child(["-X", "importtime", "-c", "import gptexp.train"], workdir)
    cumulative: dict[str, float] = {}
    for line in child.output.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = line.split("|")
        module = name.strip()
        if not cum.strip().isdigit():
            continue
        top = module.split(".")[0] if not module.startswith("gptexp") else module
        if "." in module and not module.startswith("gptexp"):
            continue  # a submodule: counted in its top-level package
        cumulative[top] = max(cumulative.get(top, 0.0), int(cum) / 1e6)
    ranked = sorted(cumulative.items(), key=lambda kv: -kv[1])
    return dict(ranked[:12])


# ----------------------------------------------------------------------------- yardsticks


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


def training_flops_per_token(model: GPT) -> int:
    """nanoGPT's MFU count: 6 per parameter (forward + backward) plus attention's
    12 x layers x width x block (the position embeddings are not counted as parameters)."""
    cfg = model.cfg
    return 6 * model.num_parameters(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * (
        cfg.block_size
    )


def compile_break_even(plan: BenchPlan, vocab: int, steps: int = 12) -> dict[str, float]:
    """In-process: eager and compiled steps of the bench's model in alternation, and the cost
    of the cold compile (its first step). Break-even: the steps after which compiling paid."""
    torch.manual_seed(0)
    model = GPT(plan.model_config(), vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (plan.batch_size, model.cfg.block_size))

    def step(forward: Callable) -> float:
        started = time.perf_counter()
        _, loss = forward(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - started

    for _ in range(2):
        step(model)
    compiled = torch.compile(model)
    first = step(compiled)
    eager_s, compiled_s = [], []
    for _ in range(steps):
        eager_s.append(step(model))
        compiled_s.append(step(compiled))
    eager, fast = median(eager_s), median(compiled_s)
    gain = eager - fast
    return {
        "cold_compile_s": first - fast,
        "eager_step_s": eager,
        "compiled_step_s": fast,
        "break_even_steps": (first - fast) / gain if gain > 0 else float("inf"),
    }


# ----------------------------------------------------------------------------- checkpoints


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
    # What the trainer does once training starts: the snapshot buffers exist before the first
    # save, so the first stall is a copy into mapped memory too.
    manager.prepare(make_state() if make_state is not None else state)
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
    manager.load(entry)  # checksum verification + torch.load(weights_only=True, mmap=True)
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


def tiny_checkpoint_cost(plan: BenchPlan, corpus: Path, workdir: Path) -> dict[str, Any]:
    """The trainer's own state after one update, saved as the training loop saves it."""
    from gptexp.core.config import DataConfig, LoggerConfig, TrainConfig, TrainingConfig
    from gptexp.run.starts import run_corpus
    from gptexp.training.runtime import Distributed
    from gptexp.training.trainer import Trainer

    training = TrainingConfig(
        batch_size=plan.batch_size, max_steps=plan.steps, device="cpu", progress=False,
        num_threads=plan.threads,
    )  # fmt: skip
    cfg = TrainConfig(
        model=plan.model_config(),
        data=DataConfig(name="text", path=str(corpus)),
        training=training,
        checkpoint=CheckpointConfig(),
        logger=LoggerConfig(),
    )
    run = RunDirectory(workdir / "tiny-checkpoints")
    run.path.mkdir(parents=True)
    trainer = Trainer(cfg, run, Distributed(), run_corpus(cfg, run, None))
    trainer.train_step()
    result = checkpoint_cost(
        trainer.state_dict(None),
        run.path,
        plan.checkpoint_repeats,
        make_state=lambda: trainer.state_dict(None),
    )
    result["parameters"] = trainer.model.num_parameters(non_embedding=False)
    return result


def guard_overhead(plan: BenchPlan, corpus: Path, workdir: Path, steps: int) -> dict[str, Any]:
    """The spike guard's cost per step: two trainers of the same run, one with
    ``training.guard.action=off`` and one with ``skip``, stepped in alternation (ms/step,
    medians); the guard's decision is the only difference between their steps."""
    from gptexp.core.config import (
        DataConfig,
        GuardConfig,
        LoggerConfig,
        TrainConfig,
        TrainingConfig,
    )
    from gptexp.run.starts import run_corpus
    from gptexp.training.runtime import Distributed
    from gptexp.training.trainer import Trainer

    trainers = {}
    for action in ("off", "skip"):
        training = TrainingConfig(
            batch_size=plan.batch_size, max_steps=steps, device="cpu", progress=False,
            num_threads=plan.threads, guard=GuardConfig(action=action),
        )  # fmt: skip
        cfg = TrainConfig(
            model=plan.model_config(),
            data=DataConfig(name="text", path=str(corpus)),
            training=training,
            checkpoint=CheckpointConfig(enabled=False),
            logger=LoggerConfig(),
        )
        run = RunDirectory(workdir / f"guard-{action}")
        run.path.mkdir(parents=True)
        trainers[action] = Trainer(cfg, run, Distributed(), run_corpus(cfg, run, None))
    seconds: dict[str, list[float]] = {"off": [], "skip": []}
    for _ in range(steps):
        for action, trainer in trainers.items():
            started = time.perf_counter()
            trainer.train_step()
            seconds[action].append(time.perf_counter() - started)
    off, on = median(seconds["off"][1:]), median(seconds["skip"][1:])  # the first: warm-up
    return {"off_step_s": off, "skip_step_s": on, "skip_over_off": on / off, "steps": steps}


def gpt2_checkpoint_cost(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """The 124M GPT-2 shape with AdamW state (one optimizer step so that the moments exist):
    saved as training would save it (not trained; the values do not change the cost)."""
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
    result = checkpoint_cost(state, directory, repeats=plan.checkpoint_repeats)
    result["parameters"] = model.num_parameters(non_embedding=False)
    shutil.rmtree(directory)
    return result


# ----------------------------------------------------------------------------- eval


def eval_entry_seconds(run_dir: Path, batches: int, workdir: Path) -> float:
    args = ["-m", "gptexp.eval", f"run={run_dir}", "samples=0", f"batches={batches}"]
    return run_child(args, workdir, cache=workdir / "cache").wall_s


def eval_in_process(plan: BenchPlan, model: GPT, tokens: torch.Tensor) -> float:
    """Tokens/s of :func:`gptexp.training.scoring.evaluate_loss`, the function the entry point
    runs."""
    from gptexp.training.scoring import evaluate_loss

    batches = plan.eval_entry[1]
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


def sample_in_process(model: GPT, tokens: int, repeats: int = 3) -> dict[str, float]:
    """Seconds of an end-of-run sample (``tokens`` new tokens, one sequence, greedy), with the
    KV cache (``GPT.generate``, which also runs a small model on one thread) and the way it was
    before (the whole context recomputed every token, on the bench's threads), in alternation
    after a warm-up; medians."""
    model.eval()
    start = torch.zeros((1, 1), dtype=torch.long)

    def uncached() -> None:
        idx = start
        for _ in range(tokens):
            logits, _ = model(idx[:, -model.cfg.block_size :])
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)

    def cached() -> None:
        model.generate(start, tokens, temperature=0)

    cached_s, uncached_s = [], []
    with torch.no_grad():
        cached()  # warm-up: first calls pick kernels
        for _ in range(repeats):
            for fn, times in ((cached, cached_s), (uncached, uncached_s)):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
    return {"kv_cache_s": median(cached_s), "no_cache_s": median(uncached_s), "tokens": tokens}
