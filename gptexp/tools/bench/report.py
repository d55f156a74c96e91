"""Medians, targets and the printed table of a bench run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gptexp.tools.bench.measure import WholeRun, median
from gptexp.tools.bench.plan import BenchPlan


@dataclass
class Measurements:
    import_torch_s: list[float] = field(default_factory=list)
    gptexp: list[WholeRun] = field(default_factory=list)
    plain: list[WholeRun] = field(default_factory=list)
    settings: dict[str, list[WholeRun]] = field(default_factory=dict)
    matmul_flops_per_s: dict[str, list[float]] = field(default_factory=dict)
    resume_first_step_s: list[float] = field(default_factory=list)
    eval_entry_s: list[tuple[float, float]] = field(default_factory=list)


# A ratio of the pairs is their median; with fewer pairs than this a median is a mean of
# two (one outlier makes it anything), so no ratio is given, only each pair's.
MIN_PAIRS_FOR_RATIO = 3


def pairs_ratio(ratios: list[float]) -> float | None:
    """The median of the pairs' ratios, or None with fewer than MIN_PAIRS_FOR_RATIO pairs."""
    return median(ratios) if len(ratios) >= MIN_PAIRS_FOR_RATIO else None


def ratio_cell(ratio: float | None, each: list[float]) -> str:
    """A pairs' ratio for the table: the median, or each pair's where they are too few."""
    if ratio is not None:
        return f"{ratio:.3f}"
    return f"n/a ({len(each)} pairs: " + ", ".join(f"{r:.2f}" for r in each) + ")"


def _phase_medians(runs: list[WholeRun]) -> dict[str, float]:
    return {name: median([r.phases[name] for r in runs]) for name in runs[0].phases}


def summarise(plan: BenchPlan, m: Measurements, extra: dict[str, Any]) -> dict[str, Any]:
    """The results' figures (medians over the repeats, ratios of pairs) by part."""
    g, p = m.gptexp, m.plain
    return {
        **_process_figures(m, extra),
        **_speed_figures(plan, m, extra),
        "checkpoint": {"tiny": extra["tiny"], "gpt2_124m": extra["gpt2"]},
        "guard": extra["guard"],
        "eval": _eval_figures(plan, m, extra),
        "memory": {
            "gptexp_peak_rss_bytes": int(median([r.max_rss_bytes for r in g])),
            "plain_peak_rss_bytes": int(median([r.max_rss_bytes for r in p])),
        },
    }


def _process_figures(m: Measurements, extra: dict[str, Any]) -> dict[str, Any]:
    """Whole process, per step, start-up and the final sample, against the plain script."""
    g, p = m.gptexp, m.plain
    wall_ratio = [a.wall_s / b.wall_s for a, b in zip(g, p, strict=True)]
    step_ratio = [median(a.step_s) / median(b.step_s) for a, b in zip(g, p, strict=True)]
    g_step, p_step = median([median(r.step_s) for r in g]), median([median(r.step_s) for r in p])
    import_torch = median(m.import_torch_s)
    fresh = median([r.first_step_s for r in g])
    sample_share = [r.phases["final sample"] / r.wall_s for r in g]
    return {
        "whole_process": {
            "gptexp_wall_s": median([r.wall_s for r in g]),
            "plain_wall_s": median([r.wall_s for r in p]),
            "gptexp_over_plain": pairs_ratio(wall_ratio),
            "gptexp_over_plain_each": wall_ratio,
            "gptexp_wall_s_each": [r.wall_s for r in g],
            "plain_wall_s_each": [r.wall_s for r in p],
            # Seconds per phase, medians over the runs; each side's phases add up to its wall.
            "gptexp_phases_s": _phase_medians(g),
            "plain_phases_s": _phase_medians(p),
            "gptexp_import_profile_s": extra["import_profile"],
            # The plain script trains the same model on the same batches: equal losses show it.
            "same_losses_as_plain": g[-1].losses == p[-1].losses,
            "same_val_loss_as_plain": g[-1].val_loss == p[-1].val_loss,
        },
        "per_step": {
            "gptexp_step_s": g_step,
            "plain_step_s": p_step,
            "gptexp_over_plain": pairs_ratio(step_ratio),
            "gptexp_over_plain_each": step_ratio,
            # train_step alone, from metrics.jsonl: the rest of a step is the loop's own cost.
            "gptexp_logged_step_s": median([median(r.logged_step_s) for r in g]),
        },
        "startup": {
            "import_torch_s": import_torch,
            "import_torch_s_each": m.import_torch_s,
            "fresh_first_step_s": fresh,
            "plain_first_step_s": median([r.first_step_s for r in p]),
            "fresh_over_import_torch": fresh / import_torch,
            "resume_first_step_s": median(m.resume_first_step_s),
            "resume_over_fresh": median(m.resume_first_step_s) / fresh,
        },
        "sample": {
            "final_sample_s": median([r.phases["final sample"] for r in g]),
            "share_of_wall": median(sample_share),
            **extra["sample_in_process"],
        },
    }


def _speed_figures(plan: BenchPlan, m: Measurements, extra: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s per setting and the share of a matmul's FLOP/s."""
    g, p = m.gptexp, m.plain
    g_step, p_step = median([median(r.step_s) for r in g]), median([median(r.step_s) for r in p])
    flops = extra["flops_per_token"]
    peaks = {name: median(v) for name, v in m.matmul_flops_per_s.items()}
    g_tokens = plan.tokens_per_step / g_step
    settings = {"fp32": g_tokens} | {
        name: plan.tokens_per_step / median([median(r.step_s) for r in runs])
        for name, runs in m.settings.items()
    }
    best = max(settings, key=settings.__getitem__)
    return {
        "throughput": {
            "tokens_per_s_by_setting": settings,
            "best_setting": best,
            "best_over_plain": settings[best] / (plan.tokens_per_step / p_step),
            "compile_break_even": extra.get("compile_break_even"),
        },
        "efficiency": {
            "matmul_flops_per_s": peaks,
            "flops_per_token": flops,
            "fp32_share_of_peak": g_tokens * flops / peaks["fp32"],
            "plain_share_of_peak": plan.tokens_per_step / p_step * flops / peaks["fp32"],
        },
    }


def _eval_figures(plan: BenchPlan, m: Measurements, extra: dict[str, Any]) -> dict[str, Any]:
    """The eval entry point's wall times at two batch counts and its marginal tokens/s."""
    low, high = plan.eval_entry
    eval_extra = median([b - a for a, b in m.eval_entry_s])
    return {
        "entry_wall_s": {
            str(low): median([a for a, _ in m.eval_entry_s]),
            str(high): median([b for _, b in m.eval_entry_s]),
        },
        # The difference of two batch counts is the evaluation alone (None under noise).
        "entry_marginal_tokens_per_s": (high - low) * plan.tokens_per_step / eval_extra
        if eval_extra > 0
        else None,
        "evaluate_loss_tokens_per_s": extra["eval_engine"],
        "batches": [low, high],
    }


def targets(results: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """The targets with their values; at --quick sizes no verdict (``holds`` None)."""
    w, s, st, sa, c = (
        results[k] for k in ("whole_process", "per_step", "startup", "sample", "checkpoint")
    )
    gpt2 = c["gpt2_124m"]
    rows = [
        ("whole process <= 0.95x the plain script", w["gptexp_over_plain"], "<=", 0.95),
        ("per step <= 1.00x the plain script", s["gptexp_over_plain"], "<=", 1.00),
        ("start to first step <= 1.5x import torch", st["fresh_over_import_torch"], "<=", 1.5),
        ("final sample <= 5% of the run's wall time", sa["share_of_wall"], "<=", 0.05),
        ("resume to first step <= 1.5x fresh start", st["resume_over_fresh"], "<=", 1.5),
        (
            "124M checkpoint stall (2nd save on) <= 10% of a plain torch.save",
            gpt2["stall_over_plain_save"] if gpt2 else None,
            "<=",
            0.10,
        ),
    ]
    out = []
    for name, value, op, limit in rows:
        holds = None
        if value is not None and not quick:
            holds = value >= limit if op == ">=" else value <= limit
        out.append({"target": name, "value": value, "limit": f"{op} {limit}", "holds": holds})
    return out


# ----------------------------------------------------------------------------- the table


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def breakdown_table(w: dict[str, Any]) -> list[str]:
    """Seconds per phase, gptexp next to the plain script (medians)."""
    g, p = w["gptexp_phases_s"], w["plain_phases_s"]
    rows: list[tuple[str, ...]] = [("phase (s, medians)", "gptexp", "plain", "difference")]
    for name in g | p:
        a, b = g.get(name), p.get(name)
        rows.append(
            (
                name,
                "" if a is None else f"{a:.3f}",
                "" if b is None else f"{b:.3f}",
                f"{(a or 0.0) - (b or 0.0):+.3f}",
            )
        )
    rows.append(
        (
            "whole process",
            f"{w['gptexp_wall_s']:.3f}",
            f"{w['plain_wall_s']:.3f}",
            f"{w['gptexp_wall_s'] - w['plain_wall_s']:+.3f}",
        )
    )
    lines = _columns(rows)
    profile = ", ".join(f"{k} {v:.2f}" for k, v in w["gptexp_import_profile_s"].items())
    lines.append(f"imports of gptexp.train (cumulative s): {profile}")
    return lines


def table(results: dict[str, Any]) -> str:
    """The printed report: the figures against their yardsticks, the phase breakdown, the
    compile break-even, what was skipped, and the targets' verdicts."""
    rows = [
        ("figure (medians)", "gptexp", "yardstick", "ratio"),
        *_process_rows(results),
        *_speed_rows(results),
        *_checkpoint_rows(results["checkpoint"]),
        _eval_row(results["eval"]),
    ]
    machine = results["machine"]
    lines = [
        f"{machine['cpu']}, {machine['threads']} threads, flags: "
        f"{' '.join(machine['flags']) or 'n/a'} (native bf16: {machine['native_bf16']}); "
        f"load average {results['load_average']['before']}",
        "",
        *_columns(rows),
        "",
        *breakdown_table(results["whole_process"]),
        "",
    ]
    return "\n".join(lines + _footer_lines(results))


def _process_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Whole process, per step, start-up and the final sample, against the plain script."""
    w, s, st, sa = (results[k] for k in ("whole_process", "per_step", "startup", "sample"))
    settings = results["settings"]
    model = settings["model"]
    return [
        (
            f"whole process, {model}, {settings['steps']} steps",
            f"{w['gptexp_wall_s']:.2f} s",
            f"{w['plain_wall_s']:.2f} s plain script",
            ratio_cell(w["gptexp_over_plain"], w["gptexp_over_plain_each"]),
        ),
        (
            "per step",
            f"{s['gptexp_step_s'] * 1000:.1f} ms",
            f"{s['plain_step_s'] * 1000:.1f} ms plain script",
            ratio_cell(s["gptexp_over_plain"], s["gptexp_over_plain_each"]),
        ),
        (
            "command to first step",
            f"{st['fresh_first_step_s']:.2f} s",
            f"{st['import_torch_s']:.2f} s import torch",
            f"{st['fresh_over_import_torch']:.2f}",
        ),
        (
            "final sample (200 tokens)",
            f"{sa['final_sample_s'] * 1000:.0f} ms",
            f"{w['gptexp_wall_s']:.1f} s run",
            f"{sa['share_of_wall']:.3f}",
        ),
        (
            "  sample in-process: generate",
            f"{sa['kv_cache_s'] * 1000:.0f} ms",
            f"{sa['no_cache_s'] * 1000:.0f} ms no KV cache",
            f"{sa['kv_cache_s'] / sa['no_cache_s']:.2f}",
        ),
        (
            "command to first step, resume",
            f"{st['resume_first_step_s']:.2f} s",
            f"{st['fresh_first_step_s']:.2f} s fresh",
            f"{st['resume_over_fresh']:.2f}",
        ),
    ]


def _speed_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Tokens/s per setting, FLOP/s against a matmul, and the spike guard's step."""
    s, th, e = results["per_step"], results["throughput"], results["efficiency"]
    settings = results["settings"]
    rows: list[tuple[str, ...]] = []
    plain_tokens = settings["tokens_per_step"] / s["plain_step_s"]
    for name, value in th["tokens_per_s_by_setting"].items():
        rows.append(
            (
                f"train tokens/s, {name}",
                f"{value:,.0f}",
                f"{plain_tokens:,.0f} plain fp32",
                f"{value / plain_tokens:.3f}",
            )
        )
    rows.append(
        (
            "train FLOP/s, fp32",
            _si(e["fp32_share_of_peak"] * e["matmul_flops_per_s"]["fp32"], "FLOP/s"),
            _si(e["matmul_flops_per_s"]["fp32"], "FLOP/s") + " matmul",
            f"{e['fp32_share_of_peak']:.1%}",
        )
    )
    guard = results["guard"]
    rows.append(
        (
            "step with training.guard.action=skip",
            f"{guard['skip_step_s'] * 1000:.1f} ms",
            f"{guard['off_step_s'] * 1000:.1f} ms guard off",
            f"{guard['skip_over_off']:.3f}",
        )
    )
    return rows


def _checkpoint_rows(c: dict[str, Any]) -> list[tuple[str, ...]]:
    """Save stalls and load times against plain torch.save / torch.load, per model size."""
    rows: list[tuple[str, ...]] = []
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
            (
                f"checkpoint load, {label}",
                f"{cost['load_s'] * 1000:,.1f} ms",
                f"{cost['plain_torch_load_s'] * 1000:,.1f} ms torch.load",
                f"{cost['load_s'] / cost['plain_torch_load_s']:.2f}",
            ),
        ]
    return rows


def _eval_row(ev: dict[str, Any]) -> tuple[str, ...]:
    """Eval tokens/s of the entry point (its marginal rate) against evaluate_loss itself."""
    marginal = ev["entry_marginal_tokens_per_s"]
    return (
        "eval tokens/s, entry point, marginal",
        f"{marginal:,.0f}" if marginal else "n/a (noise)",
        f"{ev['evaluate_loss_tokens_per_s']:,.0f} evaluate_loss",
        f"{marginal / ev['evaluate_loss_tokens_per_s']:.3f}" if marginal else "",
    )


def _footer_lines(results: dict[str, Any]) -> list[str]:
    """The compile break-even, what was skipped, the bench's parts and the verdicts."""
    lines: list[str] = []
    th = results["throughput"]
    be = th["compile_break_even"]
    if be:
        lines.append(
            f"torch.compile: cold compile {be['cold_compile_s']:.1f} s, step "
            f"{be['eager_step_s'] * 1000:.1f} -> {be['compiled_step_s'] * 1000:.1f} ms: "
            f"pays after {be['break_even_steps']:.0f} steps"
        )
    for reason in results["skipped"]:
        lines.append(f"skipped: {reason}")
    parts = ", ".join(f"{k} {v:.0f}" for k, v in results["bench_parts_s"].items())
    lines.append(f"the bench's parts (s): {parts}")
    lines.append("")
    for target in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "--  "}[target["holds"]]
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"{verdict}  {target['target']}: {value} ({target['limit']})")
    if results["mode"] == "quick":
        lines.append("(--quick: toy sizes, no verdicts)")
    return lines
