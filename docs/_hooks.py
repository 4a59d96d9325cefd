"""mkdocs hooks: README.md and MIGRATION.md (at the top of the repository, where GitHub shows them) become the
site's ``index.md`` and ``migration.md``, and every relative link that leaves docs/ (the examples, LICENSE, the
tests a claim cites) becomes a link to the file on GitHub, so that one Markdown source serves both."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/symadj-plugins/symadj-plugins/blob/main/"
TOP_PAGES = {"README.md": "index.md", "MIGRATION.md": "migration.md"}
LINK = re.compile(r"(\]\()(?!https?:|mailto:|#)([^)\s]+)(\))")


def on_files(files, config):
    for source, page in TOP_PAGES.items():
        files.append(File.generated(config, page, content=(ROOT / source).read_text(encoding="utf-8")))
    return files


def _rewrite(target: str, page_dir: str) -> str:
    """``target`` (relative to ``page_dir``, a folder of the repository) as a link from a page at the site's top."""
    path, hash_, fragment = target.partition("#")
    repo_path = posixpath.normpath(posixpath.join(page_dir, path)) if path else ""
    if not path:
        return target
    if repo_path in TOP_PAGES:
        site = TOP_PAGES[repo_path]
    elif repo_path.startswith("docs/") and repo_path.endswith(".md"):
        site = repo_path[len("docs/"):]
    elif repo_path.startswith("docs/"):
        site = repo_path[len("docs/"):]  # figures and results files are part of the site
    else:
        site = REPOSITORY + repo_path
    return site + hash_ + fragment


def on_page_markdown(markdown, page, config, files):
    name = page.file.src_uri
    page_dir = "." if name in TOP_PAGES.values() else posixpath.dirname("docs/" + name)
    return LINK.sub(lambda m: m.group(1) + _rewrite(m.group(2), page_dir) + m.group(3), markdown)
