"""Explicit Runge–Kutta tableaux as validated data.

A tableau ``(c, A, b)`` with ``s`` stages describes one step from ``(t_n, y_n)`` with step size ``h``::

    Y_i = y_n + h Σ_{j<i} a_ij k_j,    k_i = f(T_i, Y_i),    y_{n+1} = y_n + h Σ_i b_i k_i

``c`` holds the nodes (``c_i = Σ_j a_ij``). The stage times ``T_i`` are not always ``t_n + c_i h`` in host libraries
(perturbed times, quirks): adapters say where each stage is really evaluated (``HostSolver.stage_calls``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta tableau.

    Attributes:
        c: the nodes, length ``s``: ``c_i = Σ_j a_ij`` (validated, to float32 rounding). Where a host library
            really evaluates each stage (perturbed times, quirks such as torchdyn's RK4) is the adapter's business.
        a: the full ``s x s`` stage matrix as nested tuples; must be strictly lower triangular.
        b: solution weights, length ``s``.
        name: for messages only.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    name: str = "tableau"

    def __post_init__(self) -> None:
        s = len(self.b)
        if s == 0:
            raise ValueError(f"{self.name}: a tableau needs at least one stage")
        if len(self.c) != s or len(self.a) != s or any(len(row) != s for row in self.a):
            raise ValueError(f"{self.name}: c, a and b must describe the same number of stages ({s})")
        values = (*self.c, *self.b, *(x for row in self.a for x in row))
        if not all(math.isfinite(x) for x in values):
            raise ValueError(f"{self.name}: tableau entries must be finite")
        for i, row in enumerate(self.a):
            if any(x != 0.0 for x in row[i:]):
                raise ValueError(f"{self.name}: stage matrix must be strictly lower triangular (explicit RK); "
                                 f"row {i} has entries on or above the diagonal")
            if abs(self.c[i] - math.fsum(row)) > 1e-6 * max(1.0, abs(self.c[i])):
                raise ValueError(f"{self.name}: node c[{i}] = {self.c[i]!r} is not the sum of row {i} of a "
                                 f"({math.fsum(row)!r}); c holds the nodes c_i = sum_j a_ij")

    @classmethod
    def from_rows(cls, c: Sequence[float], a_rows: Sequence[Sequence[float]], b: Sequence[float],
                  name: str = "tableau") -> ButcherTableau:
        """Builds a tableau from the ragged lower-triangular rows ``a_rows[i] = (a_i1, ..., a_i,i-1)``.

        ``a_rows`` has ``s - 1`` rows (stage 1 has none), as tableaux are usually printed.
        """
        s = len(b)
        if len(a_rows) != s - 1:
            raise ValueError(f"{name}: expected {s - 1} rows of a for {s} stages, got {len(a_rows)}")
        a = [[0.0] * s for _ in range(s)]
        for i, row in enumerate(a_rows, start=1):
            if len(row) > i:
                raise ValueError(f"{name}: row {i} of a has {len(row)} entries; an explicit stage {i} has at most {i}")
            a[i][: len(row)] = [float(x) for x in row]
        return cls(tuple(float(x) for x in c), tuple(tuple(r) for r in a), tuple(float(x) for x in b), name)

    @property
    def num_stages(self) -> int:
        return len(self.b)

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is evaluated at ``(t_n + h, y_{n+1})``."""
        return self.c[-1] == 1.0 and self.a[-1][:-1] == self.b[:-1] and self.b[-1] == 0.0

    def tensors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, b)`` as tensors of shape ``(s, s)`` and ``(s,)``, cached per dtype and device."""
        return _tableau_tensors(self, dtype, torch.device(device))

    def backward_plan(self, touched: tuple[bool, ...]) -> StagePlan:
        """Which stages the reverse sweep must differentiate and which stage values it must recompute.

        Args:
            touched: per stage, whether its cotangent receives a contribution from outside the step
                formula (dense output, or a stage value carried into the next step).
        """
        return _backward_plan(self, touched)


@dataclass(frozen=True)
class StagePlan:
    """What one reverse step needs, decided on the host once per (tableau, touched) pattern.

    Attributes:
        vjp: per stage, whether its cotangent ``κ_i`` can be non-zero (so ``f`` is differentiated there).
        value: per stage, whether ``k_i`` must be recomputed (some differentiated later stage reads it).
    """

    vjp: tuple[bool, ...]
    value: tuple[bool, ...]


@functools.cache
def _tableau_tensors(tableau: ButcherTableau, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor(tableau.a, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.tensor(tableau.b, dtype=torch.float64).to(device=device, dtype=dtype)
    return a, b


@functools.cache
def _backward_plan(tableau: ButcherTableau, touched: tuple[bool, ...]) -> StagePlan:
    s = tableau.num_stages
    if len(touched) != s:
        raise ValueError(f"touched has {len(touched)} entries for a {s}-stage tableau")
    vjp = [False] * s
    for i in reversed(range(s)):
        vjp[i] = (touched[i] or tableau.b[i] != 0.0
                  or any(vjp[j] and tableau.a[j][i] != 0.0 for j in range(i + 1, s)))
    value = [any(vjp[j] and tableau.a[j][i] != 0.0 for j in range(i + 1, s)) for i in range(s)]
    return StagePlan(tuple(vjp), tuple(value))
