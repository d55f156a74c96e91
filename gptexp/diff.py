"""``python -m gptexp.diff <run A> <run B> [--json] [--replay]``: where exactly two runs part.

Training is deterministic (same hardware, thread count and world size), so two runs either
agree bit for bit or part at a definite point. The report reads the two run directories only
and says, section by section:

- config: the keys whose values differ, and apart from them the keys that cannot change the
  numbers (W&B, progress bar, samples, paths, checkpoint policy);
- lineage: the common ancestor and the fork step, following the ``parent`` links of forks;
- metrics: the first logged step at which a shared metric differs (exact equality);
- checkpoints: the last bit-identical common checkpoint and the first that differs, with the
  tensors that differ most;
- replay (``--replay``): both configs trained again in this process, update by update, from
  the last state the runs share, up to the first update after which the parameters differ.

Exit status: 0 when the runs are identical over their common steps, 1 when they diverge, 2 on
bad input (a path that is not a run, an unreadable file).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from gptexp.checkpoint.comparison import compare_checkpoints, holds_checkpoint
from gptexp.core.cli import command_logging, parse_options, run_command
from gptexp.core.errors import ConfigError
from gptexp.observe.divergence import RunInfo, config_difference, first_metric_divergence, load_run
from gptexp.observe.lineage import lineage
from gptexp.run.replay import replay
from gptexp.training.speed import prepare_command_process

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the report


def diff_runs(a: RunInfo, b: RunInfo, *, with_replay: bool = False) -> dict[str, Any]:
    """The whole comparison as one JSON-ready dict (what ``--json`` prints)."""
    changed, inert = config_difference(a, b)
    family = lineage(a.run, b.run, holds_checkpoint)
    metrics = first_metric_divergence(a.records, b.records)
    checkpoints = compare_checkpoints(a.run, b.run)
    replayed = replay(a, b, checkpoints, family) if with_replay else None
    identical = (
        metrics["first"] is None
        and checkpoints["first_different_step"] is None
        and (replayed is None or replayed["first_different_update"] is None)
    )
    return {
        "identical": identical,
        "a": {"run": str(a.run.path), "status": a.status.get("status"), "step": a.last_step},
        "b": {"run": str(b.run.path), "status": b.status.get("status"), "step": b.last_step},
        "config": changed,
        "config_inert": inert,
        "lineage": family,
        "first_metric_divergence": metrics["first"],
        "metric_divergence_by_key": metrics["by_key"],
        "metrics_identical_through": metrics["identical_through"],
        "metrics_common_steps": metrics["common_steps"],
        "checkpoints": checkpoints,
        "replay": replayed,
    }


def _pairs(rows: list[dict[str, Any]]) -> str:
    return "; ".join(f"{row['key']}: {row['a']!r} vs {row['b']!r}" for row in rows)


def _tensor_lines(rows: list[dict[str, Any]], indent: str) -> list[str]:
    width = max((len(row["name"]) for row in rows), default=0)
    return [
        f"{indent}{row['name'].ljust(width)}  "
        + (
            f"max abs diff {row['max_abs_diff']:.3g}"
            if row["max_abs_diff"] is not None
            else row.get("why", "differs")
        )
        for row in rows
    ]


def _through(depth: int) -> str:
    return "" if depth == 1 else f" through {depth} forks"


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) or "none"


def _lineage_text(family: dict[str, Any]) -> list[str]:
    ancestor = family["common_ancestor"]
    lines = []
    for label, chain in (("A", family["a_ancestry"]), ("B", family["b_ancestry"])):
        for link in chain:
            if link.get("moved_from"):
                lines.append(
                    f"{label}'s ancestor {link['moved_from']} is now {link['run']} (found by "
                    "its checkpoint's sha256)"
                )
        if chain[-1].get("missing"):
            lines.append(f"{label}'s ancestor {chain[-1]['run']} is missing")
        if chain[-1].get("damaged"):
            lines.append(f"{label}'s lineage ends at a damaged run: {chain[-1]['damaged']}")
    if ancestor is None:
        return ["no common ancestor", *lines]
    da, db, step = family["a_depth"], family["b_depth"], family["fork_step"]
    if da == 0 and db == 0:
        return ["A and B are the same run", *lines]
    if db == 0:
        return [f"A descends from B{_through(da)}, forked at step {step}", *lines]
    if da == 0:
        return [f"B descends from A{_through(db)}, forked at step {step}", *lines]
    sides = (family["a_ancestry"][da]["step"], family["b_ancestry"][db]["step"])
    return [
        f"both descend from {ancestor} (A forked at step {sides[0]}, B at step {sides[1]}): "
        f"shared history through step {step}",
        *lines,
    ]


def replay_sentence(replayed: dict[str, Any], changed: list[dict[str, Any]]) -> str:
    """'parameters first differ after update 21; configs differ in training.lr: ...'"""
    update = replayed["first_different_update"]
    if replayed["note"]:
        return f"not replayed: {replayed['note']}"
    if update is None:
        return (
            f"parameters identical from step {replayed['from_step']} through update "
            f"{replayed['through_step']}"
        )
    if update == replayed["from_step"]:
        head = f"parameters already differ at step {update} ({replayed['from']})"
    else:
        head = f"parameters first differ after update {update}"
    if changed:
        return f"{head}; configs differ in {_pairs(changed)}"
    return (
        f"{head}; the configs agree in every key that can change the numbers, so the cause "
        "is outside the config (hardware, library versions, nondeterministic kernels)"
    )


def _hyperparameter_line(hyper: dict[str, Any]) -> str:
    """'optimizer settings differ from step 20 (config, not state): lr 0.00036 vs 0.00016'"""
    shown: dict[str, str] = {}
    for row in hyper["differ"]:
        key = row["name"].rpartition(".")[2]  # the same setting of each param group: once
        shown.setdefault(key, f"{key} {row['a']!r} vs {row['b']!r}")
    settings = "; ".join(shown.values())
    return f"optimizer settings differ from step {hyper['step']} (config, not state): {settings}"


def format_report(report: dict[str, Any]) -> str:
    """The human report: one section per question, then the verdict."""
    out: list[str] = []

    def section(title: str, lines: list[str]) -> None:
        out.append(f"{title:<12} {lines[0]}")
        out.extend(f"{'':<12} {line}" for line in lines[1:])

    for label in ("a", "b"):
        side = report[label]
        out.append(f"{label.upper():<12} {side['run']} ({side['status']}, step {side['step']})")
    out.append("")
    config = [f"{row['key']}: {row['a']!r} vs {row['b']!r}" for row in report["config"]]
    if not config:
        config = ["the same in every key that can change the numbers"]
    if report["config_inert"]:
        config.append(f"(cannot change the numbers: {_pairs(report['config_inert'])})")
    section("config", config)
    section("lineage", _lineage_text(report["lineage"]))

    first = report["first_metric_divergence"]
    if first is None:
        through = report["metrics_identical_through"]
        metrics = (
            [f"identical through step {through} ({report['metrics_common_steps']} common steps)"]
            if through is not None
            else ["no common logged step"]
        )
    else:
        metrics = [
            f"first differ at step {first['step']}: {first['key']} {first['a']!r} vs {first['b']!r}"
        ]
        for key in ("train/loss", "val/loss"):
            row = report["metric_divergence_by_key"].get(key)
            if row is not None and key != first["key"]:
                metrics.append(
                    f"{key} first differs at step {row['step']}: {row['a']!r} vs {row['b']!r}"
                )
    section("metrics", metrics)

    ck = report["checkpoints"]
    if not ck["equal_steps"] and not ck["different_steps"]:
        checkpoints = [
            f"no common valid checkpoint (A: {_steps(ck['a_steps'])}; B: {_steps(ck['b_steps'])})"
        ]
    else:
        equal = ck["last_equal_step"]
        checkpoints = [
            f"bit-identical through step {equal}" if equal is not None else "none bit-identical"
        ]
        if ck["first_different_step"] is not None:
            checkpoints[0] += f"; first differ at step {ck['first_different_step']}:"
            checkpoints += _tensor_lines(ck["differing_tensors"], "  ")
    if ck.get("hyperparameters"):
        checkpoints.append(_hyperparameter_line(ck["hyperparameters"]))
    checkpoints += ck["notes"]
    section("checkpoints", checkpoints)

    if report["replay"] is not None:
        replayed = report["replay"]
        lines = [replay_sentence(replayed, report["config"])]
        if replayed["first_different_update"] is not None:
            lines += _tensor_lines(replayed["differing_tensors"], "  ")
        lines.append(f"(replayed from {replayed['from']})")
        section("replay", lines)
    out.append("")
    out.append("identical over the common steps" if report["identical"] else "the runs diverge")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the command


USAGE = "usage: python -m gptexp.diff <run A> <run B> [--json] [--replay]"


@dataclass
class DiffOptions:
    """Where exactly two runs part. Exit 0 when they are identical over their common steps,
    1 when they diverge, 2 on bad input."""

    paths: list[str] = field(default_factory=list)
    json: bool = field(default=False, metadata={"help": "print one JSON object instead"})
    replay: bool = field(
        default=False,
        metadata={"help": "train both again, update by update, from the last state they share"},
    )

    def __post_init__(self) -> None:
        if len(self.paths) != 2:
            raise ConfigError(f"name exactly two run directories (got {len(self.paths)})\n{USAGE}")


def diff(options: DiffOptions) -> int:
    """Print the report; returns the exit status (0 identical, 1 diverging)."""
    a, b = (load_run(path) for path in options.paths)
    report = diff_runs(a, b, with_replay=options.replay)
    print(json.dumps(report, indent=2) if options.json else format_report(report))
    return 0 if report["identical"] else 1


def main() -> None:
    prepare_command_process()  # gptexp.training.speed: --replay trains, reproducibly
    with command_logging(None, console_level=logging.WARNING):
        code = run_command(lambda: diff(parse_options(sys.argv[1:], DiffOptions, USAGE)))
    sys.exit(code)


if __name__ == "__main__":
    main()
