"""``python -m gptexp.gpucheck [--corpus PATH]`` (``make gpu-check``): does gptexp work, and
how fast, on this machine's GPU? About 8 minutes on one GPU.

1. checkpoints: the training stall of an asynchronous save of the gpt2 state and the time to
   verify and load it back onto the GPU;
2. exact resume: a run stopped by SIGTERM at step 100 and resumed logs the per-step losses of
   the uninterrupted run, bit for bit (deterministic kernels on);
3. fp16: the same through a resume with the GradScaler, whose scale must survive it;
4. two GPUs (where there are two): torchrun with FSDP and sharded checkpoints finishes;
5. the side-by-side: the bench's plain script (``gptexp/tools/bench/plain_train.py``, what
   nanoGPT's ``train.py`` does) and ``python -m gptexp.train`` on the gpt2 shape without biases
   (12 x 12 x 768, block 1024), bf16 autocast, fused AdamW, the same character-level text and
   batches, at batch 8 and 32, eager and compiled: ms per step of both, their ratio and the MFU
   of both; then, as far as the time allows, gptexp compiled with the other
   ``training.compile_mode`` values, next to the plain script compiled.

Every check trains through the real entry points (``python -m gptexp.train`` / ``resume``)
into ``outputs/gpu-check/<date>_<time>/``, prints its tables and writes ``results.json``
there. Without CUDA it says why it does nothing and exits 0. Exit 1 when a check fails (a
speed target missed is reported in the side-by-side table, not a failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from gptexp.checkpoint.manager import CheckpointManager
from gptexp.core.config import COMPILE_MODES, CheckpointConfig, ModelConfig
from gptexp.core.fsio import atomic_write_json
from gptexp.data.sources import python_docs_text
from gptexp.model.gpt import GPT
from gptexp.observe.metrics import MEDIAN_TOKENS_PER_S, STEP, TRAIN_LOSS, read_metrics
from gptexp.observe.rundir import RunDirectory
from gptexp.observe.tables import text_table
from gptexp.tools.bench.measure import PLAIN_SCRIPT
from gptexp.tools.bench.plan import composed_model_config
from gptexp.training.mfu import cuda_peak_flops, flops_per_token
from gptexp.training.mfu import mfu as model_flops_utilisation

# The whole check should end within ~8 minutes on one H200: a check is started only when the
# time spent so far plus its estimate (ESTIMATE_S, seconds) stays within the budget; the
# others are reported as not run.
BUDGET_S = 480.0
RUN_TIMEOUT_S = 200.0  # one training process (a cold compile of gpt2 included)
SPEED = ["model=gpt2", "training.precision=bf16", "training.batch_size=8"]
CUDA = ["training.device=cuda", "training.progress=false", "logger=none"]
# cuBLAS is deterministic only with a fixed workspace (torch.use_deterministic_algorithms).
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@dataclass
class Check:
    name: str
    ok: bool
    result: str
    details: dict[str, Any]


def skip_reason() -> str | None:
    """Why there is nothing to check here (None: a CUDA GPU is present)."""
    if not torch.cuda.is_available():
        built = torch.version.cuda
        if built is None:
            return "this PyTorch is a CPU build (torch.version.cuda is None)"
        return f"no CUDA device is visible (PyTorch built for CUDA {built})"
    return None


# ----------------------------------------------------------------------------- processes


def gptexp(
    module: str,
    args: list[str],
    log: Path,
    *,
    nproc: int = 1,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``python -m module args`` (under torchrun with ``nproc`` > 1), its output into ``log``."""
    command = [sys.executable, "-m", module, *args]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={nproc}", "-m", module, *args]
    return launch(command, log, env)


def launch(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``command``, its output into ``log``."""
    with open(log, "a") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def finish(process: subprocess.Popen, log: Path) -> None:
    try:
        code = process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        raise RuntimeError(f"still running after {RUN_TIMEOUT_S:.0f} s (see {log})") from None
    if code != 0:
        raise RuntimeError(f"exit code {code} (see {log})")


def records(run: Path) -> list[dict[str, Any]]:
    return read_metrics(RunDirectory(run).metrics)


def step_losses(run: Path) -> dict[int, float]:
    return {r[STEP]: r[TRAIN_LOSS] for r in records(run) if TRAIN_LOSS in r}


def train(out: Path, name: str, args: list[str], **kwargs) -> Path:
    run, log = out / name, out / f"{name}.log"
    finish(gptexp("gptexp.train", [*args, f"hydra.run.dir={run}"], log, **kwargs), log)
    return run


def stopped_at(out: Path, name: str, args: list[str], step: int, env: dict[str, str]) -> Path:
    """A run sent SIGTERM once it has logged ``step``; it saves and stops after that step."""
    run = out / name
    process = gptexp("gptexp.train", [*args, f"hydra.run.dir={run}"], out / f"{name}.log", env=env)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while max(step_losses(run), default=0) < step:
        if process.poll() is not None:
            raise RuntimeError(f"{name}: ended (exit code {process.returncode}) before step {step}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{name}: step {step} not reached in {RUN_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise RuntimeError(f"{name}: did not stop after SIGTERM") from None
    return run


def resumed(out: Path, run: Path, env: dict[str, str]) -> None:
    log = out / f"{run.name}.log"
    finish(gptexp("gptexp.resume", [f"run={run}"], log, env=env), log)


def compare_losses(a: Path, b: Path) -> tuple[bool, str, dict[str, Any]]:
    la, lb = step_losses(a), step_losses(b)
    differing = [s for s in lb if la.get(s) != lb[s]]
    worst = max((abs(la[s] - lb[s]) for s in differing if s in la), default=0.0)
    details = {"steps": len(lb), "differing_steps": len(differing), "max_abs_diff": worst}
    if set(la) != set(lb):
        return False, f"logged steps differ ({len(la)} vs {len(lb)})", details
    if differing:
        return False, f"{len(differing)} of {len(lb)} losses differ (max {worst:.3g})", details
    return True, f"all {len(lb)} per-step losses bit-identical", details


# ----------------------------------------------------------------------------- the checks


# The side-by-side: each process trains SIDE_STEPS steps and reads its loss back every
# SIDE_LOG_EVERY steps (nanoGPT's habit; gptexp's training.log_every). Time per step is the
# median over the windows between two such reads from step SIDE_WARMUP on: the first windows
# hold the compile and CUDA-graph recording. 150 steps: 12 windows, 3-9 s of steps a process.
SIDE_STEPS = 150
SIDE_LOG_EVERY = 10
SIDE_WARMUP = 30
SIDE_MODEL = "gpt2"  # the shape; without biases (the plain script has none, nor has nanoGPT's)
TARGET_RATIO = 0.95  # issue 20: gptexp's time per step at most 0.95x the plain script's
TARGET_MFU = 0.45  # ... and at least 45% MFU at batch 32 compiled


@dataclass(frozen=True)
class Point:
    """One row of the side-by-side: a batch size, eager or compiled (with a compile mode)."""

    batch: int
    compiled: bool
    mode: str = "default"  # training.compile_mode; the plain script runs only with default

    @property
    def name(self) -> str:
        how = "compiled" if self.compiled else "eager"
        return f"batch {self.batch}, {how}" + (f" {self.mode}" if self.mode != "default" else "")

    @property
    def with_plain(self) -> bool:
        return self.mode == "default"


def side_by_side_points() -> list[Point]:
    """Eager and compiled in alternation, the target MFU's point first; the other compile
    modes (gptexp only, against the plain script compiled) after them."""
    points = [Point(32, True), Point(8, False), Point(8, True), Point(32, False)]
    return points + [Point(batch, True, mode) for mode in COMPILE_MODES[1:] for batch in (32, 8)]


def window_ms(instants: list[tuple[int, float]]) -> float:
    """Median milliseconds per step between consecutive (step, instant) reads, from step
    SIDE_WARMUP on."""
    kept = sorted((step, at) for step, at in instants if step >= SIDE_WARMUP)
    per_step = [
        (b - a) * 1e3 / (t - s) for (s, a), (t, b) in zip(kept, kept[1:], strict=False) if t > s
    ]
    if not per_step:
        raise RuntimeError(f"fewer than two loss reads from step {SIDE_WARMUP} on")
    return statistics.median(per_step)


def plain_side(out: Path, corpus: Path, point: Point) -> float:
    """The plain script at ``point``: its ms per step."""
    shape = composed_model_config(SIDE_MODEL)
    name = f"plain-b{point.batch}-{'compiled' if point.compiled else 'eager'}"
    timings, log = out / f"{name}.json", out / f"{name}.log"
    command = [sys.executable, str(PLAIN_SCRIPT), "--data", str(corpus)]
    command += ["--steps", str(SIDE_STEPS), "--batch-size", str(point.batch)]
    command += ["--block-size", str(shape.block_size), "--n-layer", str(shape.n_layer)]
    command += ["--n-head", str(shape.n_head), "--n-embd", str(shape.n_embd)]
    command += ["--device", "cuda", "--dtype", "bf16", "--log-every", str(SIDE_LOG_EVERY)]
    command += ["--eval-batches", "1", "--timings", str(timings)]
    command += ["--compile"] if point.compiled else []
    finish(launch(command, log), log)
    t = json.loads(timings.read_text())
    return window_ms([(step, t["step_ends"][step - 1]) for step in t["logged_steps"]])


def gptexp_side(out: Path, corpus: Path, point: Point) -> tuple[float, int]:
    """``python -m gptexp.train`` at ``point`` (through the bench's probe, which records when
    each train record is written: its loss has been read back by then): its ms per step and
    the run's vocabulary size."""
    name = f"gptexp-b{point.batch}-{'compiled' if point.compiled else 'eager'}-{point.mode}"
    run, marks, log = out / name, out / f"{name}.marks.json", out / f"{name}.log"
    args = [f"model={SIDE_MODEL}", "model.bias=false", "data=text", f"data.path={corpus}"]
    args += ["training.precision=bf16", f"training.batch_size={point.batch}", *CUDA]
    args += [f"training.max_steps={SIDE_STEPS}", f"training.log_every={SIDE_LOG_EVERY}"]
    args += ["training.eval_every=0", "training.eval_batches=1", "checkpoint.enabled=false"]
    args += [f"training.compile={str(point.compiled).lower()}"]
    args += [f"training.compile_mode={point.mode}", f"hydra.run.dir={run}"]
    probe = ["gptexp.tools.bench.probe", str(marks), "gptexp.train", *args]
    finish(gptexp(probe[0], probe[1:], log), log)
    logs = json.loads(marks.read_text())["train_logs"]
    return window_ms([(step, at) for step, at in logs]), RunDirectory(run).read_status()[
        "vocab_size"
    ]


def side_by_side(
    out: Path, corpus: Path, point: Point, plain_first: bool, plain_ms: dict[int, float]
) -> Check:
    """Both sides at ``point`` (the plain script first when ``plain_first``), or gptexp alone
    for another compile mode, against the plain script compiled at the same batch size
    (``plain_ms``: batch -> ms per step of the plain script compiled, filled in here)."""
    plain: float | None = None
    if point.with_plain and plain_first:
        plain = plain_side(out, corpus, point)
    gptexp_ms, vocab = gptexp_side(out, corpus, point)
    if point.with_plain and not plain_first:
        plain = plain_side(out, corpus, point)
    if not point.with_plain:
        plain = plain_ms.get(point.batch)
    elif point.compiled and plain is not None:
        plain_ms[point.batch] = plain
    peak = cuda_peak_flops(torch.cuda.get_device_name(0), "bf16")  # the data sheet's
    row = side_by_side_row(point, plain, gptexp_ms, side_flops_per_token(vocab), peak)
    row["plain_first"] = plain_first if point.with_plain else None
    row["vocab_size"] = vocab
    ratio = f"{row['ratio']:.3f}x" if row["ratio"] else "no plain figure"
    result = f"{gptexp_ms:.1f} ms/step, {ratio} the plain script"
    return Check(f"side by side: {point.name}", True, result, {"side_by_side": row})


def side_flops_per_token(vocab: int) -> int:
    """Training FLOPs per token of the side-by-side's model (both sides train the same one);
    the model is built on the meta device: only its parameter count is needed."""
    shape = dataclasses.replace(composed_model_config(SIDE_MODEL), bias=False)
    with torch.device("meta"):
        parameters = GPT(shape, vocab).num_parameters()
    return flops_per_token(parameters, shape.n_layer, shape.n_embd, shape.block_size)


def side_by_side_row(
    point: Point,
    plain_ms: float | None,
    gptexp_ms: float,
    per_token: int,
    peak: float | None,
) -> dict[str, Any]:
    """A row of the side-by-side: both times per step, their ratio, both MFUs (against the
    data sheet's bf16 ``peak``; None where the GPU is not in gptexp's table) and the targets."""
    tokens_per_step = point.batch * composed_model_config(SIDE_MODEL).block_size

    def mfu_of(ms: float | None) -> float | None:
        if ms is None or not peak:
            return None
        return model_flops_utilisation(tokens_per_step / (ms / 1e3), per_token, peak, 1)

    ratio = gptexp_ms / plain_ms if plain_ms else None
    row = {
        "point": point.name,
        "batch_size": point.batch,
        "compiled": point.compiled,
        "compile_mode": point.mode,
        "plain": "same point" if point.with_plain else "compiled, default mode",
        "plain_ms_per_step": plain_ms,
        "gptexp_ms_per_step": gptexp_ms,
        "ratio": ratio,
        "plain_mfu": mfu_of(plain_ms),
        "gptexp_mfu": mfu_of(gptexp_ms),
        "peak_bf16_flops": peak,
        "meets_ratio_target": None if ratio is None else ratio <= TARGET_RATIO,
        "meets_mfu_target": None,
    }
    if point == Point(32, True) and row["gptexp_mfu"] is not None:
        row["meets_mfu_target"] = row["gptexp_mfu"] >= TARGET_MFU
    return row


def side_by_side_rows(checks: list[Check]) -> list[dict[str, Any]]:
    return [c.details["side_by_side"] for c in checks if "side_by_side" in c.details]


def side_by_side_table(rows: list[dict[str, Any]]) -> str:
    """The printed side-by-side: ms per step, the ratio and MFU of both sides, the targets."""

    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    def targets(row: dict[str, Any]) -> str:
        said = []
        if row["meets_ratio_target"] is not None:
            met = "met" if row["meets_ratio_target"] else "MISSED"
            said.append(f"<= {TARGET_RATIO}x {met}")
        if row["meets_mfu_target"] is not None:
            met = "met" if row["meets_mfu_target"] else "MISSED"
            said.append(f"MFU >= {TARGET_MFU:.0%} {met}")
        return ", ".join(said)

    header = ["gpt2 shape, bf16", "plain ms/step", "gptexp ms/step", "ratio"]
    header += ["plain MFU", "gptexp MFU", "targets"]
    lines = [
        [
            row["point"] + ("" if row["plain"] == "same point" else " (plain: compiled)"),
            number(row["plain_ms_per_step"], ".1f"),
            number(row["gptexp_ms_per_step"], ".1f"),
            number(row["ratio"], ".3f"),
            number(row["plain_mfu"], ".1%"),
            number(row["gptexp_mfu"], ".1%"),
            targets(row),
        ]
        for row in rows
    ]
    return text_table(header, lines)


def checkpoint_cost(out: Path) -> Check:
    """Stall of an asynchronous save of gpt2's model and AdamW state, and the verified load
    back onto the GPU (the second save: the first one allocates the snapshot buffers)."""
    device = torch.device("cuda")
    model = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True), 50304)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model(torch.zeros(1, 8, dtype=torch.long, device=device))[0].float().mean().backward()
    optimizer.step()
    manager = CheckpointManager(out / "checkpoint-cost", CheckpointConfig(keep_last=1))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 0}
    for step in (1, 2):
        state["step"] = step
        torch.cuda.synchronize()
        manager.save(state, step, None, ["periodic"], asynchronous=True)
    manager.wait()
    started = time.perf_counter()
    loaded = manager.load(manager.find("last"))
    model.load_state_dict(loaded["model"])
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    size = manager.find("last").bytes
    shutil.rmtree(manager.directory)  # 1.5 GB that nothing else reads
    details = {
        "bytes": size,
        "stall_s": manager.save_seconds[-1],
        "write_s": manager.write_seconds[-1],
        "load_s": load_s,
    }
    result = (
        f"{size / 1e9:.2f} GB: stall {manager.save_seconds[-1]:.2f} s, write "
        f"{manager.write_seconds[-1]:.2f} s (background), load {load_s:.2f} s"
    )
    return Check("checkpoint gpt2 + AdamW", True, result, details)


def exact_resume(out: Path, precision: str, stop_step: int, steps: int) -> Check:
    args = [*SPEED[:1], f"training.precision={precision}", "training.batch_size=4", *CUDA]
    args += [f"training.max_steps={steps}", "training.eval_every=0", "training.log_every=1"]
    args += ["training.deterministic=true", f"checkpoint.every_steps={steps}"]
    straight = train(out, f"{precision}-straight", args, env=DETERMINISTIC_ENV)
    stopped = stopped_at(out, f"{precision}-stopped", args, stop_step, DETERMINISTIC_ENV)
    resumed(out, stopped, DETERMINISTIC_ENV)
    ok, result, details = compare_losses(stopped, straight)
    if precision == "fp16":
        scales = [_final(run)["scaler"]["scale"] for run in (stopped, straight)]
        details["grad_scales"] = [float(s) for s in scales]
        if scales[0] != scales[1]:
            ok, result = False, f"{result}; GradScaler scale differs {details['grad_scales']}"
        else:
            result = f"{result}; GradScaler scale {float(scales[0]):g} carried through"
    name = f"{precision} SIGTERM at step {stop_step}, resume"
    return Check(name, ok, result, details)


def _final(run: Path) -> dict[str, Any]:
    manager = CheckpointManager(run / "checkpoints", CheckpointConfig())
    return manager.load(manager.find("last"))


def two_gpus(out: Path) -> Check:
    args = [*SPEED, *CUDA, "training.max_steps=30", "training.eval_every=0"]
    args += ["training.parallel=fsdp", "checkpoint.format=dcp", "checkpoint.every_steps=10"]
    run = train(out, "two-gpus-fsdp", args, nproc=2)
    status = RunDirectory(run).read_status()
    ok = status["status"] == "finished" and status["world_size"] == 2
    tokens_per_s = status.get(MEDIAN_TOKENS_PER_S) or 0.0
    result = f"{status['status']}, world size {status['world_size']}, {tokens_per_s:,.0f} tokens/s"
    return Check("2 GPUs torchrun fsdp + dcp", ok, result, {"tokens_per_s": tokens_per_s})


# Seconds each check is expected to take on one H200, for the budget. Estimates, not
# measurements of this code: the correctness checks from the ~3-minute run of the issue (whose
# compiled 60-step gpt2 run suggests a cold compile of ~50 s); a side-by-side process ~10 s of
# start-up and end (imports, CUDA, the model, the final evaluation), its steps at the issue's
# ms/step, and the cold compile (longer for the other modes: reduce-overhead records CUDA
# graphs, max-autotune tries kernels). By these, the correctness checks and the four points take
# ~445 s; the other modes run when the time left allows.
ESTIMATE_S = {"checkpoint": 15.0, "bf16 resume": 60.0, "fp16 resume": 40.0, "2 GPUs": 60.0}
START_S, COMPILE_S = 10.0, {"default": 50.0, "reduce-overhead": 70.0}
MS_PER_STEP = {8: 20.0, 32: 60.0}  # eager, the figures (rounded up)


def side_by_side_estimate(point: Point) -> float:
    processes = 2 if point.with_plain else 1
    compile_s = COMPILE_S.get(point.mode, 150.0) if point.compiled else 0.0
    return processes * (START_S + SIDE_STEPS * MS_PER_STEP[point.batch] / 1e3 + compile_s)


@dataclass(frozen=True)
class Planned:
    name: str
    estimate_s: float  # on one H200, for the budget
    run: Callable[[], Check]
    measurement: bool  # a measurement left out for the budget is not a failed check


def plan(out: Path, corpus: Path) -> list[Planned]:
    """The checks in order: correctness first, then the side-by-side, the other compile
    modes last (the budget cuts from the end)."""
    checks = [
        Planned(
            "checkpoint gpt2 + AdamW", ESTIMATE_S["checkpoint"], lambda: checkpoint_cost(out), False
        ),
        Planned(
            "bf16 SIGTERM at step 100, resume",
            ESTIMATE_S["bf16 resume"],
            lambda: exact_resume(out, "bf16", 100, 120),
            False,
        ),
        Planned(
            "fp16 SIGTERM at step 20, resume",
            ESTIMATE_S["fp16 resume"],
            lambda: exact_resume(out, "fp16", 20, 30),
            False,
        ),
    ]
    if torch.cuda.device_count() >= 2:
        checks.append(
            Planned(
                "2 GPUs torchrun fsdp + dcp", ESTIMATE_S["2 GPUs"], lambda: two_gpus(out), False
            )
        )
    plain_ms: dict[int, float] = {}
    for i, point in enumerate(side_by_side_points()):
        checks.append(
            Planned(
                f"side by side: {point.name}",
                side_by_side_estimate(point),
                functools.partial(side_by_side, out, corpus, point, i % 2 == 0, plain_ms),
                True,
            )
        )
    return checks


def side_by_side_corpus(out: Path, corpus: Path | None) -> tuple[Path, str]:
    """The text both sides train on: ``--corpus`` (tiny-shakespeare, say), else the default
    corpus written to a file (no download: a GPU machine may be offline)."""
    if corpus is not None:
        return corpus.resolve(), str(corpus.resolve())
    path = out / "pydocs.txt"
    path.write_text(python_docs_text(), encoding="utf-8")
    return path.resolve(), "pydocs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gptexp.gpucheck", description=__doc__)
    parser.add_argument("--corpus", type=Path, help="the side-by-side's text (default: pydocs)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.corpus is not None and not args.corpus.is_file():
        print(
            f"error: --corpus {args.corpus}: no such file; give a UTF-8 text file", file=sys.stderr
        )
        sys.exit(2)
    reason = skip_reason()
    if reason is not None:
        print(f"gpu-check: skipped: {reason}; nothing to check on this machine")
        return
    out = Path("outputs") / "gpu-check" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True)
    corpus, corpus_name = side_by_side_corpus(out, args.corpus)
    print(f"gpu-check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPUs)")
    started = time.monotonic()
    results: list[Check] = []
    for planned in plan(out, corpus):
        if time.monotonic() - started + planned.estimate_s > BUDGET_S:
            why = (
                f"not run: ~{planned.estimate_s:.0f} s more would pass the {BUDGET_S:.0f} s budget"
            )
            results.append(Check(planned.name, planned.measurement, why, {}))
            print(f"  {planned.name}: {why}", flush=True)
            continue
        try:
            results.append(planned.run())
        except (RuntimeError, OSError, KeyError, ValueError, subprocess.SubprocessError) as error:
            results.append(Check(planned.name, False, f"error: {error}", {}))
        print(f"  {results[-1].name}: {results[-1].result}", flush=True)
    rows = [[c.name, "ok" if c.ok else "FAILED", c.result] for c in results]
    print(text_table(["check", "", "result"], rows))
    side = side_by_side_rows(results)
    if side:
        print(
            f"\nside by side ({corpus_name}, {SIDE_STEPS} steps, ms/step from step {SIDE_WARMUP}):"
        )
        print(side_by_side_table(side))
    summary = {
        "device": torch.cuda.get_device_name(0),
        "seconds": time.monotonic() - started,
        "checks": [asdict(c) for c in results],
        "side_by_side": {
            "corpus": corpus_name,
            "model": f"{SIDE_MODEL} shape, bias=false",
            "steps": SIDE_STEPS,
            "log_every": SIDE_LOG_EVERY,
            "timed_from_step": SIDE_WARMUP,
            "targets": {"ratio_at_most": TARGET_RATIO, "mfu_at_batch_32_compiled": TARGET_MFU},
            "rows": side,
        },
    }
    atomic_write_json(out / "results.json", summary)
    print(f"results and run directories: {out} ({time.monotonic() - started:.0f} s)")
    sys.exit(0 if all(c.ok for c in results) else 1)


if __name__ == "__main__":
    main()
