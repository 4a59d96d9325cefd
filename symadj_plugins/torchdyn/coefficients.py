"""The coefficients ``(h·A, h·b)`` of the steps whose products ``dt·a_ij`` torchdyn rounded.

torchdyn's ``adapt_step`` returns a float32 ``(1,)`` ``dt`` for a float64 state (its ``safety``, ``min_factor`` and
``max_factor`` are float32), and ``DormandPrince45.step`` / ``Tsitouras45.step`` then compute ``dt * a[i][j]`` (a
0-dim coefficient) in float32. "The same steps" that the gradient is exact for include that rounding, so for those
steps the coefficients are read off torchdyn's own ``step``; every other step uses ``dt·A`` (the core's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ._internals import _internals_error


class _Step(Protocol):
    """What this module reads of a recorded step (``recording._Step``; not imported: recording imports this)."""

    dt: torch.Tensor
    k1_given: bool


def _resolution(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _rounds_coefficients(dt: torch.Tensor, state_dtype: torch.dtype) -> bool:
    """Whether torchdyn's step computes some products ``dt * a[i][j]`` in a lower precision than the state: a
    ``dt`` with dimensions wins type promotion against a 0-dim coefficient."""
    return dt.ndim > 0 and _resolution(dt.dtype) > _resolution(state_dtype)


def _rounded_coefficients(solver: Any, num_stages: int, steps: Sequence[_Step],
                          x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{n: (h·A, h·b)}`` (shapes ``(s, s)`` and ``(s,)``, state dtype) for the steps whose products ``dt·a_ij``
    ``solver`` did not compute in the state dtype.

    For those steps we run the solver's own ``step`` on unit vectors (``x = 0``, ``k_j = e_j``): stage ``i``'s input
    *is* row ``i`` of the coefficients it used, and the new state is its weights. One batched call per kind of
    ``dt`` (dtype, shape, whether ``k1`` was given).
    """
    groups: dict[tuple[torch.dtype, torch.Size, bool], list[int]] = {}
    for n, step in enumerate(steps):
        if _rounds_coefficients(step.dt, x.dtype):
            groups.setdefault((step.dt.dtype, step.dt.shape, step.k1_given), []).append(n)
    rounded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for (_, _, k1_given), members in groups.items():
        dt = torch.stack([steps[n].dt for n in members])
        ha, hb = _probe_coefficients(solver, num_stages, dt, k1_given, x)
        rounded.update((n, (ha[i], hb[i])) for i, n in enumerate(members))
    return rounded


def _probe_coefficients(solver: Any, s: int, dt: torch.Tensor, k1_given: bool,
                        x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched ``solver.step`` of the ``s``-stage solver on unit stages, for the ``len(dt)`` step sizes ``dt``:
    returns ``h·A`` of shape ``(len(dt), s, s)`` and ``h·b`` of shape ``(len(dt), s)``."""
    num = dt.shape[0]
    basis = torch.eye(s, dtype=x.dtype, device=x.device)
    inputs: list[torch.Tensor] = []

    def unit_stages(t_, x_):
        inputs.append(x_)
        return basis[len(inputs) - 1 + k1_given].expand(num, s)

    zeros = torch.zeros(num, s, dtype=x.dtype, device=x.device)
    k1 = basis[0].expand(num, s) if k1_given else None
    new_state = solver.step(unit_stages, zeros, torch.zeros_like(dt), dt, k1=k1)[1]
    rows = [zeros, *inputs] if k1_given else inputs
    if len(rows) != s:
        raise _internals_error(f"{type(solver).__name__}.step evaluated {len(inputs)} stages on a probe")
    return torch.stack(rows, dim=1), new_state
