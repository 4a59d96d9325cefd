"""The result of migrating one file, and the file operations both kinds of file share (reading, atomic writing,
the diff)."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass, field

from .notes import Note


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
