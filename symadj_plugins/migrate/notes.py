"""What the codemod tells the user about a place in a file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Note:
    """A message about one line of a file (of one cell, for a notebook).

    ``unmigrated`` marks a place left on a continuous adjoint (torchdiffeq's ``odeint_adjoint`` or torchdyn's
    ``sensitivity="adjoint"``) that the codemod could not switch: the command line then exits with status 1.
    """

    line: int
    message: str
    unmigrated: bool = False
    cell: int | None = None  # 1-based index among a notebook's cells

    @property
    def location(self) -> str:
        return f"line {self.line}" if self.cell is None else f"cell {self.cell}, line {self.line}"

    def __str__(self) -> str:
        return f"{self.location}: {'not migrated: ' if self.unmigrated else ''}{self.message}"
