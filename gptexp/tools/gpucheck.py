"""``python -m gptexp.gpucheck`` (``make gpu-check``): does gptexp work, and how fast, on this
machine's GPU? A few minutes on one GPU.

1. speed: ``model=gpt2`` in bf16 (fused AdamW, SDPA attention), without and with
   ``torch.compile``: tokens/s and MFU from the run's own metrics;
2. checkpoints: the training stall of an asynchronous save of the gpt2 state and the time to
   verify and load it back onto the GPU;
3. exact resume: a run stopped by SIGTERM at step 100 and resumed logs the per-step losses of
   the uninterrupted run, bit for bit (deterministic kernels on);
4. fp16: the same through a resume with the GradScaler, whose scale must survive it;
5. two GPUs (where there are two): torchrun with FSDP and sharded checkpoints finishes.

Every check trains through the real entry points (``python -m gptexp.train`` / ``resume``)
into ``outputs/gpu-check/<date>_<time>/``, prints one table and writes ``results.json``
there. Without CUDA it says why it does nothing and exits 0. Exit 1 when a check fails.
"""

from __future__ import annotations

import os
import shutil
import signal
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
from gptexp.core.config import CheckpointConfig, ModelConfig
from gptexp.core.fsio import atomic_write_json
from gptexp.model.gpt import GPT
from gptexp.observe.metrics import MEDIAN_TOKENS_PER_S, STEP, TRAIN_LOSS, read_metrics
from gptexp.observe.rundir import RunDirectory
from gptexp.observe.tables import text_table
from gptexp.training.mfu import cuda_peak_flops, flops_per_token
from gptexp.training.mfu import mfu as model_flops_utilisation

BUDGET_S = 300.0  # the whole check; a check that would start after it is reported as not run
RUN_TIMEOUT_S = 150.0  # one training process
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


def speed(out: Path, compile_: bool) -> Check:
    args = [*SPEED, *CUDA, "training.max_steps=60", "training.eval_every=0"]
    args += ["training.log_every=10", "checkpoint.enabled=false", f"training.compile={compile_}"]
    run = train(out, f"speed-compile-{compile_}", args)
    status = RunDirectory(run).read_status()
    tokens_per_s = status[MEDIAN_TOKENS_PER_S]
    cfg = ModelConfig(**status["config"]["model"])
    per_token = flops_per_token(
        GPT(cfg, status["vocab_size"]).num_parameters(), cfg.n_layer, cfg.n_embd, cfg.block_size
    )
    peak = cuda_peak_flops(torch.cuda.get_device_name(0), "bf16")  # the data sheet's
    mfu = model_flops_utilisation(tokens_per_s, per_token, peak, 1) if peak else None
    result = f"{tokens_per_s:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else "")
    details = {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_bf16_flops": peak}
    return Check(f"gpt2 bf16 compile={compile_}", True, result, details)


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


def plan(out: Path) -> list[tuple[str, Callable[[], Check]]]:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("gpt2 bf16 compile=False", lambda: speed(out, False)),
        ("gpt2 bf16 compile=True", lambda: speed(out, True)),
        ("checkpoint gpt2 + AdamW", lambda: checkpoint_cost(out)),
        ("bf16 SIGTERM at step 100, resume", lambda: exact_resume(out, "bf16", 100, 120)),
        ("fp16 SIGTERM at step 20, resume", lambda: exact_resume(out, "fp16", 20, 30)),
    ]
    if torch.cuda.device_count() >= 2:
        checks.append(("2 GPUs torchrun fsdp + dcp", lambda: two_gpus(out)))
    return checks


def main() -> None:
    reason = skip_reason()
    if reason is not None:
        print(f"gpu-check: skipped: {reason}; nothing to check on this machine")
        return
    out = Path("outputs") / "gpu-check" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True)
    print(f"gpu-check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPUs)")
    started = time.monotonic()
    results: list[Check] = []
    for name, check in plan(out):
        if time.monotonic() - started > BUDGET_S:
            results.append(Check(name, False, f"not run: the {BUDGET_S:.0f} s budget is spent", {}))
            continue
        try:
            results.append(check())
        except (RuntimeError, OSError, KeyError, subprocess.SubprocessError) as error:
            results.append(Check(name, False, f"error: {error}", {}))
        print(f"  {results[-1].name}: {results[-1].result}", flush=True)
    rows = [[c.name, "ok" if c.ok else "FAILED", c.result] for c in results]
    print(text_table(["check", "", "result"], rows))
    summary = {
        "device": torch.cuda.get_device_name(0),
        "seconds": time.monotonic() - started,
        "checks": [asdict(c) for c in results],
    }
    atomic_write_json(out / "results.json", summary)
    print(f"results and run directories: {out} ({time.monotonic() - started:.0f} s)")
    sys.exit(0 if all(c.ok for c in results) else 1)


if __name__ == "__main__":
    main()
