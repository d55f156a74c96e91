"""The readers of a run directory's files on damaged input: each raises the project's own error
naming the file and what is wrong (one line), never a parser's traceback. The commands on top
of them (compare, eval, diff) are tested in their own modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptexp.core.errors import DataError, RunError
from gptexp.data.tokenizers import read_tokenizer, tokenizer_from_json
from gptexp.observe.metrics import read_metrics
from gptexp.observe.rundir import RunDirectory, stored_config

DEEP = "[" * 100_000 + "]" * 100_000
GARBAGE = [
    ("list", b"[1, 2]"),
    ("deep", DEEP.encode()),
    ("bytes", bytes(range(256))),
    ("long-int", b'{"a": ' + b"9" * 5000 + b"}"),
    ("empty", b""),
]


@pytest.mark.parametrize("content", [c for _, c in GARBAGE], ids=[n for n, _ in GARBAGE])
def test_a_damaged_run_json_is_a_run_error_naming_it(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "run.json").write_bytes(content)
    run = RunDirectory(tmp_path)
    for read in (run.read_status, run.status, lambda: stored_config(run)):
        with pytest.raises(RunError, match=r"run\.json: damaged \(") as error:
            read()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "content",
    [b"a: [1\n", b"\xff\xfe", b"just text", b"- 1\n- [2]\n", DEEP.encode()],
    ids=["yaml", "bytes", "text", "not-strings", "deep"],
)
def test_damaged_hydra_files_are_run_errors(tmp_path: Path, content: bytes) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_bytes(content)
    (tmp_path / ".hydra" / "config.yaml").write_bytes(content)
    run = RunDirectory(tmp_path)
    with pytest.raises(RunError, match=r"overrides\.yaml: damaged"):
        run.overrides()
    if content != b"just text":  # read as {"just text": None}: to_train_config refuses it
        with pytest.raises(RunError, match=r"config\.yaml: damaged"):
            stored_config(run)


def test_a_config_that_is_not_a_mapping_in_run_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"status": "finished", "config": [1]}))
    with pytest.raises(RunError, match=r"run\.json: damaged \(its config is not a mapping\)"):
        stored_config(RunDirectory(tmp_path))


def test_damaged_metrics_lines_are_counted_in_one_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"step": 1, "train/loss": 3.0}',
        '{"step": 2, "x": ' + "9" * 5000 + "}",  # Python's limit on an int's digits
        '{"step": 3, "x": ' + DEEP + "}",
        "\udcff".encode("utf-8", "surrogatepass").decode("latin-1"),
        '{"step": true}',
        "[1]",
        '{"step": 4, "train/loss": 2.0}',
        '{"step": 5, "train/lo',  # torn by a crash mid-write: silently skipped
    ]
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 4]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "skipped 5 damaged lines" in warnings[0], warnings


@pytest.mark.parametrize(
    "content, why",
    [
        (b"[1]", "no known kind"),
        (DEEP.encode(), "damaged tokenizer"),
        (b'{"kind": "char", "chars": 5}', "not a list of single characters"),
        (b'{"kind": "char", "chars": ["ab", "c"]}', "not a list of single characters"),
        (b'{"kind": "char", "chars": ["a", "a"]}', "listed twice"),
        (b'{"kind": "bpe", "tokenizer": "{"}', "damaged tokenizer"),
        (b'{"kind": "wordpiece"}', "no known kind"),
        (b"\xff\xfe\xfd", "damaged tokenizer"),
    ],
    ids=["list", "deep", "chars-int", "chars-long", "chars-twice", "bpe", "kind", "bytes"],
)
def test_a_damaged_tokenizer_json_is_a_data_error_naming_it(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=why) as error:
        read_tokenizer(path)
    assert str(error.value).startswith(f"{path}: damaged tokenizer")
    assert "\n" not in str(error.value)


def test_a_good_tokenizer_json_still_loads() -> None:
    tokenizer = tokenizer_from_json(json.dumps({"kind": "char", "chars": ["a", "b", "\n"]}))
    assert tokenizer.decode(tokenizer.encode("ab\n")) == "ab\n"


def test_a_hand_edited_resumes_field_does_not_stop_a_resume(finished_run: Path, tmp_path: Path):
    """run.json's ``resumes`` edited into a number: the resume goes on and keeps it, listed."""
    import shutil

    import gptexp.resume
    from tests.conftest import call_main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    status = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(status | {"resumes": 5}))
    max_steps = status["config"]["training"]["max_steps"]
    code, stderr = call_main(
        gptexp.resume.main, f"run={run}", f"training.max_steps={max_steps + 2}"
    )
    assert code == 0, stderr
    resumes = json.loads((run / "run.json").read_text())["resumes"]
    assert resumes[0] == {"replaced": 5} and resumes[1]["from_step"] == max_steps


@pytest.mark.parametrize(
    "parent",
    [
        None,
        [],
        {"step": 10},
        {"run": "/elsewhere", "step": "10"},
        {"run": "/elsewhere", "step": -1},
        {"run": "/elsewhere", "step": True},
        {"run": 5, "step": 10},
    ],
)
def test_a_hand_edited_parent_link_is_no_link_for_every_tool(parent) -> None:
    """observe.lineage.fork_parent is the one reading of run.json's ``parent``: compare's
    rows, the family tree, diff's lineage, repair and the W&B lineage all take a damaged link
    for none (the run reads as a root) instead of failing on it."""
    from gptexp.observe.lineage import fork_parent
    from gptexp.run.forking import wandb_lineage

    status = {"parent": parent}
    assert fork_parent(status) is None
    assert wandb_lineage(status) == {}


def test_a_parent_link_is_read_once_the_same_way() -> None:
    from gptexp.observe.lineage import fork_parent

    link = {"run": "/runs/a", "step": 10, "sha256": "ab" * 32, "wandb_id": "x"}
    assert fork_parent({"parent": link}) == link
