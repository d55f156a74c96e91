"""The documentation holds together: README.md is the first page, docs/*.md the topics.

Every relative link in README.md and docs/*.md points to a file that exists, and every
``#anchor`` to a heading of its file (GitHub's anchor for it); every page of docs/ is linked
from README.md, so none is an orphan a newcomer never finds. Pure file reading, no subprocess.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"(?<!!)\[(?:[^\]]*)\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code blanked out (no links there)."""
    lines, fence = [], None
    for line in text.splitlines():
        mark = re.match(r"\s*(```+|~~~+)", line)
        if mark:
            if fence is None:
                fence = mark.group(1)[0] * 3
            elif mark.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: code and link marks dropped, lower case, punctuation
    other than '-' and '_' removed, each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in text.splitlines():
        mark = re.match(r"\s*(```+|~~~+)", line)
        if mark:
            fence = None if fence else mark.group(1)[0] * 3
            continue
        heading = None if fence else HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file or heading does not exist."""
    broken = []
    for line in prose(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f"{target}: no file {file}")
            elif anchor and anchor not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_resolves(page):
    assert broken_links(page) == []


def test_every_doc_is_linked_from_the_readme():
    readme = "\n".join(prose((ROOT / "README.md").read_text(encoding="utf-8")))
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme) if ":" not in t}
    docs = set(PAGES[1:])
    assert docs, "docs/ holds the topics"
    assert sorted(p.name for p in docs - linked) == []


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    """The checks above can fail: a missing file and a missing heading are reported, a good
    link, a link inside code and a web address are not."""
    (tmp_path / "b.md").write_text("# Loss spikes and NaN: `training.guard`\n## Seeds\n## Seeds\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#loss-spikes-and-nan-trainingguard) [ok](b.md#seeds-1) [web](https://x.org/y)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](missing.md) [bad](b.md#no-such-heading) [self](#nor-here)\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == [
        "missing.md",
        "b.md#no-such-heading",
        "#nor-here",
    ]
