"""The symplectic adjoint's options, in one place: :class:`SymplecticAdjoint`, and :func:`options` to set them for
code that does not call us directly (torchdyn's ``sensitivity="symplectic_adjoint"``, libraries built on torchdiffeq).

Where a setting comes from, first match wins: an explicit argument (``odeint_symplectic_adjoint(...,
memory_budget=...)``, ``adjoint=SymplecticAdjoint(...)``, ``adjoint_options=dict(...)``), then the innermost
``with symadj_plugins.options(...):`` block of this thread (or task), then the defaults below.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .core.budget import MemoryBudget

__all__ = ["DEFAULT_MEMORY_BUDGET", "SymplecticAdjoint", "current_options", "options"]

DEFAULT_MEMORY_BUDGET = "auto"
"""The default budget: never more than twice what ``"trajectory"`` holds, the fastest within that. See
``docs/design.md`` (the memory budget) for the measurements behind this choice."""


@dataclass(frozen=True)
class SymplecticAdjoint:
    """How the symplectic adjoint spends memory for speed.

    Attributes:
        memory_budget: the bytes the solve may keep for the backward pass, states included (not counted: the
            solution returned, the parameters, the backward pass's working buffers and the one graph of ``f`` it
            builds at a time). The gradient is the same at every budget, to rounding. A level by name:

            - ``"min"`` (= ``0``): the fewest bytes: ``O(log N)`` states kept, the others recomputed in the backward
              pass from the nearest kept one with the host's own step (a binomial, Revolve-style reversal:
              ``O(N log N)`` recomputed steps);
            - ``"trajectory"``: one state per accepted step (the paper's method; ``store_stages=False``);
            - ``"stages"``: and every step's stage inputs (the backward pass skips recomputing them;
              ``store_stages=True``);
            - ``"max"``: and the graphs of the stage evaluations (backprop's memory and speed);
            - ``"auto"`` (the default): never more than twice what ``"trajectory"`` holds, the fastest within that
              (all stage inputs where the network dominates memory, some of them where the states do).

            Or a number of bytes (``int``, or a string with a unit: ``"256MiB"``, ``"2GB"``): spent on states first
            (down to ``"min"``'s, whose cost it never goes below: a smaller budget runs at ``"min"`` with a warning),
            then one state per step, then stage inputs, then graphs.
    """

    memory_budget: int | float | str = DEFAULT_MEMORY_BUDGET

    def __post_init__(self) -> None:
        MemoryBudget.parse(self.memory_budget)  # validates, with a message naming the accepted forms

    @property
    def budget(self) -> MemoryBudget:
        return MemoryBudget.parse(self.memory_budget)

    @classmethod
    def from_options(cls, given: Mapping[str, Any] | None, *, where: str = "adjoint_options") -> SymplecticAdjoint:
        """Options from a dict (e.g. torchdiffeq's ``adjoint_options``), over those in effect; unknown keys are an
        error naming the valid ones."""
        given = dict(given or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(f"{where} has {', '.join(map(repr, unknown))}, which the symplectic adjoint does not "
                             f"know; valid keys: {', '.join(map(repr, valid))} (it solves no backward ODE, so "
                             "torchdiffeq's adjoint tolerances and norms do not apply).")
        return dataclasses.replace(current_options(), **given)


_current: contextvars.ContextVar[SymplecticAdjoint | None] = contextvars.ContextVar("symadj_options", default=None)


def current_options() -> SymplecticAdjoint:
    """The options in effect here: the innermost :func:`options` block's, or the defaults."""
    return _current.get() or SymplecticAdjoint()


@contextlib.contextmanager
def options(adjoint: SymplecticAdjoint | None = None, **settings: Any) -> Iterator[SymplecticAdjoint]:
    """Sets the symplectic adjoint's options for the solves started inside the block (this thread or task only)::

        with symadj_plugins.options(memory_budget="1GiB"):
            t_eval, sol = model(x, t_span)   # torchdyn NeuralODE(..., sensitivity="symplectic_adjoint")
        loss(sol).backward()                # the backward pass uses what the forward pass kept

    Pass a :class:`SymplecticAdjoint`, or its fields by name (over the options already in effect).
    """
    if adjoint is not None and settings:
        raise TypeError("options() takes a SymplecticAdjoint or keyword settings, not both")
    if adjoint is not None and not isinstance(adjoint, SymplecticAdjoint):
        raise TypeError(f"options() takes a SymplecticAdjoint, got {type(adjoint).__name__}")
    chosen = adjoint if adjoint is not None else SymplecticAdjoint.from_options(settings, where="options()")
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)
