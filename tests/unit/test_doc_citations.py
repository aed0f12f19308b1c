"""Every page of ``docs/`` that the code cites exists, and so does the section it names.

Product code cites its derivations as ``docs/<page>.md`` optionally followed by
``, "<section>"``; the section must begin a heading of that page (so a renamed heading or a
moved derivation breaks the build, not the reader's trust).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "site_agent", "orchestrator")
CITATION = re.compile(r'docs/([\w.-]+\.md)`*(?:,\s*"([^"]+)")?')
HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.MULTILINE)


def citations(source: str) -> list[tuple[str, str | None]]:
    """(page, section or None) of every citation; wrapped lines and comment marks are joined."""
    flat = re.sub(r"\s*\n\s*#*\s*", " ", source)
    return [(m.group(1), m.group(2)) for m in CITATION.finditer(flat)]


def _headings(page: Path) -> list[str]:
    return [h.replace("`", "").strip().lower() for h in HEADING.findall(page.read_text())]


def problems(path: str, source: str, docs: Path) -> list[str]:
    found: list[str] = []
    for page, section in citations(source):
        doc = docs / page
        if not doc.is_file():
            found.append(f"{path} cites docs/{page}, which does not exist")
        elif section is not None:
            want = section.replace("`", "").strip().lower()
            if not any(h.startswith(want) for h in _headings(doc)):
                found.append(f'{path} cites docs/{page}, "{section}": no such heading')
    return found


def test_every_cited_page_and_section_exists() -> None:
    found: list[str] = []
    for package in PRODUCT:
        for f in sorted((ROOT / package).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            found += problems(rel, f.read_text(), ROOT / "docs")
    assert not found, "\n".join(found)


def test_wrapped_citations_are_read_whole() -> None:
    source = '    """See ``docs/accounting.md``, "Running\n    figures"."""\n    # docs/x.md, "A\n    # b"'
    assert citations(source) == [("accounting.md", "Running figures"), ("x.md", "A b")]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('"""docs/nowhere.md."""', "does not exist"),
        ('"""``docs/accounting.md``, "No such section"."""', "no such heading"),
    ],
)
def test_a_dangling_citation_is_reported(source: str, expected: str) -> None:
    found = problems("common/x.py", source, ROOT / "docs")
    assert len(found) == 1 and expected in found[0], found


def test_a_good_citation_passes() -> None:
    assert problems("common/x.py", '"""``docs/accounting.md``, "PRV"."""', ROOT / "docs") == []
