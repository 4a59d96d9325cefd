"""Named tableaux of the fixed-step explicit Runge–Kutta methods that host libraries write out by hand.

Adaptive solvers carry their tableau as data (torchdiffeq's ``_ButcherTableau``, torchdyn's ``.tableau``) and the
adapters read it from there; the methods below hard-code their coefficients in a ``step`` function, so their
tableaux are written here, once, and every adapter imports them. ``c`` is the textbook node vector; where a
host evaluates a stage elsewhere, its adapter says so (stage times are host facts, not tableau facts).
"""

from __future__ import annotations

from .tableau import ButcherTableau

__all__ = ["EULER", "MIDPOINT", "HEUN2", "HEUN3", "RK4_CLASSICAL", "RK4_38"]

EULER = ButcherTableau.from_rows([0.0], [], [1.0], name="euler")
"""Forward Euler: ``y + h f(t, y)``."""

MIDPOINT = ButcherTableau.from_rows([0.0, 0.5], [[0.5]], [0.0, 1.0], name="midpoint")
"""Explicit midpoint: ``y + h f(t + h/2, y + h/2 k_1)``."""

HEUN2 = ButcherTableau.from_rows([0.0, 1.0], [[1.0]], [0.5, 0.5], name="heun2")
"""Heun's second-order method (explicit trapezoid)."""

HEUN3 = ButcherTableau.from_rows([0.0, 1 / 3, 2 / 3], [[1 / 3], [0.0, 2 / 3]], [0.25, 0.0, 0.75], name="heun3")
"""Heun's third-order method."""

RK4_CLASSICAL = ButcherTableau.from_rows([0.0, 0.5, 0.5, 1.0], [[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
                                         [1 / 6, 1 / 3, 1 / 3, 1 / 6], name="rk4 (classical)")
"""The classical fourth-order Runge–Kutta method, weights ``(1, 2, 2, 1) / 6``."""

RK4_38 = ButcherTableau.from_rows([0.0, 1 / 3, 2 / 3, 1.0], [[1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]],
                                  [1 / 8, 3 / 8, 3 / 8, 1 / 8], name="rk4 (3/8 rule)")
"""Kutta's 3/8 rule, weights ``(1, 3, 3, 1) / 8`` (torchdiffeq's ``"rk4"``)."""
