"""Replay: both runs' configs trained again in this process, update by update, from the last
state they share, up to the first update after which their parameters differ."""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptexp.checkpoint.comparison import (
    TOP_TENSORS,
    tensor_differences,
)
from gptexp.checkpoint.format import checkpoint_name
from gptexp.checkpoint.manager import run_checkpoints
from gptexp.core.errors import CheckpointError, RunError
from gptexp.observe.divergence import RunInfo
from gptexp.observe.lineage import fork_parent
from gptexp.observe.rundir import RunDirectory

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # besides SIGINT, which already interrupts


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
        from gptexp.core.config import to_train_config
        from gptexp.run.starts import run_corpus
        from gptexp.training.runtime import Distributed, capture_rng_state
        from gptexp.training.trainer import Trainer

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
        from gptexp.training.runtime import capture_rng_state, restore_rng_state

        self._pin()
        restore_rng_state(self.rng)
        self.trainer.train_step()
        self.trainer.sync()  # the guard's decision carried out now (a stop, a rollback)
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
        sha256 = (fork_parent(info.status) or {}).get("sha256") or "?"
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
