"""The command line: ``python -m symadj_plugins.migrate PATH... [--write]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .files import migrate_file, source_files
from .result import Result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m symadj_plugins.migrate",
        description="Rewrite torchdiffeq odeint_adjoint, torchdyn sensitivity='adjoint' and torch_symplectic_adjoint "
                    "code to use the symplectic adjoint of symadj-plugins. Prints a unified diff unless --write. "
                    "Exit status 1 if a file could not be processed or a continuous adjoint was left in place "
                    "(each place is listed as 'not migrated').")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="Python files, Jupyter notebooks (.ipynb) or directories (searched for both)")
    parser.add_argument("--write", action="store_true", help="rewrite the files in place instead of printing a diff")
    return parser


def _report(result: Result, write: bool) -> None:
    for note in result.notes:
        print(f"{result.path}: {note}", file=sys.stderr)
    if result.changed:
        if write:
            print(f"{result.path}: rewritten", file=sys.stderr)
        else:
            sys.stdout.write(result.diff())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the codemod; returns the exit status (0 all migrated, 1 a file failed or a place was left)."""
    args = _parser().parse_args(argv)
    failed = changed = left = 0
    for path, exists in source_files(args.paths):
        if not exists:
            print(f"{path}: error: no such file", file=sys.stderr)
            failed += 1
            continue
        result = migrate_file(path, write=args.write)
        if result.error is not None:
            print(f"{path}: error: {result.error}", file=sys.stderr)
            failed += 1
            continue
        _report(result, args.write)
        changed += result.changed
        left += len(result.unmigrated)
    verb = "rewritten" if args.write else "would change"
    print(f"symadj-migrate: {changed} file(s) {verb}, {failed} could not be processed, {left} place(s) not migrated "
          "(still on a continuous adjoint, listed above)", file=sys.stderr)
    return 1 if failed or left else 0
