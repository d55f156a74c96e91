"""``python -m gptexp.bench [--corpus PATH] [--quick] [--compile] [--out DIR]``.

gptexp's costs as ratios to what plain PyTorch does on the same machine, in the same run. A
shared machine's speed drifts from minute to minute, so every figure is measured next to its
yardstick, in alternation, and reported as a median over repeats:

1. the whole process: ``python -m gptexp.train`` from exec to exit next to the standalone
   plain script ``plain_train.py`` doing the same work (same model, batches, steps, one
   evaluation), with the breakdown of both into phases; per step; start-up next to
   ``import torch``; the end-of-run sample;
2. throughput per setting (fp32; bf16 autocast where the CPU has native bf16; torch.compile
   with ``--compile``, and its break-even) and efficiency against a matmul's FLOP/s;
3. checkpoint cost (stall per save, first and later, load time) for the tiny model and the
   124M GPT-2 shape, next to plain ``torch.save``/``torch.load``;
4. resume start-up and ``python -m gptexp.eval`` throughput.

Results: ``<out>/<date>_<time>.json`` (``outputs/bench`` by default), with the CPU's model and
flags; a table is printed. ``--quick`` runs every part at toy sizes (~40 s, a smoke test of
the bench itself: no verdicts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_FORMAT = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gptexp.bench",
        description="Measure gptexp's speed and checkpoint cost as ratios to plain PyTorch.",
    )
    parser.add_argument("--corpus", type=Path, help="a UTF-8 text file (default: pydocs)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, ~40 s: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="results dir")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: the usable cores)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile (~30 s cold per run)"
    )
    return parser.parse_args(argv)


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# The short run with a final checkpoint: resumed for the start-up figures, then evaluated.
SHORT_RUN = "with-checkpoint"


class PartClock:
    """Seconds per part of the bench (the bench's own length is one of its goals)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str, message: str) -> Iterator[None]:
        self.say(message)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def _measure_commands(plan, corpus: Path, workdir: Path, clock: PartClock, m) -> dict[str, Any]:
    """The subprocess parts: whole-process pairs (with the matmul peaks in alternation), one
    run per setting, resume start-ups; returns the import profile."""
    import torch

    from gptexp.tools.bench import measure as mz

    settings: dict[str, tuple[str, bool]] = {}
    if plan.bf16:
        settings["bf16"] = ("bf16", False)
    if plan.compile:
        settings["fp32+compile"] = ("fp32", True)
    for pair in range(plan.pairs):
        message = f"pair {pair + 1}/{plan.pairs}: import torch, gptexp.train, plain script"
        with clock.part("whole-process pairs", message):
            m.import_torch_s.append(mz.run_child(["-c", "import torch"], workdir).wall_s)
            m.gptexp.append(mz.gptexp_run(plan, corpus, workdir / f"fp32-{pair}", workdir))
            m.plain.append(mz.plain_run(plan, corpus, workdir))
            dtypes = [(torch.float32, "fp32")] + ([(torch.bfloat16, "bf16")] if plan.bf16 else [])
            for dtype, name in dtypes:  # the peaks in alternation with the training
                m.matmul_flops_per_s.setdefault(name, []).append(
                    mz.matmul_flops_per_s(dtype, plan.matmul_size)
                )
    for name, (precision, compile) in settings.items():
        with clock.part(f"setting {name}", f"setting {name}: one gptexp.train run"):
            m.settings[name] = [
                mz.gptexp_run(plan, corpus, workdir / name, workdir, precision, compile)
            ]
    message = "start-up: resume (a short run with a final checkpoint, extended); imports"
    short = workdir / SHORT_RUN
    with clock.part("resume and imports", message):
        mz.gptexp_run(plan, corpus, short, workdir, steps=plan.short_steps, checkpoint=True)
        for _ in range(plan.resume_repeats):
            steps = plan.short_steps + 2 * len(m.resume_first_step_s)  # each resume adds 2
            m.resume_first_step_s.append(mz.resume_first_step(plan, short, steps, workdir))
        torch.set_num_threads(plan.threads)
        extra: dict[str, Any] = {"import_profile": mz.import_profile(workdir)}
    return extra


def measure(plan, corpus: Path, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Every part of the bench in order, then the results (settings and figures)."""
    import torch

    from gptexp.core.config import DataConfig
    from gptexp.data.corpus import prepare_corpus
    from gptexp.tools.bench import measure as mz
    from gptexp.tools.bench.report import Measurements, summarise

    torch.set_num_threads(plan.threads)
    m = Measurements()
    clock = PartClock(say)
    extra = _measure_commands(plan, corpus, workdir, clock, m)
    short = workdir / SHORT_RUN

    with clock.part("eval", "eval: python -m gptexp.eval, two batch counts in alternation"):
        low, high = plan.eval_entry
        for _ in range(plan.eval_repeats):
            m.eval_entry_s.append(
                (
                    mz.eval_entry_seconds(short, low, workdir),
                    mz.eval_entry_seconds(short, high, workdir),
                )
            )
        data = prepare_corpus(
            DataConfig(name="text", path=str(corpus)), plan.model_config().block_size
        )
        from gptexp.model.gpt import GPT

        torch.manual_seed(0)
        model = GPT(plan.model_config(), data.tokenizer.vocab_size)
        extra["eval_engine"] = mz.eval_in_process(plan, model, data.val)
        extra["sample_in_process"] = mz.sample_in_process(model, 200)
        extra["flops_per_token"] = mz.training_flops_per_token(model)
    if plan.compile:
        with clock.part("compile break-even", "torch.compile break-even (in-process)"):
            extra["compile_break_even"] = mz.compile_break_even(plan, data.tokenizer.vocab_size)

    with clock.part("guard", "spike guard: off vs skip, in-process, in alternation"):
        extra["guard"] = mz.guard_overhead(plan, corpus, workdir, plan.guard_steps)

    with clock.part("checkpoint tiny", "checkpoint cost: tiny"):
        extra["tiny"] = mz.tiny_checkpoint_cost(plan, corpus, workdir)
    extra["gpt2"] = None
    if plan.gpt2:
        with clock.part("checkpoint 124M", "checkpoint cost: 124M GPT-2 shape"):
            extra["gpt2"] = mz.gpt2_checkpoint_cost(plan, workdir)

    shape = plan.model_config()
    results: dict[str, Any] = {
        "settings": {
            "model": plan.model_name,
            "shape": shape.__dict__,
            "vocab_size": data.tokenizer.vocab_size,
            "batch_size": plan.batch_size,
            "tokens_per_step": plan.tokens_per_step,
            "steps": plan.steps,
            "pairs": plan.pairs,
            "eval_batches": plan.eval_batches,
            "threads": plan.threads,
            "matmul_size": plan.matmul_size,
        }
    }
    results.update(summarise(plan, m, extra))
    results["bench_parts_s"] = clock.seconds
    return results


def run_bench(args: argparse.Namespace, say: Callable[[str], None] = print) -> Path:
    from gptexp.data.sources import python_docs_text
    from gptexp.tools.bench.measure import BenchError
    from gptexp.tools.bench.plan import BenchPlan, cpu_flags, machine_info
    from gptexp.tools.bench.report import table, targets

    threads = args.threads or len(os.sched_getaffinity(0))
    flags = cpu_flags()
    plan = BenchPlan.make(args.quick, threads, args.compile, flags)
    if args.corpus is not None and not args.corpus.is_file():
        raise BenchError(f"--corpus {args.corpus}: no such file")
    load_before = load_average()
    if load_before and load_before[0] > 0.5 * threads:
        say(
            f"note: load average {load_before[0]} on {threads} threads: the machine is busy, "
            "figures will be noisy"
        )
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gptexp-bench-"))
    try:
        corpus = args.corpus.resolve() if args.corpus is not None else workdir / "pydocs.txt"
        if args.corpus is None:  # both sides read the same file
            corpus.write_text(python_docs_text(), encoding="utf-8")
        results: dict[str, Any] = {
            "format": BENCH_FORMAT,
            "date": datetime.now().isoformat(timespec="seconds"),
            "mode": plan.mode,
            "corpus": str(args.corpus.resolve()) if args.corpus else "pydocs",
            "machine": machine_info(threads, flags),
            "skipped": list(plan.skipped),
        }
        results.update(measure(plan, corpus, workdir, say))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["targets"] = targets(results, quick=plan.mode == "quick")
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
    from gptexp.tools.bench.measure import BenchError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run_bench(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
