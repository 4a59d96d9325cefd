"""Files: migrating one (a ``.py`` file here, a notebook in :mod:`.notebook`), and finding them under directories."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import libcst as cst

from .notebook import migrate_notebook
from .result import Result, atomic_write, read
from .source import transform


def migrate_file(path: str, write: bool = False) -> Result:
    """Migrates one file; writes it (atomically) only with ``write=True`` and only if it changed.

    A path ending in ``.ipynb`` is migrated as a Jupyter notebook (see :func:`migrate_notebook`).
    """
    if path.endswith(".ipynb"):
        return migrate_notebook(path, write=write)
    result = Result(path)
    raw = read(path, result)
    if raw is None:
        return result
    try:
        module = cst.parse_module(raw)
        result.old = module.code
        result.new, result.notes = transform(raw)
    except cst.ParserSyntaxError as e:
        result.error = f"cannot parse (line {e.raw_line}, column {e.raw_column}): {e.message}"
        return result
    except Exception as e:  # a bug here must not cost the user a file: report it and leave the file alone
        result.error = f"internal error, file left untouched: {type(e).__name__}: {e}"
        return result
    if write and result.changed:
        atomic_write(path, result.new.encode(module.encoding))
    return result


_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".nox", "node_modules", "site-packages",
              "build", "dist"}
SUFFIXES = (".py", ".ipynb")


def source_files(paths: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """``(path, exists)`` for every ``.py``/``.ipynb`` file named or under a named directory, in a stable order."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                for name in sorted(files):
                    if name.endswith(SUFFIXES):
                        yield os.path.join(root, name), True
        else:
            yield path, os.path.isfile(path)
