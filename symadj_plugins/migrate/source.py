"""Migrating Python source text: plan on the original tree, apply, check the result parses."""

from __future__ import annotations

import libcst as cst
from libcst.metadata import MetadataWrapper

from .applier import _Applier
from .notes import Note
from .planner import _Planner


def transform(source: str | bytes) -> tuple[str, list[Note]]:
    """Returns ``(new_source, notes)``. Raises ``libcst.ParserSyntaxError`` if ``source`` does not parse."""
    wrapper = MetadataWrapper(cst.parse_module(source))
    planner = _Planner(wrapper.module)
    wrapper.visit(planner)
    planner.finish()
    new_code = wrapper.module.visit(_Applier(planner.plan)).code
    cst.parse_module(new_code)  # never write what does not parse
    return new_code, planner.notes


def migrate_source(source: str | bytes) -> tuple[str, list[str]]:
    """Returns ``(new_source, notes)``, each note ``"line N: message"``.

    A note starting ``"line N: not migrated:"`` is a place left on a continuous adjoint that the codemod could
    not switch. Raises ``libcst.ParserSyntaxError`` if ``source`` does not parse.
    """
    new_code, notes = transform(source)
    return new_code, [str(note) for note in notes]
