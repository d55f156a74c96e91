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
import math
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptexp.checkpoint import checkpoint_name, run_checkpoints
from gptexp.cli import command_logging, parse_options, run_command
from gptexp.errors import CheckpointError, ConfigError, RunError
from gptexp.fsio import sha256_file
from gptexp.metrics import config_diff, read_metrics
from gptexp.process_tuning import prepare_command_process
from gptexp.rundir import RunDirectory, require_run, runs_under, stored_config

log = logging.getLogger(__name__)

# Config keys that cannot change a parameter or a logged number. data.path only says where the
# text was; the text itself is compared by its fingerprint (run.json data_fingerprint).
INERT_PREFIXES = ("logger.", "checkpoint.", "hydra.")
INERT_KEYS = frozenset(
    {
        "training.progress",
        "training.sample_every",
        "training.sample_tokens",
        "data.path",
        "experiment",  # the preset's name; the values it sets are compared key by key
    }
)

# Metric record keys that are markers, not numbers of the training.
MARKER_KEYS = frozenset({"step", "inherited", "event"})
# Words of a metric name that make it a measure of time or speed, which differs run to run.
TIME_WORDS = frozenset({"time", "seconds", "sec", "ms", "elapsed", "duration", "eta", "s"})
# Within one step, the losses are reported first: they are what users look at.
METRIC_PRIORITY = ("train/loss", "val/loss")

TOP_TENSORS = 5  # differing tensors listed per comparison
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # besides SIGINT, which already interrupts


# ----------------------------------------------------------------------------- the runs


@dataclass
class RunInfo:
    """What the diff reads of one run directory."""

    run: RunDirectory
    status: dict[str, Any]
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def last_step(self) -> int:
        """The furthest step the run's metrics reached (its run.json step without metrics)."""
        steps = [r["step"] for r in self.records]
        return max(steps) if steps else int(self.status.get("step") or 0)


def load_run(path: str | Path) -> RunInfo:
    """The run at ``path``: RunError (exit 2) when it is not one or cannot be read."""
    run = require_run(path)
    try:
        return RunInfo(run, run.read_status(), stored_config(run), read_metrics(run.metrics))
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise RunError(f"{path}: unreadable ({reason})") from None


# ----------------------------------------------------------------------------- config


def is_inert(key: str) -> bool:
    """Whether config ``key`` cannot change the numbers of a run."""
    return key in INERT_KEYS or key.startswith(INERT_PREFIXES)


def config_difference(a: RunInfo, b: RunInfo) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(keys that can change the numbers, keys that cannot), each a list of {key, a, b}.

    A key that one config lacks (an older schema) shows as None on that side. A different
    text under the same config shows as ``data.fingerprint``.
    """
    rows = [
        {"key": key, "a": value_a, "b": value_b}
        for key, (value_a, value_b) in config_diff(a.config, b.config).items()
    ]
    print_a, print_b = a.status.get("data_fingerprint"), b.status.get("data_fingerprint")
    if print_a and print_b and print_a != print_b:
        rows.append({"key": "data.fingerprint", "a": print_a, "b": print_b})
    changed = [row for row in rows if not is_inert(row["key"])]
    inert = [row for row in rows if is_inert(row["key"])]
    return changed, inert


# ----------------------------------------------------------------------------- lineage


def ancestry(run: RunDirectory, search: list[RunDirectory] = ()) -> list[dict[str, Any]]:
    """The run, its parent, its parent's parent, ... as ``{run, step}``: ``step`` is the step
    of that run at which the one before it in the list was forked (None for the run itself).

    A parent that is not where the link says (moved or renamed) is looked for among
    ``search``: the run whose manifest lists the checkpoint the fork started from, by the
    sha256 the fork recorded (the file's own sha256 checked too); it is marked ``moved_from``.
    A parent found nowhere ends the list with ``missing: true``; a loop of links ends it too.
    """
    chain: list[dict[str, Any]] = [{"run": str(run.path), "step": None}]
    seen = {run.path}
    current = run
    while True:
        try:
            parent = current.read_status().get("parent")
        except RunError as error:  # a damaged ancestor ends the lineage; the report says so
            chain[-1]["damaged"] = str(error)
            return chain
        if not isinstance(parent, dict) or not isinstance(parent.get("run"), str):
            return chain  # a root
        parent_path = Path(parent["run"])
        if not parent_path.is_absolute():
            parent_path = current.path / parent_path
        link = {"run": str(RunDirectory(parent_path).path), "step": parent.get("step")}
        current_dir = current.path.parent
        current = RunDirectory(parent_path)
        if not current.is_run():
            # A renamed parent lies beside its fork most often: look there first.
            beside = sorted(search, key=lambda c: c.path.parent != current_dir)
            moved = holder_of(parent, [c for c in beside if c.path not in seen])
            if moved is None:
                chain.append(link | {"missing": True})
                return chain
            current = moved
            link = {"run": str(moved.path), "step": parent.get("step"), "moved_from": link["run"]}
        if current.path in seen:
            return chain  # a loop of parent links: stop at the first repeat
        seen.add(current.path)
        chain.append(link)


def holder_of(parent: dict[str, Any], candidates: list[RunDirectory]) -> RunDirectory | None:
    """The run among ``candidates`` that holds the checkpoint a fork's ``parent`` link names
    (same step, same sha256 in its manifest and in the file itself), or None."""
    sha256, step = parent.get("sha256"), parent.get("step")
    if not isinstance(sha256, str) or len(sha256) != 64 or not isinstance(step, int):
        return None
    for candidate in candidates:
        try:
            entries = run_checkpoints(candidate).entries()
        except CheckpointError:
            continue
        for entry in entries:
            if entry.step == step and entry.sha256 == sha256:
                path = candidate.checkpoints / entry.file
                if path.is_file() and sha256_file(path) == sha256:
                    return candidate
    return None


def search_places(a: RunDirectory, b: RunDirectory) -> list[RunDirectory]:
    """Where a moved parent may be: the two runs given, then the runs beside each."""
    places: dict[Path, RunDirectory] = {a.path: a, b.path: b}
    for run in (a, b):
        for sibling in runs_under(run.path.parent):
            places.setdefault(sibling.path, sibling)
    return list(places.values())


def lineage(a: RunDirectory, b: RunDirectory) -> dict[str, Any]:
    """The nearest common ancestor of the two runs and the step through which they share it.

    ``fork_step`` is the last step of the ancestor that both runs' histories hold: the fork
    step of the side that left it (the smaller one when both did); None when one run is the
    other, or they share no ancestor.
    """
    places = search_places(a, b)
    chain_a, chain_b = ancestry(a, places), ancestry(b, places)
    index_b = {link["run"]: j for j, link in enumerate(chain_b) if not link.get("missing")}
    result: dict[str, Any] = {
        "a_ancestry": chain_a,
        "b_ancestry": chain_b,
        "common_ancestor": None,
        "fork_step": None,
        "a_depth": None,
        "b_depth": None,
    }
    for i, link in enumerate(chain_a):
        j = index_b.get(link["run"])
        if j is None or link.get("missing"):
            continue
        # A run that is itself the ancestor shares all of its own history.
        steps = [chain[k]["step"] for chain, k in ((chain_a, i), (chain_b, j)) if k > 0]
        known = [int(step) for step in steps if isinstance(step, int)]
        result |= {
            "common_ancestor": link["run"],
            "fork_step": min(known) if known else None,
            "a_depth": i,  # forks between A and the ancestor
            "b_depth": j,
        }
        break
    return result


# ----------------------------------------------------------------------------- metrics


def is_compared_metric(key: str, value: Any) -> bool:
    """Numbers of the training only: no markers, no times or speeds, no strings or flags.
    None stands for a non-finite number (metrics.jsonl writes NaN and inf as null)."""
    if key in MARKER_KEYS or key.startswith("throughput/"):
        return False
    if TIME_WORDS & set(re.split(r"[/_.\-]", key.lower())):
        return False
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def records_by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """One dict per step (several records of a step, e.g. an event beside the metrics, are
    merged; a key logged twice in a step keeps its last value)."""
    steps: dict[int, dict[str, Any]] = {}
    for record in records:
        steps.setdefault(record["step"], {}).update(record)
    return steps


def _metric_order(key: str) -> tuple[int, str]:
    rank = METRIC_PRIORITY.index(key) if key in METRIC_PRIORITY else len(METRIC_PRIORITY)
    return rank, key


def first_metric_divergence(
    records_a: list[dict[str, Any]], records_b: list[dict[str, Any]]
) -> dict[str, Any]:
    """Over the steps both runs logged: the first step at which a shared metric differs.

    Returns ``first`` ({step, key, a, b} or None), ``by_key`` (the first differing step of
    every metric that differs), ``common_steps`` (how many steps were compared) and
    ``identical_through`` (the last common step, when nothing differs).
    """
    steps_a, steps_b = records_by_step(records_a), records_by_step(records_b)
    common = sorted(steps_a.keys() & steps_b.keys())
    by_key: dict[str, dict[str, Any]] = {}
    for step in common:
        ra, rb = steps_a[step], steps_b[step]
        for key in sorted(ra.keys() & rb.keys(), key=_metric_order):
            if key in by_key:
                continue
            if not (is_compared_metric(key, ra[key]) and is_compared_metric(key, rb[key])):
                continue
            if ra[key] != rb[key]:  # exact: deterministic runs agree to the last bit
                by_key[key] = {"step": step, "a": ra[key], "b": rb[key]}
    first = None
    if by_key:
        key = min(by_key, key=lambda k: (by_key[k]["step"], *_metric_order(k)))
        first = {"key": key, **by_key[key]}
    return {
        "first": first,
        "by_key": by_key,
        "common_steps": len(common),
        "identical_through": common[-1] if common and first is None else None,
    }


# ----------------------------------------------------------------------------- checkpoints


def listed_checkpoints(run: RunDirectory, label: str, notes: list[str]) -> dict[int, Any]:
    """The manifest's entries by step; a damaged manifest counts as none, with a note."""
    try:
        return {entry.step: entry for entry in run_checkpoints(run).entries()}
    except CheckpointError as error:
        notes.append(f"{label}: {error}")
        return {}


def optimizer_param_names(state: dict[str, Any]) -> list[str]:
    """The parameter name of each optimizer state index, in the order the trainer gave the
    parameters to AdamW; [] when the checkpoint's model config no longer builds."""
    import torch

    from gptexp.config import ConfigError, ModelConfig
    from gptexp.model import GPT

    config = state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return []
    try:
        model_cfg = ModelConfig(**config["model"])
    except (ConfigError, TypeError):
        return []
    with torch.device("meta"):  # shapes and names only, no memory
        model = GPT(model_cfg, int(state.get("vocab_size") or 1))
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(p)] for group in model.optimizer_groups(0.0) for p in group["params"]]


def state_values(state: dict[str, Any]) -> dict[str, Any]:
    """The model and optimizer state of a checkpoint as flat ``name -> tensor``:
    ``model.<param>``, ``optimizer.<param>.<exp_avg|exp_avg_sq|step>``. The optimizer's
    hyperparameters are config, not state: see :func:`optimizer_hyperparameters`."""
    values = {f"model.{name}": tensor for name, tensor in state["model"].items()}
    optimizer = state.get("optimizer") or {}
    names = optimizer_param_names(state)
    for index, slots in (optimizer.get("state") or {}).items():
        param = names[index] if isinstance(index, int) and index < len(names) else str(index)
        for slot, value in slots.items():
            values[f"optimizer.{param}.{slot}"] = value
    return values


def optimizer_hyperparameters(state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.param_groups.<i>.<lr|initial_lr|betas|...>``: what the config and the LR
    schedule set, compared as config (a fork with another lr writes its start checkpoint
    with its own lr beside bit-identical tensors)."""
    optimizer = state.get("optimizer") or {}
    return {
        f"optimizer.param_groups.{i}.{key}": value
        for i, group in enumerate(optimizer.get("param_groups") or [])
        for key, value in group.items()
        if key != "params"
    }


def value_difference(x: Any, y: Any) -> tuple[bool, float | None, str | None]:
    """(equal bit for bit, max abs difference, why there is no number for it)."""
    import torch

    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, None, f"{x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if torch.equal(x, y):
            return True, 0.0, None
        if x.is_floating_point() and (x.isnan().any() or y.isnan().any()):
            # torch.equal treats NaN as unequal to itself: compare the bits instead.
            same_bits = torch.equal(
                x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
            )
            return (True, 0.0, None) if same_bits else (False, None, "NaN")
        diff = (x.double() - y.double()).abs().max().item()
        # JSON has no inf or NaN: such a difference is named instead of measured.
        return (False, diff, None) if math.isfinite(diff) else (False, None, "non-finite")
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return False, None, f"{type(x).__name__} vs {type(y).__name__}"
    if x == y:
        return True, 0.0, None
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return False, abs(float(x) - float(y)), None
    return False, None, f"{x!r} vs {y!r}"


def tensor_differences(values_a: dict[str, Any], values_b: dict[str, Any]) -> list[dict]:
    """Every entry that differs, largest max abs difference first (no number: first)."""
    rows = []
    for name in sorted(values_a.keys() | values_b.keys()):
        if name not in values_b or name not in values_a:
            rows.append(
                {
                    "name": name,
                    "max_abs_diff": None,
                    "why": f"only in {'A' if name in values_a else 'B'}",
                }
            )
            continue
        equal, diff, why = value_difference(values_a[name], values_b[name])
        if not equal:
            rows.append({"name": name, "max_abs_diff": diff} | ({"why": why} if why else {}))
    rows.sort(key=lambda row: -math.inf if row["max_abs_diff"] is None else -row["max_abs_diff"])
    return rows


def hyperparameter_value(state: dict[str, Any], row: dict[str, Any]) -> Any:
    """A hyperparameter's value in ``state`` as JSON can hold it (betas are a tuple)."""
    value = optimizer_hyperparameters(state).get(row["name"])
    return list(value) if isinstance(value, tuple) else value


def compare_checkpoints(a: RunDirectory, b: RunDirectory) -> dict[str, Any]:
    """Over the steps where both runs have a valid checkpoint (listed in the manifest, sha256
    verified, loaded with ``weights_only=True``): which are bit-identical in model and
    optimizer state (tensors), the last identical one, the first that differs and what
    differs most; apart from that, the first step whose optimizer hyperparameters differ."""
    notes: list[str] = []
    listed_a = listed_checkpoints(a, "A", notes)
    listed_b = listed_checkpoints(b, "B", notes)
    manager_a, manager_b = run_checkpoints(a), run_checkpoints(b)
    equal_steps, different_steps, top = [], [], []
    hyperparameters: dict[str, Any] | None = None
    common = sorted(listed_a.keys() & listed_b.keys())
    for step in common:
        try:
            state_a = manager_a.load(listed_a[step])
            state_b = manager_b.load(listed_b[step])
        except CheckpointError as error:
            notes.append(f"step {step} skipped: {error}")
            continue
        differences = tensor_differences(state_values(state_a), state_values(state_b))
        if hyperparameters is None:
            settings = tensor_differences(
                optimizer_hyperparameters(state_a), optimizer_hyperparameters(state_b)
            )
            if settings:
                hyperparameters = {
                    "step": step,
                    "differ": [
                        {
                            "name": row["name"],
                            "a": hyperparameter_value(state_a, row),
                            "b": hyperparameter_value(state_b, row),
                        }
                        for row in settings
                    ],
                }
        if differences:
            if not different_steps:
                top = differences[:TOP_TENSORS]
            different_steps.append(step)
        else:
            equal_steps.append(step)
    return {
        "a_steps": sorted(listed_a),
        "b_steps": sorted(listed_b),
        "equal_steps": equal_steps,
        "different_steps": different_steps,
        "last_equal_step": max(equal_steps) if equal_steps else None,
        "first_different_step": min(different_steps) if different_steps else None,
        "differing_tensors": top,
        "hyperparameters": hyperparameters,
        "notes": notes,
    }


# ----------------------------------------------------------------------------- replay


class ReplaySide:
    """One run's trainer, rebuilt in this process from a state, stepped on demand.

    Both sides live in one process, so each keeps its own RNG state and thread count and sets
    them before each of its updates; the trainer's run directory is a temporary one (a copy of
    the run's tokenizer only), so nothing is written into the runs themselves.
    """

    def __init__(
        self,
        info: RunInfo,
        state: dict[str, Any] | None,
        workdir: Path,
        default_threads: int,
    ) -> None:
        from gptexp.config import to_train_config
        from gptexp.runtime import Distributed, capture_rng_state
        from gptexp.starts import run_corpus
        from gptexp.trainer import Trainer

        cfg = to_train_config(info.config)
        self.threads = cfg.training.num_threads or default_threads
        self.deterministic = cfg.training.deterministic
        workdir.mkdir(parents=True)
        if state is None and info.run.tokenizer.is_file():
            shutil.copyfile(info.run.tokenizer, workdir / info.run.tokenizer.name)
        self._pin()
        run = RunDirectory(workdir)
        corpus = run_corpus(cfg, run, state)
        self.trainer = Trainer(cfg, run, Distributed(), corpus, resume_state=state)
        self.rng = capture_rng_state()

    def _pin(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        if torch.are_deterministic_algorithms_enabled() != self.deterministic:
            torch.use_deterministic_algorithms(self.deterministic)

    def update(self) -> None:
        from gptexp.runtime import capture_rng_state, restore_rng_state

        self._pin()
        restore_rng_state(self.rng)
        self.trainer.train_step()
        self.rng = capture_rng_state()

    def parameters(self) -> dict[str, Any]:
        return {f"model.{k}": v for k, v in self.trainer.model.state_dict().items()}


def replay_start(
    a: RunInfo, b: RunInfo, checkpoints: dict[str, Any], family: dict[str, Any]
) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None, str]:
    """Where the replay starts: (step, state for A, state for B, where the state comes from).

    The latest of: the last bit-identical common checkpoint before the first that differs
    (each side from its own file), and, for a fork and its parent (or two forks of one run at
    the same step), the ancestor's checkpoint at the fork step, which both histories pass
    through; after it, each history follows its own config alone. Without either, both start
    from their initialisation (step 0).
    """
    equal = [
        step
        for step in checkpoints["equal_steps"]
        if checkpoints["first_different_step"] is None or step < checkpoints["first_different_step"]
    ]
    start, source = 0, "initialisation"
    state_a = state_b = None
    if equal:
        start = max(equal)
        state_a = run_checkpoints(a.run).load(run_checkpoints(a.run).find(start))
        state_b = run_checkpoints(b.run).load(run_checkpoints(b.run).find(start))
        source = f"the common checkpoint {checkpoint_name(start)}"
    fork = family["fork_step"]
    depths = (family["a_depth"] or 0, family["b_depth"] or 0)
    fork_steps = {
        chain[depth]["step"]
        for chain, depth in zip((family["a_ancestry"], family["b_ancestry"]), depths, strict=True)
        if depth > 0
    }
    direct = max(depths) <= 1 and len(fork_steps) == 1
    if fork is not None and fork > start and direct:
        ancestor = RunDirectory(family["common_ancestor"])
        try:
            manager = run_checkpoints(ancestor)
            state_a = state_b = manager.load(manager.find(fork))
            start, source = fork, f"{ancestor.path / 'checkpoints' / checkpoint_name(fork)}"
        except CheckpointError as error:
            log.warning("replay cannot start at the fork step %d: %s", fork, error)
    return start, state_a, state_b, source


def refuse_replay_before_fork(
    label: str, info: RunInfo, chain: list[dict[str, Any]], start: int
) -> None:
    """A fork's config applies only from its fork step on (its history before it is its
    parent's): a replay that would start earlier with the fork's config, e.g. from
    initialisation as if it were a fresh run, would report a false divergence. RunError."""
    if len(chain) < 2 or not isinstance(chain[1]["step"], int) or start >= chain[1]["step"]:
        return
    parent, fork_step = chain[1], chain[1]["step"]
    if parent.get("missing"):
        sha256 = (info.status.get("parent") or {}).get("sha256") or "?"
        raise RunError(
            f"cannot replay: {label} is a fork of {parent['run']} at step {fork_step}, which is "
            f"not there, and no run given or beside them holds that checkpoint (sha256 "
            f"{str(sha256)[:12]}...); pass the parent's directory (where it is now) as the "
            f"other run, or diff without --replay"
        )
    raise RunError(
        f"cannot replay: {label} is a fork of {parent['run']} at step {fork_step}, and the two "
        f"runs share no state at or after that step to start from (no common checkpoint, no "
        f"checkpoint of the fork step left); the replay would start at step {start}, before "
        f"{label}'s config applied; diff without --replay"
    )


@contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP stop the replay as Ctrl-C does (KeyboardInterrupt: exit 130), so
    the temporary directory of its trainers is removed on the way out, not left behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def replay(
    a: RunInfo, b: RunInfo, checkpoints: dict[str, Any], family: dict[str, Any]
) -> dict[str, Any]:
    """Train both configs again, in lockstep, from the last state the runs share, and name
    the first update after which their parameters differ (update s produces step s).

    Stops there, or at the last step both runs reached. When there is no update to replay, or
    a run was trained by several processes (which one process cannot reproduce), ``note``
    says so and nothing is replayed.
    """
    import torch

    start, state_a, state_b, source = replay_start(a, b, checkpoints, family)
    for label, info, chain in (("A", a, family["a_ancestry"]), ("B", b, family["b_ancestry"])):
        refuse_replay_before_fork(label, info, chain, start)
    end = min(a.last_step, b.last_step)
    result: dict[str, Any] = {
        "from_step": start,
        "from": source,
        "through_step": end,
        "first_different_update": None,
        "replayed_updates": 0,
        "differing_tensors": [],
        "note": None,
    }
    for label, info in (("A", a), ("B", b)):
        world = int(info.status.get("world_size") or 1)
        if world != 1:
            result["note"] = f"run {label} was trained by {world} processes; replay runs one"
            return result
    if end <= start:
        result["note"] = f"no update to replay after step {start} (the last step both reached)"
        return result
    default_threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with signals_interrupt(), tempfile.TemporaryDirectory(prefix="gptexp-diff-") as tmp:
        try:
            side_a = ReplaySide(a, state_a, Path(tmp) / "a", default_threads)
            side_b = ReplaySide(b, state_b, Path(tmp) / "b", default_threads)
            update = start
            differences = tensor_differences(side_a.parameters(), side_b.parameters())
            while not differences and update < end:
                update += 1
                side_a.update()
                side_b.update()
                differences = tensor_differences(side_a.parameters(), side_b.parameters())
            result["replayed_updates"] = update - start
            if differences:
                result["first_different_update"] = update
                result["differing_tensors"] = differences[:TOP_TENSORS]
        finally:
            torch.set_num_threads(default_threads)
            if torch.are_deterministic_algorithms_enabled() != deterministic:
                torch.use_deterministic_algorithms(deterministic)  # only on a change: ~1 s
    return result


# ----------------------------------------------------------------------------- the report


def diff_runs(a: RunInfo, b: RunInfo, *, with_replay: bool = False) -> dict[str, Any]:
    """The whole comparison as one JSON-ready dict (what ``--json`` prints)."""
    changed, inert = config_difference(a, b)
    family = lineage(a.run, b.run)
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
    prepare_command_process()  # gptexp.process_tuning: --replay trains, reproducibly
    with command_logging(None, console_level=logging.WARNING):
        code = run_command(lambda: diff(parse_options(sys.argv[1:], DiffOptions, USAGE)))
    sys.exit(code)


if __name__ == "__main__":
    main()
