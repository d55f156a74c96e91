"""Lineage: a run's ancestry through the ``parent`` links of forks, and the common ancestor
and fork step of two runs (no torch).

Whether a run holds the checkpoint a fork started from (to find a parent that was moved) is
the checkpoint floor's question: the caller passes it in as ``holds``
(:func:`gptexp.checkpoint.comparison.holds_checkpoint`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptexp.core.errors import RunError
from gptexp.observe.rundir import RunDirectory, runs_under

log = logging.getLogger(__name__)

# Whether a run holds a checkpoint: (run, step, sha256) -> bool.
Holds = Callable[[RunDirectory, int, str], bool]


def fork_parent(status: dict[str, Any]) -> dict[str, Any] | None:
    """run.json's ``parent`` of a fork (``run``, ``step``, ``checkpoint``, ``sha256``,
    ``wandb_id``), or None: the one reading of the link, for every tool. A link without a
    run path and a step >= 0 (a hand edit) is no link: the run reads as a root."""
    parent = status.get("parent")
    if not isinstance(parent, dict) or not isinstance(parent.get("run"), str):
        return None
    step = parent.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    return parent


def fork_cooldown(status: dict[str, Any]) -> int | None:
    """run.json's ``cooldown`` of a cooldown fork (the updates of its decay), or None."""
    cooldown = status.get("cooldown")
    if fork_parent(status) is None or not isinstance(cooldown, int) or isinstance(cooldown, bool):
        return None
    return cooldown if cooldown >= 1 else None


def ancestry(
    run: RunDirectory, holds: Holds, search: list[RunDirectory] = ()
) -> list[dict[str, Any]]:
    """The run, its parent, its parent's parent, ... as ``{run, step}``: ``step`` is the step
    of that run at which the one before it in the list was forked (None for the run itself).

    A parent that is not where the link says (moved or renamed) is looked for among
    ``search``: the run that ``holds`` the checkpoint the fork started from, by the step and
    sha256 the fork recorded; it is marked ``moved_from``.
    A parent found nowhere ends the list with ``missing: true``; a loop of links ends it too.
    """
    chain: list[dict[str, Any]] = [{"run": str(run.path), "step": None}]
    seen = {run.path}
    current = run
    while True:
        try:
            parent = fork_parent(current.read_status())
        except RunError as error:  # a damaged ancestor ends the lineage; the report says so
            chain[-1]["damaged"] = str(error)
            return chain
        if parent is None:
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
            moved = holder_of(parent, [c for c in beside if c.path not in seen], holds)
            if moved is None:
                chain.append(link | {"missing": True})
                return chain
            current = moved
            link = {"run": str(moved.path), "step": parent.get("step"), "moved_from": link["run"]}
        if current.path in seen:
            return chain  # a loop of parent links: stop at the first repeat
        seen.add(current.path)
        chain.append(link)


def holder_of(
    parent: dict[str, Any], candidates: list[RunDirectory], holds: Holds
) -> RunDirectory | None:
    """The run among ``candidates`` that ``holds`` the checkpoint a fork's ``parent`` link
    names (its step and sha256), or None."""
    sha256, step = parent.get("sha256"), parent.get("step")
    if not isinstance(sha256, str) or len(sha256) != 64 or not isinstance(step, int):
        return None
    return next((candidate for candidate in candidates if holds(candidate, step, sha256)), None)


def search_places(a: RunDirectory, b: RunDirectory) -> list[RunDirectory]:
    """Where a moved parent may be: the two runs given, then the runs beside each."""
    places: dict[Path, RunDirectory] = {a.path: a, b.path: b}
    for run in (a, b):
        for sibling in runs_under(run.path.parent):
            places.setdefault(sibling.path, sibling)
    return list(places.values())


def lineage(a: RunDirectory, b: RunDirectory, holds: Holds) -> dict[str, Any]:
    """The nearest common ancestor of the two runs and the step through which they share it.

    ``fork_step`` is the last step of the ancestor that both runs' histories hold: the fork
    step of the side that left it (the smaller one when both did); None when one run is the
    other, or they share no ancestor.
    """
    places = search_places(a, b)
    chain_a, chain_b = ancestry(a, holds, places), ancestry(b, holds, places)
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
