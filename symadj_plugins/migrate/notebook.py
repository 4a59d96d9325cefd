"""Jupyter notebooks: the code cells are migrated together, as one module, and written back cell by cell.

Together, because a name imported in one cell is called in another. Each parsable code cell is put after a
marker comment line; the module is migrated; the result is split at the markers. Lines the codemod adds before
the first marker (new imports) go to the first migrated cell. A cell that does not parse as Python (IPython
magics ``%``, shell lines ``!``, ``?`` help) is left out and reported. Outputs, metadata and every other field
are kept; the notebook is written with the ``json`` module in nbformat's layout (one-space indent).
"""

from __future__ import annotations

import json
import re

import libcst as cst

from .files import Result, atomic_write, read, unified_diff
from .notes import Note
from .source import transform

_MARKER = "# symadj-migrate-cell {}\n"
_MARKER_RE = re.compile(r"# symadj-migrate-cell (\d+)\r?\n?")


def migrate_notebook(path: str, write: bool = False) -> Result:
    """Migrates the code cells of the notebook at ``path``; writes it (atomically) only with ``write=True``."""
    result = Result(path)
    raw = read(path, result)
    if raw is None:
        return result
    try:
        notebook = json.loads(raw.decode("utf-8"))
        cells = _code_cells(notebook)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        result.error = f"not a Jupyter notebook (nbformat 4) file: {e}"
        return result
    try:
        sources = _migrate_cells(cells, result)
    except Exception as e:  # never a partial edit: report and leave the notebook alone
        result.error = f"internal error, file left untouched: {type(e).__name__}: {e}"
        return result
    diffs = []
    for index, new in sorted(sources.items()):
        cell = cells[index]
        old = _source(cell)
        if new != old:
            diffs.append(unified_diff(path, old, new, label=f" (cell {index})"))
            cell["source"] = new.splitlines(keepends=True) if isinstance(cell["source"], list) else new
    result.old = raw.decode("utf-8")
    result.new = result.old if not diffs else json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    result.diff_text = "".join(diffs)
    if write and result.changed:
        atomic_write(path, result.new.encode("utf-8"))
    return result


def _code_cells(notebook: object) -> dict[int, dict]:
    """The code cells by 1-based index among all cells."""
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise ValueError("no 'cells' list (nbformat 3 and older are not supported; convert with "
                         "`jupyter nbconvert --to notebook`)")
    return {i: cell for i, cell in enumerate(notebook["cells"], start=1)
            if isinstance(cell, dict) and cell.get("cell_type") == "code"}


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _migrate_cells(cells: dict[int, dict], result: Result) -> dict[int, str]:
    """``{cell index: new source}`` for every cell that parses; notes (by cell and line) go to ``result``."""
    parsed: list[tuple[int, str]] = []
    for index, cell in cells.items():
        source = _source(cell)
        try:
            cst.parse_module(source)
        except cst.ParserSyntaxError:
            result.notes.append(_skipped(index, source))
            continue
        parsed.append((index, source))
    if not parsed:
        return {}
    joined = "".join(_MARKER.format(index) + _with_newline(source) for index, source in parsed)
    new_code, notes = transform(joined)
    result.notes.extend(_cell_note(note, joined) for note in notes)
    result.notes.sort(key=lambda n: (n.cell or 0, n.line))
    return _split(new_code, parsed)


def _skipped(index: int, source: str) -> Note:
    lines = source.splitlines()
    magic = next((n for n, line in enumerate(lines, 1) if line.lstrip().startswith(("%", "!"))
                  or line.rstrip().endswith("?")), None)
    what = "an IPython magic or shell line" if magic is not None else "code that does not parse as Python"
    # A skipped cell that mentions an adjoint may hold a call left on the continuous adjoint.
    return Note(magic or 1, f"cell skipped: it holds {what}; migrate it by hand if it uses an adjoint",
                unmigrated="adjoint" in source, cell=index)


def _with_newline(source: str) -> str:
    return source if source.endswith("\n") or not source else source + "\n"


def _cell_note(note: Note, joined: str) -> Note:
    """A note on the joined module, as a note on a line of a cell."""
    lines = joined.splitlines()[: note.line]
    for back, line in enumerate(reversed(lines)):
        match = _MARKER_RE.fullmatch(line + "\n")
        if match:
            return Note(back, note.message, note.unmigrated, cell=int(match.group(1)))
    return Note(note.line, note.message, note.unmigrated, cell=None)


def _split(new_code: str, parsed: list[tuple[int, str]]) -> dict[int, str]:
    """The migrated module, cut back into cells at the markers."""
    chunks: dict[int, list[str]] = {}
    prefix: list[str] = []
    current: list[str] = prefix
    for line in new_code.splitlines(keepends=True):
        match = _MARKER_RE.fullmatch(line)
        if match:
            current = chunks.setdefault(int(match.group(1)), [])
        else:
            current.append(line)
    if [index for index, _ in parsed] != list(chunks):
        raise RuntimeError("the cell markers did not survive the rewrite")
    out = {}
    for n, (index, old) in enumerate(parsed):
        new = "".join((prefix if n == 0 else []) + chunks[index])
        if not old.endswith("\n") and new.endswith("\n"):
            new = new[:-1]
        out[index] = new
    return out
