"""The documentation stays navigable: a short README front page whose links all resolve.

The README is the front page (at most 10,000 characters, starting with the two setup
commands); the references live in docs/. Every relative link in the README and in
docs/*.md must name a file that exists, and a `#anchor` a heading of that file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (outside code blocks)."""
    out, fenced = set(), False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def relative_links(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_a_short_front_page() -> None:
    text = README.read_text()
    assert len(text) <= 10_000, f"README.md has {len(text)} characters; move detail to docs/"
    commands = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert commands[0].startswith("bash scripts/setup.sh && .venv/bin/python examples/demo.py ")
    assert commands[1].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest -q ")


def test_readme_links_every_doc() -> None:
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    assert {d.resolve() for d in DOCS} <= linked


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda d: d.name)
def test_relative_links_resolve(doc: Path) -> None:
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name} links to missing {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{doc.name} links to missing anchor {target}"
