"""Fixed-grid solvers: torchdiffeq writes their steps out by hand, so their tableaux (``core/tableaux.py``) and
stage times (here) are restated. A stage time is ``t0 + dt * c`` or, where torchdiffeq uses the grid point itself,
``"t1"``. ``perturb_prev`` marks a stage torchdiffeq perturbs to just before ``t1`` when ``perturb=True``; stage 1
is always perturbed to just after ``t0`` then."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import ButcherTableau
from ..core.tableaux import EULER, HEUN2, HEUN3, MIDPOINT, RK4_38
from ._internals import Perturb, _fixed_grid

__all__ = ["FixedGridRule", "_FIXED_GRID", "fixed_grid_perturb_flags", "fixed_grid_stage_times"]


@dataclass(frozen=True)
class FixedGridRule:
    """How a torchdiffeq ``FixedGridODESolver`` subclass steps: its tableau, where its ``_step_func`` evaluates each
    stage (``t0 + dt * c`` for a float ``c``, or ``"t1"`` for the grid point itself), and which stages it perturbs
    to just before ``t1`` when ``perturb=True`` (stage 1 is always perturbed to just after ``t0`` then)."""

    tableau: ButcherTableau
    stage_times: tuple[float | str, ...]
    perturb_prev: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not (len(self.stage_times) == len(self.perturb_prev) == self.tableau.num_stages):
            raise ValueError(f"{self.tableau.name}: give one stage time and one perturb flag per stage "
                             f"({self.tableau.num_stages}), got {len(self.stage_times)} and {len(self.perturb_prev)}")


_FIXED_GRID: dict[type, FixedGridRule] = {
    _fixed_grid.Euler: FixedGridRule(EULER, (0.0,), (False,)),
    _fixed_grid.Midpoint: FixedGridRule(MIDPOINT, (0.0, 0.5), (False, False)),
    # torchdiffeq's "rk4" is the 3/8 rule (rk4_alt_step_func).
    _fixed_grid.RK4: FixedGridRule(RK4_38, (0.0, 1 / 3, 2 / 3, "t1"), (False, False, False, True)),
}
if hasattr(_fixed_grid, "Heun2"):  # added in torchdiffeq 0.2.4
    _FIXED_GRID[_fixed_grid.Heun2] = FixedGridRule(HEUN2, (0.0, 1.0), (False, True))
if hasattr(_fixed_grid, "Heun3"):
    _FIXED_GRID[_fixed_grid.Heun3] = FixedGridRule(HEUN3, (0.0, 1 / 3, 2 / 3), (False, False, False))


def fixed_grid_stage_times(rule: FixedGridRule, t0: torch.Tensor, t1: torch.Tensor,
                           dt: torch.Tensor) -> list[torch.Tensor]:
    """Per stage, the ``(N,)`` times at which torchdiffeq evaluated it in each of ``N`` steps ``[t0, t1]``."""
    return [t1 if c == "t1" else t0 + dt * c for c in rule.stage_times]


def fixed_grid_perturb_flags(rule: FixedGridRule, perturb: bool) -> list[Perturb]:
    """Per stage, the ``perturb`` flag torchdiffeq passed to ``func`` (all ``NONE`` unless ``perturb=True``)."""
    if not perturb:
        return [Perturb.NONE] * len(rule.perturb_prev)
    return [Perturb.NEXT if i == 0 else (Perturb.PREV if prev else Perturb.NONE)
            for i, prev in enumerate(rule.perturb_prev)]
