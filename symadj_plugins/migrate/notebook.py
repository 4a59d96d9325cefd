"""Jupyter notebooks: the code cells are migrated together, as one module, and written back cell by cell.

Together, because a name imported in one cell is called in another. IPython's own lines (magics ``%``, shell
lines ``!``, ``x = !cmd``, ``?`` help, and the first line of a cell magic whose body is Python, ``%%time``) are
masked by a ``pass`` placeholder while the cells are parsed and restored after; one that mentions an adjoint is
reported as not migrated (it may run one). Each parsable code cell is then put after a marker comment line; the
module is migrated; the result is split at the markers. Lines the codemod adds before the first marker (new
imports) go to the first migrated cell. A cell that still does not parse (another cell magic, such as
``%%bash``, or broken code) is left out and reported. Outputs, metadata and every other field are kept; the
notebook is written with the ``json`` module in nbformat's layout (one-space indent).
"""

from __future__ import annotations

import json
import re

import libcst as cst

from .notes import Note
from .result import Result, atomic_write, read, unified_diff
from .source import transform

_MARKER = "# symadj-migrate-cell {}\n"
_MARKER_RE = re.compile(r"# symadj-migrate-cell (\d+)\r?\n?")
_MASK = "pass  # symadj-migrate-ipython {}"
_MASK_RE = re.compile(r"[ \t]*pass  # symadj-migrate-ipython (\d+)")
# IPython-only lines: a magic or shell escape, its result assigned (`x = !ls`), or help (`name?`, `?name`).
_IPYTHON_LINE = re.compile(r"[%!]|[\w.]+(\s*,\s*[\w.]+)*\s*=\s*[%!]")
_HELP_LINE = re.compile(r"\?{1,2}[\w.*]+|[\w.*]+\?{1,2}")
# Cell magics whose body IPython runs as Python: only their first line is masked.
_PYTHON_CELL_MAGICS = frozenset({"time", "timeit", "capture", "prun", "debug"})


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
    masked: list[str] = []  # the IPython lines replaced by placeholders, by placeholder number
    for index, cell in cells.items():
        source = _source(cell)
        first_masked = len(masked)
        code = _mask(source, masked)
        if code is None or not _parses(code):
            del masked[first_masked:]
            result.notes.append(_skipped(index, source))
            continue
        result.notes.extend(_masked_notes(index, code, masked))
        parsed.append((index, code))
    if not parsed:
        return {}
    joined = "".join(_MARKER.format(index) + _with_newline(source) for index, source in parsed)
    new_code, notes = transform(joined)
    result.notes.extend(_cell_note(note, joined) for note in notes)
    result.notes.sort(key=lambda n: (n.cell or 0, n.line))
    return {index: _unmask(new, masked) for index, new in _split(new_code, parsed).items()}


def _mask(source: str, masked: list[str]) -> str | None:
    """``source`` with each IPython-only line replaced by a numbered ``pass`` placeholder at its indentation (the
    line appended to ``masked``); ``None`` for a cell magic whose body is not Python (``%%bash``)."""
    lines = source.splitlines(keepends=True)
    first = lines[0].strip() if lines else ""
    if first.startswith("%%") and (first[2:].split() or [""])[0] not in _PYTHON_CELL_MAGICS:
        return None
    out = []
    for line in lines:
        body = line.rstrip("\r\n")
        stripped = body.strip()
        if _IPYTHON_LINE.match(stripped) or _HELP_LINE.fullmatch(stripped):
            indent = body[: len(body) - len(body.lstrip())]
            line = indent + _MASK.format(len(masked)) + line[len(body):]
            masked.append(body)
        out.append(line)
    return "".join(out)


def _parses(code: str) -> bool:
    try:
        cst.parse_module(code)
    except cst.ParserSyntaxError:
        return False
    return True


def _unmask(code: str, masked: list[str]) -> str:
    """The IPython lines put back in place of their placeholders."""
    return _MASK_RE.sub(lambda m: masked[int(m.group(1))], code)


def _masked_notes(index: int, code: str, masked: list[str]) -> list[Note]:
    """A masked line that mentions an adjoint (``%timeit odeint_adjoint(...)``, ``!python train.py --adjoint``) may
    run a continuous adjoint the codemod cannot rewrite: reported as not migrated (help lines are not)."""
    notes = []
    for line_no, line in enumerate(code.splitlines(), 1):
        match = _MASK_RE.fullmatch(line)
        if match is None:
            continue
        original = masked[int(match.group(1))]
        if "adjoint" in original and not _HELP_LINE.fullmatch(original.strip()):
            notes.append(Note(line_no, f"IPython line `{original.strip()}` mentions an adjoint; the codemod does "
                                       "not rewrite magics or shell lines: migrate it by hand", unmigrated=True,
                              cell=index))
    return notes


def _skipped(index: int, source: str) -> Note:
    lines = source.splitlines()
    magic = 1 if lines and lines[0].lstrip().startswith("%%") else None
    what = "a cell magic whose body is not Python" if magic is not None else "code that does not parse as Python"
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
