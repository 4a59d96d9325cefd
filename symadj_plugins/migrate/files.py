"""Files: reading, the result of migrating one, atomic writing, and finding them under directories."""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import libcst as cst

from .notes import Note
from .source import transform


@dataclass
class Result:
    """What happened to one file (a ``.py`` file or a notebook)."""

    path: str
    old: str = ""
    new: str = ""
    notes: list[Note] = field(default_factory=list)
    error: str | None = None
    diff_text: str | None = None  # set for notebooks: the diff of the changed cells, not of the JSON

    @property
    def changed(self) -> bool:
        return self.error is None and self.new != self.old

    @property
    def unmigrated(self) -> list[Note]:
        """Places left on a continuous adjoint that the codemod could not switch."""
        return [note for note in self.notes if note.unmigrated]

    def diff(self) -> str:
        if self.diff_text is not None:
            return self.diff_text
        return unified_diff(self.path, self.old, self.new)


def unified_diff(path: str, old: str, new: str, label: str = "") -> str:
    """``diff -u`` of ``old`` and ``new``, headed ``a/PATH LABEL`` and ``b/PATH LABEL``."""
    a, b = (path, path) if os.path.isabs(path) else (f"a/{path}", f"b/{path}")
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=a + label, tofile=b + label)
    # A last line without a newline: mark it as diff(1) does, so that the next hunk or file starts on its own line.
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def read(path: str, result: Result) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        result.error = f"cannot read: {e.strerror or e}"
        return None


def migrate_file(path: str, write: bool = False) -> Result:
    """Migrates one file; writes it (atomically) only with ``write=True`` and only if it changed.

    A path ending in ``.ipynb`` is migrated as a Jupyter notebook (see :func:`migrate_notebook`).
    """
    if path.endswith(".ipynb"):
        from .notebook import migrate_notebook

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


def atomic_write(path: str, data: bytes) -> None:
    """Replaces ``path`` by ``data`` whole (temporary file + rename), keeping its permissions."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".symadj-migrate-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
