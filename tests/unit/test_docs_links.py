"""The user documentation's links resolve, and the README stays a first screen (issue 24 item 5).

Every relative markdown link in README.md, docs/*.md, tests/README.md, benchmarks/README.md and
patches/README.md must name a file or folder that exists; a ``#anchor`` must name a heading of the target page,
slugged as GitHub slugs them (lower case, punctuation dropped, spaces to hyphens, ``-N`` for
repeats). Links and headings inside fenced code blocks do not count. The README is at most
220 lines: reference material lives in docs/, the test inventory here, results in benchmarks/.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "tests" / "README.md", ROOT / "benchmarks" / "README.md",
                ROOT / "patches" / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 220

_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text):
    """The lines outside fenced code blocks (``` or ~~~), where links and headings count."""
    fence = None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = stripped[:3]
        if marker in ("```", "~~~"):
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            yield line


def slug(heading):
    """GitHub's anchor of a heading: markup dropped, lower case, only word characters, spaces and
    hyphens kept, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page):
    """Every anchor a page defines, repeats numbered as GitHub numbers them."""
    seen, found = {}, set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page):
    """(target path, anchor or None) of each relative link on the page."""
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            yield path, anchor or None


def test_slug_matches_github_rules():
    assert slug("15. The branch's cost: kernels and recompute") == "15-the-branchs-cost-kernels-and-recompute"
    assert slug("Train: `scripts/pretrain_gpt_lora.py`") == "train-scriptspretrain_gpt_lorapy"
    assert slug("Transformer Engine, precision, fusion") == "transformer-engine-precision-fusion"


def test_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "tests/README.md", "benchmarks/README.md", "docs/design.md"} <= names
    assert all(p.is_file() for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    links = list(relative_links(page))
    for path, anchor in links:
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path}: no such file (from {page.parent.relative_to(ROOT).as_posix() or '.'})")
        elif anchor is not None and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{path}#{anchor}: no such heading in {target.relative_to(ROOT).as_posix()}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_every_page_is_linked_from_the_readme_or_docs():
    """A page nobody links to is a page nobody reads."""
    linked = set()
    for page in PAGES:
        for path, _ in relative_links(page):
            if path:
                linked.add((page.parent / path).resolve())
    readme = (ROOT / "README.md").resolve()
    orphans = [p.relative_to(ROOT).as_posix() for p in PAGES if p.resolve() not in linked | {readme}]
    assert not orphans, f"pages no other page links to: {orphans}"


def test_readme_is_a_first_screen():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, expected at most {README_MAX_LINES}: move reference material to docs/, "
        "the test inventory to tests/README.md and results to benchmarks/README.md")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
