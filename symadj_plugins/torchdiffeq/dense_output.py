"""torchdiffeq's dense output at many times at once: its three interpolation formulas, restated to take a column of
times, so that the backward pass differentiates all of a step's outputs in one vector–Jacobian product.

torchdiffeq evaluates them one time at a time (``interp._interp_evaluate`` asserts ``t0 <= t <= t1`` on a scalar,
``FixedGridODESolver._linear_interp`` branches on ``t == t0``), so they cannot be called with a tensor of times. The
restatements below do the same arithmetic in the same order and dtypes, each time's weights computed in the time
dtype and cast to the state's as torchdiffeq's 0-dimensional time tensors are: the values are torchdiffeq's to the
bit (``tests/test_torchdiffeq_internals.py`` compares them with torchdiffeq's own functions).

``t`` is the output times shaped ``(m, 1, ..., 1)`` (one trailing 1 per state dimension); each function returns the
stacked values ``(m, *state shape)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["interp_evaluate", "linear_interp", "cubic_hermite_interp"]


def interp_evaluate(coefficients: Sequence[torch.Tensor], t0: torch.Tensor, t1: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """``interp._interp_evaluate`` (adaptive solvers' polynomial, ``coefficients`` from ``_interp_fit``)."""
    x = ((t - t0) / (t1 - t0)).to(coefficients[0].dtype)
    total = coefficients[0] + x * coefficients[1]
    x_power = x
    for coefficient in coefficients[2:]:
        x_power = x_power * x
        total = total + x_power * coefficient
    return total


def linear_interp(t0: torch.Tensor, t1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
    """``FixedGridODESolver._linear_interp``: ``y0`` at ``t0``, ``y1`` at ``t1``, the line between them elsewhere."""
    slope = ((t - t0) / (t1 - t0)).to(y0.dtype)
    value = torch.where(t == t1, y1, y0 + slope * (y1 - y0))
    return torch.where(t == t0, y0, value)


def cubic_hermite_interp(t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor, t1: torch.Tensor, y1: torch.Tensor,
                         f1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``FixedGridODESolver._cubic_hermite_interp`` (``f0``, ``f1``: the field at the step's ends)."""
    h = (t - t0) / (t1 - t0)
    h00 = (1 + 2 * h) * (1 - h) * (1 - h)
    h10 = h * (1 - h) * (1 - h)
    h01 = h * h * (3 - 2 * h)
    h11 = h * h * (h - 1)
    dt = (t1 - t0)
    dtype = y0.dtype
    return h00.to(dtype) * y0 + (h10 * dt).to(dtype) * f0 + h01.to(dtype) * y1 + (h11 * dt).to(dtype) * f1
