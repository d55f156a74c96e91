"""Run directories as hostile input: every file of a real run is damaged, replaced or linked
out of the run, one at a time, and every command is run on the result.

A run directory may have been copied, hand-edited, shared or written by someone else
(issue 18). Whatever it holds, each command must, on each mutation:

- exit 0, 1 or 2 (never an uncaught exception);
- print no Python traceback and at most one line starting with ``error:``;
- write, change or delete nothing outside the run: the directories beside it (a ``victim``
  directory that links and manifest entries point into, an intact copy of the run) keep their
  files, contents and mtimes, and no file appears anywhere else in the test's directory (the
  only places outside the run a command may write are the corpus cache ``$GPTEXP_CACHE`` and
  the ``out=`` it was given);
- run no code from the run directory (a pickle that would write a marker file never does);
- lose no valid checkpoint, as defined in :func:`lost_checkpoints`;
- and a resume past a damaged newest checkpoint carries on from an older valid one (the
  promise of docs/checkpoints.md), reaching its new ``max_steps`` with a verified checkpoint.

One small run (single-file checkpoints at steps 10, 15, 20 and an evaluation) and one small
DCP run are made once per module; each test copies one of them, applies one mutation and runs
one command, in this process (``call_main``) except where only a real process will do (a walk
that might never end needs a timeout). Test ids read ``<mutation>-<command>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, call_main, run_module, subprocess_env

PT_SETTINGS = [
    "training.max_steps=20",
    "checkpoint.every_steps=5",
    "checkpoint.keep_last=3",
]  # kept: step_0000010.pt, step_0000015.pt, step_0000020.pt (also the best)
DCP_SETTINGS = ["training.max_steps=10", "checkpoint.every_steps=5", "checkpoint.format=dcp"]
NEW_MAX_STEPS = 22  # resume and fork train a couple of steps more
MORE_STEPS = f"training.max_steps={NEW_MAX_STEPS}"
STEP_NAME = re.compile(r"step_(\d+)\.(pt|dcp)$")
TRACEBACK = "Traceback (most recent call last)"


# ----------------------------------------------------------------------------- the real runs


@dataclass(frozen=True)
class Pristine:
    """A run as training left it, and the fingerprints of the checkpoints it wrote."""

    run: Path
    fingerprints: frozenset  # what a valid checkpoint of this run is (see fingerprint())
    cache_files: tuple[str, ...]  # the corpus cache's file names (relative to the cache dir)


def fingerprint(path: Path) -> object | None:
    """A checkpoint's identity: the sha256 of a file, the sorted (name, sha256) of a DCP
    directory's files. None for anything reached through a link or of another kind."""
    if path.is_symlink():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return tuple(
            sorted(
                (member.name, hashlib.sha256(member.read_bytes()).hexdigest())
                for member in path.iterdir()
                if member.is_file() and not member.is_symlink()
            )
        )
    return None


def checkpoints_on_disk(run: Path) -> dict[str, object]:
    """Every ``step_*.pt`` / ``step_*.dcp`` in ``run/checkpoints`` with its fingerprint."""
    folder = run / "checkpoints"
    if folder.is_symlink() or not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        if STEP_NAME.fullmatch(path.name) and (print_ := fingerprint(path)) is not None:
            found[path.name] = print_
    return found


def make_run(base: Path, name: str, settings: list[str]) -> Pristine:
    """Train and evaluate a run in this process (a real run, only without the interpreter
    start-up)."""
    import gptexp.eval
    import gptexp.train

    run, cache = base / name, base / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTEXP_CACHE", str(cache))
        code, stderr = call_main(
            gptexp.train.main, *FAST, *settings, f"hydra.run.dir={run}", cwd=base
        )
        assert code == 0, stderr[-3000:]
        code, stderr = call_main(gptexp.eval.main, f"run={run}", "max_new_tokens=20", cwd=base)
        assert code == 0, stderr[-3000:]
    return Pristine(
        run,
        frozenset(checkpoints_on_disk(run).values()),
        tuple(str(p.relative_to(cache)) for p in (cache / "corpus").rglob("*") if p.is_file()),
    )


@pytest.fixture(scope="module")
def pristine_runs(tmp_path_factory) -> dict[str, Pristine]:
    base = tmp_path_factory.mktemp("pristine")
    runs = {"pt": make_run(base, "pt", PT_SETTINGS), "dcp": make_run(base, "dcp", DCP_SETTINGS)}
    pt = runs["pt"].run
    for expected in (
        "run.json",
        "metrics.jsonl",
        "samples.txt",
        "train.log",
        "tokenizer.json",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "checkpoints/manifest.json",
        "checkpoints/step_0000010.pt",
        "checkpoints/step_0000020.pt",
        "eval/last.json",
    ):
        assert (pt / expected).is_file(), expected  # every file the mutations below damage
    assert (runs["dcp"].run / "checkpoints" / "step_0000010.dcp" / ".metadata").is_file()
    return runs


# ----------------------------------------------------------------------------- the scene


@dataclass
class Scene:
    """One test's directory (``area`` stands for a sweep directory):

    <tmp>/area/run       the mutated copy (the only place commands may change)
    <tmp>/area/intact    an unmutated copy (diff's other side; must stay as it is)
    <tmp>/area/victim/   what links and manifest entries point at (must stay as it is)
    <tmp>/products/      fork's out= (a new run, made outside this one)
    <tmp>/cache/         $GPTEXP_CACHE (tests/conftest.py)
    <tmp>/pwned          appears only if code from the run directory ran
    """

    tmp: Path
    pristine: Pristine

    @property
    def area(self) -> Path:
        return self.tmp / "area"

    @property
    def run(self) -> Path:
        return self.area / "run"

    @property
    def intact(self) -> Path:
        return self.area / "intact"

    @property
    def victim(self) -> Path:
        return self.area / "victim"

    @property
    def products(self) -> Path:
        return self.tmp / "products"

    @property
    def marker(self) -> Path:
        return self.tmp / "pwned"

    @property
    def manifest(self) -> Path:
        return self.run / "checkpoints" / "manifest.json"

    def newest(self) -> Path:
        return max((self.run / "checkpoints").glob("step_*"))

    def manifest_data(self) -> dict:
        return json.loads(self.manifest.read_text())

    def write_manifest(self, data: object) -> None:
        self.manifest.write_text(json.dumps(data, indent=2))


def set_scene(tmp_path: Path, pristine: Pristine) -> Scene:
    scene = Scene(tmp_path, pristine)
    shutil.copytree(pristine.run, scene.run, symlinks=True)
    shutil.copytree(pristine.run, scene.intact, symlinks=True)
    victim = scene.victim
    (victim / "evaldir").mkdir(parents=True)
    (victim / "exportdir").mkdir()
    (victim / "evaldir" / "keep.json").write_text('{"mine": true}\n')
    (victim / "exportdir" / "README.md").write_text("the user's own notes\n")
    for name in ("train.log", "samples.txt", "notes.txt", "abs"):
        (victim / name).write_text(f"the user's {name}, not gptexp's\n")
    newest_file = pristine.run / "checkpoints" / "step_0000020.pt"
    if newest_file.is_file():  # a valid checkpoint outside the run, for a link to point at
        shutil.copy2(newest_file, victim / "step_0000020.pt")
    scene.products.mkdir()
    # The pristine runs' corpus cache and CPU peak: a command need not measure them again.
    shutil.copytree(pristine.run.parent / "cache", scene.tmp / "cache", dirs_exist_ok=True)
    return scene


def outside_snapshot(scene: Scene) -> dict[str, tuple]:
    """Everything under the test's directory except the run, the cache and the products: files
    with sha256, size and mtime, links with their target, directories. Links are not followed."""
    skip = {scene.run, scene.tmp / "cache", scene.products}
    state: dict[str, tuple] = {}
    for top, dirs, files in os.walk(scene.tmp, followlinks=False):
        top_path = Path(top)
        dirs[:] = [d for d in dirs if top_path / d not in skip]
        for name in dirs + files:
            path = top_path / name
            if path in skip:
                continue
            key = str(path.relative_to(scene.tmp))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_dir():
                state[key] = ("dir",)
            else:
                stat = path.stat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                state[key] = ("file", digest, stat.st_size, stat.st_mtime_ns)
    return state


def verified_steps(run: Path) -> set[int]:
    """Steps of the checkpoints the run's manifest lists with their true sha256 (each file of a
    DCP directory), a ``.pt`` file also loading with ``weights_only=True`` at that step."""
    try:
        entries = json.loads((run / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    except Exception:  # a manifest that cannot be read verifies nothing
        return set()
    on_disk = checkpoints_on_disk(run)
    steps = set()
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            continue
        name, step = entry["file"], entry.get("step")
        if name not in on_disk or not isinstance(step, int) or STEP_NAME.fullmatch(name) is None:
            continue
        if name.endswith(".dcp"):
            files = entry.get("files")
            if isinstance(files, dict) and files and tuple(sorted(files.items())) == on_disk[name]:
                steps.add(step)
        elif entry.get("sha256") == on_disk[name]:
            try:
                state = torch.load(run / "checkpoints" / name, weights_only=True)
            except Exception:  # not loadable as plain data: not verified
                continue
            if isinstance(state, dict) and state.get("step") == step:
                steps.add(step)
    return steps


def valid_checkpoints(scene: Scene) -> dict[str, object]:
    """The run's valid checkpoints: regular files (directories for DCP) in ``checkpoints/``,
    not links, whose bytes are exactly those the pristine run's training wrote."""
    return {
        name: print_
        for name, print_ in checkpoints_on_disk(scene.run).items()
        if print_ in scene.pristine.fingerprints
    }


def lost_checkpoints(scene: Scene, before: dict[str, object]) -> list[str]:
    """What a command lost of the valid checkpoints ``before`` it ran.

    A valid checkpoint is a regular file ``checkpoints/step_*.pt`` (a directory
    ``step_*.dcp``), not reached through a link, whose sha256 (of each file) is one that the
    run's own training wrote. After a command each valid checkpoint must either

    - still be in ``checkpoints/`` with the same bytes, under its name or another (a
      checkpoint the manifest does not vouch for may be set aside, not used), or
    - be gone while the run holds a newer verified checkpoint: one listed in the manifest
      with its true sha256, loading with ``weights_only=True`` at the listed step, at a step
      beyond every valid checkpoint that existed before the command. That is retention after
      a resume that saved newer checkpoints. A valid file whose name now holds other bytes
      (overwritten, as by a restart from step 0 over intact files) is lost whatever else
      exists.
    """
    folder = scene.run / "checkpoints"
    after = checkpoints_on_disk(scene.run)
    anywhere = set()
    if folder.is_dir() and not folder.is_symlink():
        anywhere = {fingerprint(path) for path in folder.iterdir()}
    newest_before = max((int(STEP_NAME.fullmatch(n)[1]) for n in before), default=-1)
    progressed = any(step > newest_before for step in verified_steps(scene.run))
    lost = []
    for name, print_ in sorted(before.items()):
        if print_ in anywhere:
            continue
        if name in after:
            lost.append(f"{name} overwritten")
        elif not progressed:
            lost.append(f"{name} deleted, and no newer verified checkpoint exists")
    return lost


# ----------------------------------------------------------------------------- mutations

RANDOM = bytes(range(256))[::-1] * 8 + b"\xff\xfe\x00garbage\x80"
DEEP = "[" * 100_000 + "]" * 100_000


class WritesMarker:
    """A pickle that writes a marker file when unpickled (as weights_only=False would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code from the run dir ran')",))


def list_as_valid(scene: Scene, name: str) -> None:
    """Rewrite the manifest entry of ``name`` to match what is on disk now (as whoever wrote the
    run directory can): hashes alone do not make a file safe to load."""
    data = scene.manifest_data()
    path = scene.run / "checkpoints" / name
    for entry in data["checkpoints"]:
        if entry["file"] != name:
            continue
        if path.is_dir():
            from gptexp.checkpoint.dcp import listing_digest

            entry["files"] = {
                m.name: hashlib.sha256(m.read_bytes()).hexdigest() for m in path.iterdir()
            }
            entry["sha256"] = listing_digest(entry["files"])
        else:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["bytes"] = path.stat().st_size
            entry["xxh3_128"] = None  # as in manifests written before gptexp listed XXH3
    scene.write_manifest(data)


def link_out(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def manifest_entry_at(scene: Scene, file: str) -> None:
    data = scene.manifest_data()
    oldest = dict(data["checkpoints"][0])
    data["checkpoints"].insert(0, oldest | {"file": file, "step": 1, "reasons": ["periodic"]})
    scene.write_manifest(data)


def wrong_types(scene: Scene) -> None:
    data = scene.manifest_data()
    first, second, third = data["checkpoints"][:3]
    first.update(step="ten", bytes="many", metric={"val": 1})
    second.update(sha256=12345, reasons="periodic", time=[1])
    third.update(file=20, files="none")
    data["checkpoints"].append("not an entry")
    scene.write_manifest(data)


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for at in range(len(data) // 3, len(data) // 3 + 64):
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def code_pickle_checkpoint(scene: Scene) -> None:
    newest = scene.newest()
    torch.save({"model": WritesMarker(scene.marker), "step": 20}, newest)
    list_as_valid(scene, newest.name)


def state_wrong_types(scene: Scene) -> None:
    """The newest checkpoint's training state (gptexp.training.state.TrainState) with values of the
    wrong types, listed as valid: its tensors load, its counters must not."""
    newest = scene.newest()
    state = torch.load(newest, weights_only=True)
    torch.save(state | {"step": "twenty", "guard": {"events": "x"}}, newest)
    list_as_valid(scene, newest.name)


def code_pickle_dcp_metadata(scene: Scene) -> None:
    newest = scene.newest()
    (newest / ".metadata").write_bytes(pickle.dumps(WritesMarker(scene.marker)))
    list_as_valid(scene, newest.name)


def dcp_files_empty(scene: Scene) -> None:
    data = scene.manifest_data()
    data["checkpoints"][-1]["files"] = {}
    scene.write_manifest(data)
    flip_bytes(scene.newest() / "__0_0.distcp")  # nothing listed, so nothing would notice


def corpus_cache(scene: Scene, data: bytes) -> None:
    """Every file of the corpus cache (the scene's copy of the pristine one) replaced."""
    cache = scene.tmp / "cache"
    for name in scene.pristine.cache_files:
        assert (cache / name).is_file(), name
        (cache / name).write_bytes(data)


def move_out(scene: Scene, name: str) -> None:
    """``name`` (a file or folder of the run) moved beside the run, a link left in its place:
    what a command reads through it is the run's own, what it writes lands outside."""
    outside = scene.victim / Path(name).name.lstrip(".")
    shutil.move(scene.run / name, outside)
    (scene.run / name).symlink_to(outside, target_is_directory=outside.is_dir())


def temporaries_link_out(scene: Scene) -> None:
    """Links where gptexp's next writes put their temporary files."""
    target = scene.victim / "notes.txt"
    for name in (
        "run.json.tmp",
        "metrics.jsonl.tmp",
        "checkpoints/manifest.json.tmp",
        "checkpoints/step_0000022.pt.tmp",
        "eval/last.json.tmp",
    ):
        (scene.run / name).symlink_to(target)


def link_loops(scene: Scene) -> None:
    (scene.run / "loop").symlink_to(".", target_is_directory=True)
    (scene.run / "up").symlink_to("..", target_is_directory=True)
    # Two links back to the sweep dir: a walk that follows them has 2**depth paths to see.
    (scene.area / "again").symlink_to(".", target_is_directory=True)
    (scene.area / "around").symlink_to("../area", target_is_directory=True)


def rel(scene: Scene, name: str) -> Path:
    return scene.run / name


def append(scene: Scene, line: bytes) -> None:
    """One more line in metrics.jsonl, after the run's own (a record completed by ``}``, for
    the JSON ones)."""
    with open(scene.run / "metrics.jsonl", "ab") as f:
        f.write(line + (b"}" if line.startswith(b"{") else b"") + b"\n")


MUTATIONS = {
    "intact": lambda s: None,
    # manifest.json
    "manifest-missing": lambda s: s.manifest.unlink(),
    "manifest-random-bytes": lambda s: s.manifest.write_bytes(RANDOM),
    "manifest-a-list": lambda s: s.write_manifest([1, 2, 3]),
    "manifest-entry-parent-path": lambda s: manifest_entry_at(s, "../../victim"),
    "manifest-entry-absolute-path": lambda s: manifest_entry_at(s, str(s.victim / "abs")),
    "manifest-wrong-types": wrong_types,
    "manifest-cut-in-half": lambda s: truncate_half(s.manifest),
    "manifest-lists-only-oldest": lambda s: s.write_manifest(
        s.manifest_data() | {"checkpoints": s.manifest_data()["checkpoints"][:1]}
    ),
    # a checkpoint file
    "ckpt-newest-truncated": lambda s: truncate_half(s.newest()),
    "ckpt-newest-bytes-flipped": lambda s: flip_bytes(s.newest()),
    "ckpt-newest-code-pickle": code_pickle_checkpoint,
    "ckpt-newest-links-outside": lambda s: link_out(s.newest(), s.victim / "step_0000020.pt"),
    "ckpt-newest-state-wrong-types": state_wrong_types,
    # run.json
    "runjson-missing": lambda s: rel(s, "run.json").unlink(),
    "runjson-a-list": lambda s: rel(s, "run.json").write_text("[1, 2]"),
    "runjson-random-bytes": lambda s: rel(s, "run.json").write_bytes(RANDOM),
    "runjson-100k-deep": lambda s: rel(s, "run.json").write_text(DEEP),
    # metrics.jsonl
    "metrics-5000-digit-number": lambda s: append(s, b'{"step": 20, "val/loss": 7' + b"7" * 4999),
    "metrics-deep-nesting": lambda s: append(s, b'{"step": 20, "val/loss": ' + DEEP.encode()),
    "metrics-random-bytes-line": lambda s: append(s, RANDOM),
    "metrics-missing": lambda s: rel(s, "metrics.jsonl").unlink(),
    # .hydra/
    "hydra-config-garbage": lambda s: rel(s, ".hydra/config.yaml").write_bytes(
        b"model: [unclosed\n\t- {" + RANDOM
    ),
    "hydra-config-missing": lambda s: rel(s, ".hydra/config.yaml").unlink(),
    "hydra-overrides-garbage": lambda s: rel(s, ".hydra/overrides.yaml").write_bytes(
        b"- {a: [\n" + RANDOM
    ),
    "hydra-overrides-missing": lambda s: rel(s, ".hydra/overrides.yaml").unlink(),
    # the tokenizer and the corpus cache
    "tokenizer-random-bytes": lambda s: rel(s, "tokenizer.json").write_bytes(RANDOM),
    "tokenizer-a-list": lambda s: rel(s, "tokenizer.json").write_text('["a", "b"]'),
    "corpus-cache-garbage": lambda s: corpus_cache(s, RANDOM),
    "corpus-cache-code-pickle": lambda s: corpus_cache(s, pickle.dumps(WritesMarker(s.marker))),
    # links out of the run
    "trainlog-links-outside": lambda s: link_out(rel(s, "train.log"), s.victim / "train.log"),
    "eval-dir-links-outside": lambda s: link_out(rel(s, "eval"), s.victim / "evaldir"),
    "export-dir-links-outside": lambda s: link_out(rel(s, "export"), s.victim / "exportdir"),
    "samples-links-outside": lambda s: link_out(rel(s, "samples.txt"), s.victim / "samples.txt"),
    "runjson-links-outside": lambda s: move_out(s, "run.json"),
    "metrics-links-outside": lambda s: move_out(s, "metrics.jsonl"),
    "lock-links-outside": lambda s: link_out(rel(s, ".lock"), s.victim / "notes.txt"),
    "hydra-dir-links-outside": lambda s: move_out(s, ".hydra"),
    "checkpoints-dir-links-outside": lambda s: move_out(s, "checkpoints"),
    "eval-result-links-outside": lambda s: link_out(rel(s, "eval/last.json"), s.victim / "abs"),
    "temporaries-link-outside": temporaries_link_out,
    "directory-link-loops": link_loops,
    # DCP checkpoints (the dcp run)
    "dcp-intact": lambda s: None,
    "dcp-manifest-files-empty": dcp_files_empty,
    "dcp-metadata-code-pickle": code_pickle_dcp_metadata,
    "dcp-shard-truncated": lambda s: truncate_half(s.newest() / "__0_0.distcp"),
}


# ----------------------------------------------------------------------------- commands


def commands(scene: Scene) -> dict[str, tuple[str, list[str]]]:
    """Each command as (module, arguments)."""
    run = str(scene.run)
    return {
        "eval": ("gptexp.eval", [f"run={run}", "max_new_tokens=20"]),
        "export": ("gptexp.export", [f"run={run}"]),
        # keep_last=1: retention at its sharpest, so that a wrong deletion shows
        "resume": ("gptexp.resume", [f"run={run}", MORE_STEPS, "checkpoint.keep_last=1"]),
        "fork": ("gptexp.fork", [f"run={run}", f"out={scene.products / 'fork'}", MORE_STEPS]),
        "compare": ("gptexp.compare", [str(scene.area)]),
        "compare-tree": ("gptexp.compare", ["--tree", str(scene.area)]),
        "diff": ("gptexp.diff", [str(scene.intact), run]),
        "repair": ("gptexp.repair", [f"run={run}"]),
    }


def has_command(module: str) -> bool:
    """Whether this checkout has ``module`` (an editable install of another checkout can
    answer for a module this one lacks)."""
    import gptexp

    spec = importlib.util.find_spec(module)
    return spec is not None and Path(spec.origin).parent == Path(gptexp.__file__).parent


HAS_REPAIR = has_command("gptexp.repair")
COMMANDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name == "repair" and not HAS_REPAIR, reason="no gptexp.repair yet"
        ),
    )
    for name in ("eval", "export", "resume", "fork", "compare", "compare-tree", "diff", "repair")
]
CONTROLS = {"intact", "dcp-intact"}
# A damaged newest checkpoint is skipped and the newest valid one used (docs/checkpoints.md):
# resume carries the run on to its new max_steps from an older checkpoint.
DAMAGED_NEWEST = {
    "ckpt-newest-truncated",
    "ckpt-newest-bytes-flipped",
    "ckpt-newest-code-pickle",
    "dcp-manifest-files-empty",
    "dcp-metadata-code-pickle",
    "dcp-shard-truncated",
}
# Where only a real process will do: a walk through a link loop may never end.
IN_A_PROCESS = {("directory-link-loops", "compare"), ("directory-link-loops", "compare-tree")}


def run_in_this_process(module: str, args: list[str], cwd: Path) -> tuple[int | str, str]:
    main = importlib.import_module(module).main
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code, stderr = call_main(main, *args, cwd=cwd)
    except BaseException as error:  # noqa: BLE001 - an escaped exception is the finding
        return f"raised {type(error).__name__}: {str(error)[:300]}", stdout.getvalue()
    return code, stdout.getvalue() + stderr


def run_in_a_process(module: str, args: list[str], cwd: Path) -> tuple[int | str, str]:
    try:
        result = run_module(
            module, *args, cwd=cwd, timeout=60, env=subprocess_env(GPTEXP_CACHE=str(cwd / "cache"))
        )
    except subprocess.TimeoutExpired:
        return "did not finish in 60 s", ""
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_command_on_a_hostile_run(mutation, command, pristine_runs, tmp_path):
    pristine = pristine_runs["dcp" if mutation.startswith("dcp-") else "pt"]
    scene = set_scene(tmp_path, pristine)
    MUTATIONS[mutation](scene)
    outside = outside_snapshot(scene)
    valid = valid_checkpoints(scene)

    module, args = commands(scene)[command]
    runner = run_in_a_process if (mutation, command) in IN_A_PROCESS else run_in_this_process
    code, output = runner(module, args, tmp_path)

    problems = []
    # The commands themselves are well-formed: each succeeds on an intact run (repair lists
    # .pt files only and, as documented, refuses a run of DCP directories alone).
    if mutation in CONTROLS and code != 0 and (mutation, command) != ("dcp-intact", "repair"):
        problems.append(f"exit {code} on an intact run")
    if isinstance(code, str):  # an exception escaped main(), or the process never ended
        problems.append(code)
    elif code not in (0, 1, 2):
        problems.append(f"exit {code}")
    if TRACEBACK in output:
        problems.append("a traceback")
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    if len(errors) > 1:
        problems.append(f"{len(errors)} error: lines")
    if scene.marker.exists():
        problems.append("code from the run directory ran")
    now = outside_snapshot(scene)
    changed = sorted(k for k in outside.keys() | now.keys() if outside.get(k) != now.get(k))
    if changed:
        problems.append(f"changed outside the run: {', '.join(changed[:6])}")
    problems += lost_checkpoints(scene, valid)
    if (
        command == "resume"
        and mutation in DAMAGED_NEWEST
        and NEW_MAX_STEPS not in verified_steps(scene.run)
    ):
        problems.append(f"the resume (exit {code}) did not reach a verified step {NEW_MAX_STEPS}")
    assert not problems, f"{mutation} / {command}: {'; '.join(problems)}\n{output[-2500:]}"
