"""Event mode (``event_fn``): the solve runs until ``event_fn(t, y)`` changes sign, as in torchdiffeq. Here are
its input checks, its host (:class:`_TorchdiffeqEventHost`, a :class:`~.host._TorchdiffeqHost` that only this module
knows), the recording of fixed-grid steps (``integrate_until_event`` calls no callback), and the gradient of the
event state w.r.t. ``t[0]`` through the last step's dense output."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core import Trajectory, odeint_symplectic
from ._internals import SOLVERS, RKAdaptiveStepsizeODESolver, _interp_evaluate
from .host import _TorchdiffeqHost
from .recording import _TorchdiffeqStepRecorder

__all__ = ["_EventStateTimeShift", "_TorchdiffeqEventHost", "_check_event_inputs", "_event_rate",
           "_odeint_until_event", "_record_fixed_grid_event_steps", "_time_derivative"]


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


class _TorchdiffeqEventHost(_TorchdiffeqHost):
    """One torchdiffeq solve until ``event_fn`` changes sign (``integrate_until_event``), as the core's
    ``HostSolver``: the one output after ``y0`` is the last step's dense output at ``event_t``."""

    def __init__(self, *args: Any, event_fn: Callable, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.event_fn = event_fn  # torchdiffeq's normalised event_fn
        self.event_t: torch.Tensor | None = None  # set by solve (normalised time)
        # A zero scalar whose gradient is ∂L/∂t_0 of the discrete solution: passed to the core as a parameter and
        # added to every time at which the backward pass evaluates f or dense output, so the core's parameter VJPs
        # sum κᵀ ∂f/∂t over all stages (every stage time is t_0 + constants). Set by _odeint_until_event.
        self.time_shift: torch.Tensor | None = None
        # With time_shift: d/dt of the forward's dense output at event_t (coefficients held fixed), see solve.
        self.event_rate: torch.Tensor | None = None
        self._fixed_event_end: list = []  # see _record_fixed_grid_event_steps

    def _integrate(self, solver: Any, recorder: _TorchdiffeqStepRecorder, t: torch.Tensor) -> torch.Tensor:
        if not self.adaptive:
            self._fixed_event_end = _record_fixed_grid_event_steps(solver, recorder)
        event_t, solution = solver.integrate_until_event(t[0], self.event_fn)
        self.event_t = event_t.detach()
        self.num_steps = len(recorder.t0)
        return solution

    def _last_step_end(self, solver: Any, solution: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.time_shift is not None and self.num_steps:  # before the solver's state of the last step goes
            self.event_rate = _event_rate(self.func, solver, self.adaptive, self.event_t, self._fixed_event_end)
        if not self._fixed_event_end:
            return super()._last_step_end(solver, solution, t)
        end, self._fixed_event_end = self._fixed_event_end, []
        del solver._step_func  # drop the recording wrapper (an instance attribute)
        return end[1], end[3]  # the end of the step with the event

    def _outputs_in_step(self, t1: torch.Tensor, t: torch.Tensor, time_dtype: torch.dtype) -> dict[int, list[int]]:
        # The state at the event: dense output inside the last step, at the constant time event_t (found under
        # no_grad). No step at all when event_fn(t0, y0) == 0; _odeint_until_event handles that.
        return {self.num_steps - 1: [1]} if self.num_steps else {}

    def _shifted(self, t: torch.Tensor) -> torch.Tensor:
        # t + 0 is t bit for bit: the shift only carries the derivative w.r.t. t_0.
        return t if self.time_shift is None else t + self.time_shift.to(t.dtype)

    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        if self.time_shift is None:
            return super().vector_field(t, y, kwargs)
        # The time shift carries ∂L/∂t_0 through torchdiffeq's own perturbation.
        return self.func(self._shifted(t), y, **dict(kwargs))

    def dense_output(self, trajectory: Trajectory, n: int, y0: torch.Tensor, y1: torch.Tensor,
                     k: Sequence[torch.Tensor], t_out: torch.Tensor) -> torch.Tensor:
        # The only output after y0, at event_t: a constant, as in torchdiffeq's find_event. Unshifted step ends:
        # the event state's dependence on t_0 through them is event_rate.
        return super().dense_output(trajectory, n, y0, y1, k, self.event_t.reshape(1))

    def _fixed_step_size(self, dt: torch.Tensor):
        return self.solver.step_size  # integrate_until_event steps by the step size as given


def _odeint_until_event(host_args: dict[str, Any], event_fn: Callable, y0: torch.Tensor, t: torch.Tensor,
                        params: Sequence[torch.Tensor], t_is_reversed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The event branch of :func:`~symadj_plugins.torchdiffeq.odeint_symplectic_adjoint`, in torchdiffeq's
    normalised coordinates (flat ``y0``, increasing ``t`` of 2 times, ``event_fn`` normalised); ``host_args``: the
    keyword arguments of :class:`~.host._TorchdiffeqHost`. Returns ``(event_t, solution)``: a scalar in the caller's
    time direction, and ``(2, *y0.shape)`` (``y0``, the state at ``event_t``)."""
    host = _TorchdiffeqEventHost(**host_args, event_fn=event_fn)
    t_core = t
    if t.requires_grad and torch.is_grad_enabled():
        # ∂L/∂t_0 of the discrete solution (what backprop through the same steps gives, and what
        # odeint_event's rerouting of the event time needs): see _TorchdiffeqEventHost.time_shift.
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
