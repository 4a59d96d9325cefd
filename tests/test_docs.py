"""The documentation stands alone: no references to internal planning notes or issue numbers, and every relative
link in the Markdown documents leads to a file (and heading) that exists."""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Internal design notes and the issue tracker are not shipped; text that cites them dangles for every reader.
DANGLING = re.compile(r"DESIGN\.md|DESIGN\s*§|/work/shared|\b[Ii]ssues?\s*#?\d+")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "MIGRATION.md", *sorted((ROOT / "docs").glob("*.md"))]


def shipped_text_files() -> list[Path]:
    return [*markdown_files(), *sorted((ROOT / "symadj_plugins").rglob("*.py")),
            *sorted((ROOT / "examples").glob("*.py")), *sorted((ROOT / "compat").rglob("*.py"))]


def dangling_references(text: str) -> list[tuple[int, str]]:
    """``(line number, match)`` for each reference to the internal notes or to an issue number."""
    return [(number, m.group(0)) for number, line in enumerate(text.splitlines(), start=1)
            for m in DANGLING.finditer(line)]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(ch for ch in heading.strip().lower()
                   if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    for line in FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = github_anchor(m.group(1))
            anchor, n = base, 0
            while anchor in found:  # GitHub numbers repeated headings
                n += 1
                anchor = f"{base}-{n}"
            found.add(anchor)
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links in ``path`` whose file, or whose heading in a Markdown file, does not exist."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    broken = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked})")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{fragment} in {linked.name})")
    return broken


def test_no_references_to_internal_notes_or_issue_numbers():
    found = [f"{path.relative_to(ROOT)}:{line}: {match!r}"
             for path in shipped_text_files() for line, match in dangling_references(path.read_text(encoding="utf-8"))]
    assert not found, ("user-facing text cites internal notes or issue numbers; say what is meant, or link "
                       "docs/design.md:\n" + "\n".join(found))


def test_every_relative_markdown_link_resolves():
    found = [f"{path.relative_to(ROOT)}: {link}" for path in markdown_files() for link in broken_links(path)]
    assert not found, "broken relative links:\n" + "\n".join(found)


def test_the_design_document_is_linked_from_the_readme_and_has_its_sections():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    numbered = [int(n) for n in re.findall(r"^## (\d+)\. ", design, re.M)]
    assert numbered == list(range(1, 9)), f"docs/design.md sections are numbered {numbered}, expected 1..8"
    assert "](docs/design.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# The checkers themselves must be able to fail.

def test_the_reference_check_finds_what_it_must():
    text = "see DESIGN.md\nas in DESIGN §2\nfixes issue 9\nIssue #12 too\nthe design.md file and no issues here\n"
    assert [line for line, _ in dangling_references(text)] == [1, 2, 3, 4]


def test_the_link_check_finds_missing_files_and_headings(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Title\n\n## 2. A heading, with `code`\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#2-a-heading-with-code) [bad](missing.md) [gone](other.md#nope) "
                    "[web](https://example.com) [self](#local)\n\n# Local\n\n```\n[in code](nowhere.md)\n```\n",
                    encoding="utf-8")
    assert broken_links(page) == ["missing.md (no file missing.md)", "other.md#nope (no heading #nope in other.md)"]
