"""The documentation stands alone: no references to internal planning notes or issue numbers, and every relative
link in the Markdown documents leads to a file (and heading) that exists."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------------------------------------
# The documentation site and its API reference

API_PAGE = ROOT / "docs" / "api.md"
# The public modules and the names each exports (``__all__``); each must be documented in docs/api.md.
PUBLIC_MODULES = ["symadj_plugins", "symadj_plugins.torchdiffeq", "symadj_plugins.torchdyn", "torch_symplectic_adjoint",
                  "symadj_plugins.migrate", "symadj_plugins.bench"]
DIRECTIVE = re.compile(r"^::: ([\w.]+)", re.M)


def _resolve(dotted: str):
    """The object a ``::: a.b.c`` directive documents, found as mkdocstrings finds it: the longest importable module
    prefix, then attributes (so ``symadj_plugins.options`` is the module; the function is
    ``symadj_plugins.options.options``)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def undocumented(api_text: str, modules: list[str]) -> list[str]:
    """``module.name`` for each public name of ``modules`` that no ``:::`` directive of ``api_text`` documents."""
    import importlib

    documented = [_resolve(d) for d in DIRECTIVE.findall(api_text)]
    missing = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            if name.startswith("__"):
                continue
            obj = getattr(module, name)
            if not any(obj is d for d in documented):
                missing.append(f"{module_name}.{name}")
    return missing


def test_every_public_name_is_in_the_api_reference():
    missing = undocumented(API_PAGE.read_text(encoding="utf-8"), PUBLIC_MODULES)
    assert not missing, "public names missing from docs/api.md (add a '::: module.name' line):\n" + "\n".join(missing)


def test_the_api_check_finds_a_missing_name():
    text = "::: symadj_plugins.register\n::: symadj_plugins.options.options\n"
    assert undocumented(text, ["symadj_plugins"]) == ["symadj_plugins.SymplecticAdjoint", "symadj_plugins.unregister",
                                                      "symadj_plugins.is_registered"]


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # No network at build time: a proxy that refuses every connection makes any fetch (fonts, inventories) fail.
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=300, env=env)


def test_the_documentation_site_builds_strictly_and_offline(tmp_path):
    proc = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    # The reference shows the signatures: every argument of the main entry point, with its default.
    from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint
    for name in inspect.signature(odeint_symplectic_adjoint).parameters:
        assert name in api, name
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "migration" / "index.html").exists()


def test_a_docstring_naming_an_argument_the_signature_lacks_fails_the_build(tmp_path):
    # What keeps the reference from going stale: rename an argument, forget the docstring, and the build fails.
    (tmp_path / "pkg_renamed.py").write_text(
        'def solve(y0, budget=0):\n    """Solves.\n\n    Args:\n        y0: the state.\n'
        '        memory_budget: how much to keep.\n    """\n', encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# API\n\n::: pkg_renamed.solve\n", encoding="utf-8")
    (tmp_path / "mkdocs.yml").write_text(
        "site_name: t\nplugins:\n  - mkdocstrings:\n      handlers:\n        python:\n          paths: [.]\n",
        encoding="utf-8")
    proc = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0 and "memory_budget" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------
# Measured numbers come from the results files

RESULT_DOCS = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md"]
MEASURED = re.compile(r"\d(?: [KMG]iB|×)|\d\.\d+e[-+]\d\d")  # a memory figure (5.03 MiB), a ratio (1.25×), an error
TABLE_ROW = re.compile(r"^\|.*\|[ \t]*$", re.M)


def test_every_results_table_equals_what_its_file_renders():
    from symadj_plugins.bench.render import stale_blocks
    stale = stale_blocks()
    assert not stale, ("tables that differ from docs/results (python -m symadj_plugins.bench.render rewrites "
                       "them):\n" + "\n".join(stale))


def test_a_table_edited_by_hand_is_found(tmp_path):
    from symadj_plugins.bench.render import load_all, render_text, stale_blocks
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "cnf.json").write_bytes((ROOT / "docs" / "results" / "cnf.json").read_bytes())
    template = "# T\n\n<!-- results:cnf -->\nold\n<!-- /results:cnf -->\n"
    fresh = render_text(template, load_all(tmp_path / "docs" / "results"), tmp_path / "README.md")
    (tmp_path / "README.md").write_text(fresh, encoding="utf-8")
    assert stale_blocks(tmp_path) == [] and "| `backprop` |" in fresh
    (tmp_path / "README.md").write_text(fresh.replace("| `backprop` |", "| `backprop` (edited) |"), encoding="utf-8")
    assert stale_blocks(tmp_path) == ["README.md: cnf"]


def measured_rows_outside_blocks(text: str) -> list[str]:
    """Table rows with a measured figure (bytes, a ratio, an error) that are not inside a results block."""
    from symadj_plugins.bench.render import BLOCK
    outside = BLOCK.sub("", text)
    return [row for row in TABLE_ROW.findall(FENCE.sub("", outside)) if MEASURED.search(row)]


def test_no_measured_table_is_written_by_hand():
    found = [f"{path.relative_to(ROOT)}: {row}" for path in RESULT_DOCS
             for row in measured_rows_outside_blocks(path.read_text(encoding="utf-8"))]
    assert not found, "measured tables must come from docs/results (a '<!-- results:NAME -->' block):\n" + \
        "\n".join(found)


def test_the_hand_written_table_check_finds_one():
    text = ("| a | b |\n|---|---|\n| ours | 3.5 MiB |\n\n<!-- results:cnf -->\n| x | 1.0× |\n"
            "<!-- /results:cnf -->\n| design | no figure |\n")
    assert measured_rows_outside_blocks(text) == ["| ours | 3.5 MiB |"]


def test_the_readme_is_short_and_keeps_the_set_up_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    lines = readme.splitlines()
    # .ci/run runs the line after '# 2. ': it must install everything the tests need (the dev extra: docs tools too).
    command = lines[next(i for i, line in enumerate(lines) if line.startswith("# 2. ")) + 1]
    assert "pytest" in command and ".[torchdyn,dev]" in command


def test_a_problem_without_blocks_of_its_own_renders_as_the_report_prints_it():
    # A new benchmark problem needs no rendering code: PROBLEM-run and PROBLEM blocks work for any results file.
    import dataclasses

    from symadj_plugins.bench.render import load_all, render_block
    from symadj_plugins.bench.report import problem_section
    loaded = load_all()
    records, meta = loaded["steps"]
    loaded["new"] = ([dataclasses.replace(r, problem="new") for r in records], meta)
    assert render_block("new", loaded) == problem_section("new", loaded["new"][0]).rstrip("\n") + "\n"
    assert render_block("new-run", loaded).startswith("_Measured by `python -m symadj_plugins.bench")
    with pytest.raises(KeyError, match="unknown results block 'other'"):
        render_block("other", loaded)
