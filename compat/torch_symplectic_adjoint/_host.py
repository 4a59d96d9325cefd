"""How this shim drives torchdiffeq and symadj-plugins' torchdiffeq adapter: the only module that names their
private parts.

Private names used (each is exercised by ``tests/test_compat_internals.py``, so that an upstream change fails
there and loudly):

torchdiffeq
    ``_impl.misc._check_inputs`` / ``_flat_to_shape`` / ``Perturb``, ``_impl.odeint.SOLVERS``,
    ``_impl.solvers.FixedGridODESolver`` (``_step_func``, ``perturb``),
    ``_impl.rk_common.rk4_step_func`` and ``_runge_kutta_step(func, y0, f0, t0, dt, t1, tableau)`` (returns
    ``(y1, f1, y1_error, k)``), ``RKAdaptiveStepsizeODESolver.tableau``.
symadj_plugins (public API only)
    ``symadj_plugins.torchdiffeq.torchdiffeq_host`` and ``FixedGridRule`` (the host's ``solve``, ``stage_calls``,
    ``vector_field``, ``dense_output``; attributes ``func``, ``tableau``, ``adaptive``, ``solver``),
    ``symadj_plugins.inputs.parameters_requiring_grad``, ``symadj_plugins.core.tableaux.RK4_CLASSICAL``.

"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchdiffeq._impl.misc import _check_inputs, _flat_to_shape
from torchdiffeq._impl.rk_common import _runge_kutta_step

from symadj_plugins.core import HostSolver, Trajectory
from symadj_plugins.core.tableaux import RK4_CLASSICAL
from symadj_plugins.inputs import parameters_requiring_grad
from symadj_plugins.torchdiffeq import FixedGridRule, torchdiffeq_host

from ._methods import SOLVERS, ClassicalRK4, torchdiffeq_name

__all__ = ["make_host", "normalise", "default_params", "replay_step", "_flat_to_shape"]

# The classical RK4 as the symplectic adjoint needs to know it: tableau, where torchdiffeq's rk4_step_func
# evaluates each stage (t0 + dt * 0.5 twice, then the grid point t1), and which stage it perturbs to just
# before t1 when perturb=True. Handed to the adapter per call; neither it nor torchdiffeq's SOLVERS is changed.
CLASSICAL_RK4_RULE = FixedGridRule(RK4_CLASSICAL, stage_times=(0.0, 0.5, 0.5, "t1"),
                                   perturb_prev=(False, False, False, True))


def make_host(func: Callable, method: str, rtol, atol, options: dict) -> HostSolver:
    """The adapter's host for one of this package's method names (``func`` etc. already normalised)."""
    if SOLVERS[method] is ClassicalRK4:
        return torchdiffeq_host(func, ClassicalRK4, rtol, atol, options, rule=CLASSICAL_RK4_RULE)
    return torchdiffeq_host(func, torchdiffeq_name(method), rtol, atol, options)


def normalise(func, y0, t, rtol, atol, method: str, options: dict):
    """torchdiffeq's input normalisation with this package's ``SOLVERS``.

    Returns ``(shapes, func, y0, t, rtol, atol, options)`` in torchdiffeq's normalised coordinates (flat state,
    increasing time, ``func`` taking ``perturb=``).
    """
    shapes, func, y0, t, rtol, atol, _, options, _, _ = _check_inputs(func, y0, t, rtol, atol, method, options,
                                                                      None, SOLVERS)
    return shapes, func, y0, t, rtol, atol, options


def default_params(func, adjoint_params) -> tuple[torch.Tensor, ...]:
    """The original's rule: the parameters of ``func`` if it is an ``nn.Module``, otherwise none; then only those
    that require grad."""
    if adjoint_params is None:
        return parameters_requiring_grad(func if isinstance(func, torch.nn.Module) else None)
    return parameters_requiring_grad(adjoint_params)


def replay_step(host: HostSolver, trajectory: Trajectory, n: int, y0: torch.Tensor,
                first_stage: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Step ``n`` again, exactly as torchdiffeq took it in ``host.solve``, with whatever graph is enabled.

    Args:
        first_stage: the stage value carried into this step, where the host carried one (``None`` otherwise:
            the first stage is evaluated where torchdiffeq evaluated it).
    Returns:
        ``(y1, stages, last_stage)``: the step's end state, its stage values, and the last
        stage value (what an adaptive solver carries into the next step; ``None`` for fixed-grid solvers).
    """
    t0, t1, dt = trajectory.t0[n], trajectory.t1[n], trajectory.dt[n]
    if host.adaptive:
        if first_stage is None:
            call = host.stage_calls(trajectory, n)[0]
            first_stage = host.vector_field(call.t, y0, call.kwargs)
        y1, last_stage, _, k = _runge_kutta_step(host.func, y0, first_stage, t0, dt, t1, tableau=host.solver.tableau)
        return y1, list(k.unbind(-1)), last_stage
    dy, f0 = host.solver._step_func(host.func, t0, dt, t1, y0)
    return y0 + dy, [f0], None
