"""Event mode (``event_fn``): the solve runs until ``event_fn(t, y)`` changes sign, as in torchdiffeq. Here are
its input checks, the recording of fixed-grid steps (``integrate_until_event`` calls no callback), and the
gradient of the event state w.r.t. ``t[0]`` through the last step's dense output."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..core import odeint_symplectic
from ._internals import SOLVERS, RKAdaptiveStepsizeODESolver, _interp_evaluate
from .recording import _TorchdiffeqStepRecorder

if TYPE_CHECKING:
    from .host import _TorchdiffeqHost

__all__ = ["_EventStateTimeShift", "_check_event_inputs", "_event_rate", "_odeint_until_event",
           "_record_fixed_grid_event_steps", "_time_derivative"]


def _check_event_inputs(event_fn: Any, t: torch.Tensor, method: str, options: dict | None) -> None:
    """Refuses, before torchdiffeq sees them, event inputs it would reject less clearly: ``method`` a supported
    name in ``SOLVERS``, ``t`` the caller's 1-D times."""
    if not callable(event_fn):
        raise TypeError(f"event_fn must be a callable event_fn(t, y) -> Tensor, got {type(event_fn).__name__}")
    if len(t) != 2:
        raise ValueError(f"with event_fn, t must hold 2 times (the start, and any other time giving the direction "
                         f"of integration), as in torchdiffeq; got len(t)={len(t)}. torchdiffeq.odeint_event "
                         "builds it for you.")
    if not issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver) and (options or {}).get("step_size") is None:
        raise ValueError(f"event handling with the fixed-grid method {method!r} needs a step size: pass "
                         "options=dict(step_size=...), as torchdiffeq requires.")


def _record_fixed_grid_event_steps(solver: Any, recorder: _TorchdiffeqStepRecorder) -> list:
    """Makes ``solver`` (a fixed-grid solver) record each step it takes in ``integrate_until_event``, which
    calls no callback. Returns a list that holds ``[t0, t1, y0, y1, f0]`` of the last step once it has run
    (``y1`` formed exactly as torchdiffeq forms it, ``y0 + dy``; ``f0`` its first stage)."""
    step_func = solver._step_func
    end: list = []

    def recording_step_func(func, t0, dt, t1, y0):
        # step_size may be a Python float; the trajectory keeps step sizes as tensors of the time dtype.
        recorder.begin_step(t0, y0, torch.as_tensor(dt, dtype=t0.dtype, device=t0.device))
        dy, f0 = step_func(func, t0, dt, t1, y0)
        end[:] = [t0, t1, y0, y0 + dy, f0]
        return dy, f0

    solver._step_func = recording_step_func
    return end


def _time_derivative(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``d fn / dt`` at the scalar ``t`` (a tensor shaped like ``fn(t)``).

    Two reverse-mode passes (the VJP is linear in its cotangent ``v``, so differentiating it w.r.t. ``v``
    gives the Jacobian column): forward-mode AD is switched off inside an autograd Function's forward,
    where this runs."""
    with torch.enable_grad():
        t = t.detach().requires_grad_(True)
        out = fn(t)
        if not out.requires_grad:
            return torch.zeros_like(out)
        v = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, t, v, create_graph=True, allow_unused=True)
        if vjp is None or not vjp.requires_grad:
            return torch.zeros_like(out)
        (rate,) = torch.autograd.grad(vjp, v)
    return rate.detach()


class _EventStateTimeShift(torch.autograd.Function):
    """Identity on the ``(2, *state)`` event solution; its backward adds the event state's dependence on t_0
    through the last step's dense output, ``∂L/∂t_0 += -g_1ᵀ rate`` (``g_1`` the cotangent of the event state)."""

    @staticmethod
    def forward(ctx, solution: torch.Tensor, time_shift: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rate)
        ctx.shift_dtype = time_shift.dtype
        return solution.clone()

    @staticmethod
    def backward(ctx, grad_solution: torch.Tensor):
        (rate,) = ctx.saved_tensors
        grad_shift = -(grad_solution[1] * rate).sum().to(ctx.shift_dtype)
        return grad_solution, grad_shift, None


def _event_rate(func: Callable, solver: Any, adaptive: bool, event_t: torch.Tensor,
                fixed_event_end: list) -> torch.Tensor:
    """``d/dt`` of the forward's dense output of the last step at ``event_t`` (a tensor shaped like the state).

    The event state is the last step's dense output at the constant time ``event_t``, so shifting ``t_0`` (and
    with it the step) by ``δ`` moves it by ``-δ·rate``. That rate needs the real stage values, which the core's
    dense-output VJP does not have (it passes zeros): take it here, from the forward's own interpolant,
    differentiated in its evaluation time. ``fixed_event_end``: see :func:`_record_fixed_grid_event_steps`.
    """
    if adaptive:
        state = solver.rk_state
        return _time_derivative(lambda tau: _interp_evaluate(state.interp_coeff, state.t0, state.t1, tau), event_t)
    t0_last, t1_last, y0_last, y1_last, f0_last = fixed_event_end
    if solver.interp == "cubic":
        f1_last = func(t1_last, y1_last)  # as torchdiffeq's integrate_until_event does
        interp = functools.partial(solver._cubic_hermite_interp, t0_last, y0_last, f0_last, t1_last, y1_last,
                                   f1_last)
    else:
        interp = functools.partial(solver._linear_interp, t0_last, t1_last, y0_last, y1_last)
    return _time_derivative(interp, event_t)


def _odeint_until_event(host: _TorchdiffeqHost, y0: torch.Tensor, t: torch.Tensor,
                        params: Sequence[torch.Tensor], t_is_reversed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The event branch of :func:`~symadj_plugins.torchdiffeq.odeint_symplectic_adjoint`, in torchdiffeq's
    normalised coordinates (flat ``y0``, increasing ``t`` of 2 times). Returns ``(event_t, solution)``: a scalar
    in the caller's time direction, and ``(2, *y0.shape)`` (``y0``, the state at ``event_t``)."""
    t_core = t
    if t.requires_grad and torch.is_grad_enabled():
        # ∂L/∂t_0 of the discrete solution (what backprop through the same steps gives, and what
        # odeint_event's rerouting of the event time needs): see _TorchdiffeqHost.time_shift.
        host.time_shift = t[0] - t[0].detach()
        # The forward pass's graphs of f do not see the shift: those steps replay instead.
        host.memory_budget = host.memory_budget.without_graphs()
        params, t_core = (*params, host.time_shift), t.detach()
    solution = odeint_symplectic(host, y0, t_core, params)
    if host.event_rate is not None:
        solution = _EventStateTimeShift.apply(solution, host.time_shift, host.event_rate)
    if host.num_steps == 0:  # event_fn(t0, y0) == 0: torchdiffeq returns y0 itself as the event state
        solution = torch.cat([solution[:1], y0[None]])
    event_t = host.event_t.to(t)
    return (-event_t if t_is_reversed else event_t), solution
