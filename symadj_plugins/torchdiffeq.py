"""torchdiffeq adapter: the symplectic adjoint behind torchdiffeq's own solvers.

The forward pass is ``torchdiffeq``'s: its input normalisation (``_check_inputs``: tuple states, reversed
time, perturbed times, norms, callbacks), its solver classes and tableaux, its step-size controller. We
only listen to it (the official ``callback_accept_step`` / ``callback_step`` hooks) to record each accepted
step, and replace the backward pass by the core's exact reverse sweep.

Private torchdiffeq names this module depends on (each is exercised by ``tests/test_torchdiffeq_internals.py``
so that an upstream change fails loudly and here):

- ``torchdiffeq._impl.odeint.SOLVERS`` and ``torchdiffeq._impl.misc._check_inputs`` / ``_flat_to_shape`` /
  ``Perturb``: the entry points ``torchdiffeq.odeint`` itself uses.
- ``torchdiffeq._impl.adjoint.find_parameters``: the default ``adjoint_params``.
- ``RKAdaptiveStepsizeODESolver``: ``.tableau`` (``alpha``, ``beta``, ``c_sol``), ``.rk_state`` (``y1``, ``f1``,
  ``t1``) read at accepted steps, ``._interp_fit`` and ``interp._interp_evaluate`` for dense output.
- ``FixedGridODESolver``: ``.perturb``, ``.interp``, ``._linear_interp``, ``._cubic_hermite_interp``, and the
  stage times of ``Euler``, ``Midpoint``, ``RK4`` (3/8 rule), ``Heun2``, ``Heun3`` (``_FIXED_GRID`` below).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchdiffeq
from torchdiffeq._impl import fixed_grid as _fixed_grid
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.interp import _interp_evaluate
from torchdiffeq._impl.misc import Perturb, _check_inputs, _flat_to_shape
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from .core import ButcherTableau, StageCall, Trajectory, odeint_symplectic

__all__ = ["odeint_symplectic_adjoint", "odeint_adjoint", "supported_methods", "SYMPLECTIC"]

SYMPLECTIC = "symplectic"
"""The ``adjoint_method`` value that selects the symplectic adjoint in :func:`odeint_adjoint`."""

_original_odeint_adjoint = torchdiffeq.odeint_adjoint


# --------------------------------------------------------------------------------------------------------
# Fixed-grid solvers: torchdiffeq writes their steps out by hand, so their tableaux and stage times are
# written here. A stage time is ``t0 + dt * c`` or, where torchdiffeq uses the grid point itself, ``"t1"``.
# ``PREV`` marks a stage torchdiffeq perturbs to just before ``t1`` when ``perturb=True``; stage 1 is
# always perturbed to just after ``t0`` then.

@dataclass(frozen=True)
class _FixedGridRule:
    tableau: ButcherTableau
    stage_times: tuple[float | str, ...]
    perturb_prev: tuple[bool, ...]


def _fixed(name, c, a_rows, b, stage_times, perturb_prev):
    return _FixedGridRule(ButcherTableau.from_rows(c, a_rows, b, name=name), stage_times, perturb_prev)


_FIXED_GRID: dict[type, _FixedGridRule] = {
    _fixed_grid.Euler: _fixed("euler", [0.0], [], [1.0], (0.0,), (False,)),
    _fixed_grid.Midpoint: _fixed("midpoint", [0.0, 0.5], [[0.5]], [0.0, 1.0], (0.0, 0.5), (False, False)),
    # torchdiffeq's "rk4" is the 3/8 rule (rk4_alt_step_func).
    _fixed_grid.RK4: _fixed("rk4", [0.0, 1 / 3, 2 / 3, 1.0], [[1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]],
                            [1 / 8, 3 / 8, 3 / 8, 1 / 8], (0.0, 1 / 3, 2 / 3, "t1"), (False, False, False, True)),
}
if hasattr(_fixed_grid, "Heun2"):  # added in torchdiffeq 0.2.4
    _FIXED_GRID[_fixed_grid.Heun2] = _fixed("heun2", [0.0, 1.0], [[1.0]], [0.5, 0.5], (0.0, 1.0), (False, True))
if hasattr(_fixed_grid, "Heun3"):
    _FIXED_GRID[_fixed_grid.Heun3] = _fixed("heun3", [0.0, 1 / 3, 2 / 3], [[1 / 3], [0.0, 2 / 3]],
                                            [0.25, 0.0, 0.75], (0.0, 1 / 3, 2 / 3), (False, False, False))


def register_fixed_grid_solver(solver_cls: type, tableau: ButcherTableau, stage_times: Sequence[float | str],
                               perturb_prev: Sequence[bool]) -> None:
    """Teaches the symplectic adjoint a ``FixedGridODESolver`` subclass torchdiffeq does not ship: its tableau, where
    its ``_step_func`` evaluates each stage (``t0 + dt * c`` or ``"t1"``), and which stages it perturbs to just
    before ``t1`` when ``perturb=True``. torchdiffeq's ``SOLVERS`` is not touched: pass the class itself as
    ``method`` to ``_TorchdiffeqHost``."""
    if not (isinstance(solver_cls, type) and issubclass(solver_cls, _fixed_grid.FixedGridODESolver)):
        raise TypeError(f"{solver_cls!r} is not a torchdiffeq FixedGridODESolver subclass")
    if not (len(stage_times) == len(perturb_prev) == tableau.num_stages):
        raise ValueError(f"{tableau.name}: one stage time and one perturb flag per stage ({tableau.num_stages})")
    _FIXED_GRID[solver_cls] = _FixedGridRule(tableau, tuple(stage_times), tuple(perturb_prev))


@functools.cache
def _adaptive_tableau(solver_cls: type) -> ButcherTableau:
    """The tableau of a torchdiffeq adaptive RK solver class: ``c = (0, *alpha)``, ``A`` from ``beta``,
    ``b = c_sol``."""
    tab = solver_cls.tableau
    return ButcherTableau.from_rows([0.0, *tab.alpha.tolist()], [row.tolist() for row in tab.beta],
                                    tab.c_sol.tolist(), name=solver_cls.__name__)


def supported_methods() -> list[str]:
    """Names in torchdiffeq's ``SOLVERS`` that the symplectic adjoint supports (explicit RK methods)."""
    return [name for name, cls in SOLVERS.items()
            if isinstance(cls, type) and (issubclass(cls, RKAdaptiveStepsizeODESolver) or cls in _FIXED_GRID)]


# --------------------------------------------------------------------------------------------------------
# How step n's first stage was obtained in the forward pass.
_START_INITIAL = "initial"    # f(t_0, y_0), no perturbation (torchdiffeq's _before_integrate)
_START_FSAL = "fsal"          # previous step's last stage, which is f(t_n⁻, y_n): re-evaluated, bit-identical
_START_JUMP = "jump"          # f(t_n⁺, y_n) re-evaluated after a jump_t discontinuity
_START_CARRIED = "carried"    # previous step's last stage, not at y_n (fehlberg2, adaptive_heun): stored


class _Recorder:
    """Stands between a torchdiffeq solver and its (normalised) ``func`` and records accepted steps.

    It forwards every call and every callback, so the solver and the user's callbacks see exactly what
    they would see under ``torchdiffeq.odeint``.
    """

    def __init__(self, func: Callable, y0: torch.Tensor, adaptive: bool, carried_last_stage: bool,
                 stages_to_keep: int = 0):
        self.func = func
        self.y0 = y0
        self.adaptive = adaptive
        self.carried_last_stage = carried_last_stage
        self.solver: Any = None
        self.t0: list[torch.Tensor] = []
        self.dt: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        self.starts: list[str] = []
        self.carried: list[torch.Tensor | None] = []
        self._jumped = False
        self._checked = False
        # Stage inputs of the step being attempted (kept only if stages_to_keep > 0): the first
        # `stages_to_keep` calls after callback_step are the step's stages, in order.
        self.stages_to_keep = stages_to_keep
        self.stage_inputs: list[list[torch.Tensor]] = []
        self._attempt: list[torch.Tensor] | None = None

    def __call__(self, t: torch.Tensor, y: torch.Tensor, perturb: Perturb = Perturb.NONE) -> torch.Tensor:
        out = self.func(t, y, perturb=perturb)
        if not self._checked:
            _check_func_output(out, y)
            self._checked = True
        if perturb is Perturb.NEXT:
            self._jumped = True
        if self._attempt is not None and len(self._attempt) < self.stages_to_keep:
            self._attempt.append(y)
        return out

    def callback_step(self, t0, y0, dt):
        self.begin_step(t0, y0, dt)
        self.func.callback_step(t0, y0, dt)

    def begin_step(self, t0, y0, dt):
        """A step is attempted: start collecting its stage inputs; record it if the grid is fixed (every
        step accepted). Called by ``callback_step``, and directly for fixed-grid steps taken by
        ``integrate_until_event``, which calls no callback."""
        if self.stages_to_keep:
            # Adaptive steps start from the carried k_1 (stage 1 input: y0) and call f for stages 2..s;
            # fixed-grid steps call f for every stage.
            self._attempt = [y0] if self.adaptive else []
        if not self.adaptive:  # fixed grid: every step is accepted
            self._record(t0, y0, dt, _START_INITIAL, None)

    def callback_accept_step(self, t0, y0, dt):
        if self.adaptive:
            carried = None
            if not self.states:
                start = _START_INITIAL
            elif self._jumped:  # adaptive solvers call f with Perturb.NEXT only after a jump_t
                start = _START_JUMP
            elif self.carried_last_stage:
                start, carried = _START_CARRIED, self.solver.rk_state.f1  # the k_1 this step used
            else:
                start = _START_FSAL
            self._jumped = False
            self._record(t0, y0, dt, start, carried)
        self.func.callback_accept_step(t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        self.func.callback_reject_step(t0, y0, dt)

    def _record(self, t0, y0, dt, start, carried):
        if self.stages_to_keep:
            self.stage_inputs.append(self._attempt)
        self.t0.append(t0)
        self.dt.append(dt)
        self.states.append(y0)
        self.starts.append(start)
        self.carried.append(carried)


def _check_func_output(out: Any, y: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"func(t, y) must return a Tensor (or a tuple matching a tuple y0), got {type(out).__name__}")
    if out.shape != y.shape or out.dtype != y.dtype:
        raise ValueError(
            f"func(t, y) returned shape {tuple(out.shape)} and dtype {out.dtype}, but the state has shape "
            f"{tuple(y.shape)} and dtype {y.dtype} (flattened if y0 is a tuple); func must return dy/dt with "
            "the same shape and dtype as y.")


class _TorchdiffeqHost:
    """One torchdiffeq solve, as the core's :class:`~symadj_plugins.core.adjoint.HostSolver`."""

    def __init__(self, func: Callable, method: str | type, rtol, atol, options: dict, store_stages: bool = False,
                 event_fn: Callable | None = None):
        self.func = func  # torchdiffeq's normalised func (_PerturbFunc around reversal/tuple wrappers)
        self.store_stages = store_stages
        # Event mode (torchdiffeq's normalised event_fn): solve until it changes sign; `solve` sets
        # `event_t` (normalised time) and `num_steps`.
        self.event_fn = event_fn
        self.event_t: torch.Tensor | None = None
        self.num_steps = 0
        # A zero scalar whose gradient is ∂L/∂t_0 of the discrete solution (event mode): passed to the core
        # as a parameter and added to every time at which the backward pass evaluates f or dense output, so
        # the core's parameter VJPs sum κᵀ ∂f/∂t over all stages (every stage time is t_0 + constants).
        self.time_shift: torch.Tensor | None = None
        # With time_shift: d/dt of the forward's dense output at event_t (coefficients held fixed), see solve.
        self.event_rate: torch.Tensor | None = None
        # A name in torchdiffeq's SOLVERS, or a solver class (see register_fixed_grid_solver).
        self.solver_cls = SOLVERS[method] if isinstance(method, str) else method
        self.method = method if isinstance(method, str) else self.solver_cls.__name__
        self.adaptive = issubclass(self.solver_cls, RKAdaptiveStepsizeODESolver)
        if self.adaptive:
            self.tableau = _adaptive_tableau(self.solver_cls)
            self.fixed_rule = None
        else:
            self.fixed_rule = _FIXED_GRID[self.solver_cls]
            self.tableau = self.fixed_rule.tableau
        self.rtol, self.atol, self.options = rtol, atol, options
        self.solver: Any = None

    # -- forward ----------------------------------------------------------------------------------------
    def solve(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Trajectory]:
        tab = self.tableau
        # A last stage evaluated at (t_{n+1}⁻, y_{n+1}) can be re-evaluated; any other must be stored.
        carried_last_stage = self.adaptive and not tab.fsal
        recorder = _Recorder(self.func, y0, self.adaptive, carried_last_stage,
                             stages_to_keep=tab.num_stages if self.store_stages else 0)
        solver = self.solver_cls(func=recorder, y0=y0, rtol=self.rtol, atol=self.atol, **self.options)
        recorder.solver = solver
        fixed_event_end: list = []
        if self.event_fn is None:
            solution = solver.integrate(t)
        else:
            if not self.adaptive:
                fixed_event_end = _record_fixed_grid_event_steps(solver, recorder)
            event_t, solution = solver.integrate_until_event(t[0], self.event_fn)
            self.event_t = event_t.detach()
        if len(t) > 1 and not recorder.t0 and self.event_fn is None:
            raise RuntimeError(f"torchdiffeq {torchdiffeq.__version__} did not report its steps through "
                               "func.callback_step / callback_accept_step (added in torchdiffeq 0.2.4); "
                               "symadj-plugins needs torchdiffeq>=0.2.4")
        self.num_steps = len(recorder.t0)

        if self.time_shift is not None and self.num_steps:
            # The event state is the last step's dense output at the constant time event_t, so shifting t_0 (and
            # with it the step) by δ moves it by -δ·(d/dt of the dense output). That rate needs the real stage
            # values, which the core's dense-output VJP does not have (it passes zeros): take it here, from the
            # forward's own interpolant, differentiated in its evaluation time.
            if self.adaptive:
                state = solver.rk_state
                self.event_rate = _time_derivative(
                    lambda tau: _interp_evaluate(state.interp_coeff, state.t0, state.t1, tau), self.event_t)
            else:
                t0_last, t1_last, y0_last, y1_last, f0_last = fixed_event_end
                if solver.interp == "cubic":
                    f1_last = self.func(t1_last, y1_last)  # as torchdiffeq's integrate_until_event does
                    interp = functools.partial(solver._cubic_hermite_interp, t0_last, y0_last, f0_last, t1_last,
                                               y1_last, f1_last)
                else:
                    interp = functools.partial(solver._linear_interp, t0_last, t1_last, y0_last, y1_last)
                self.event_rate = _time_derivative(interp, self.event_t)

        if self.adaptive:
            final_t1, final_y = solver.rk_state.t1, solver.rk_state.y1
            solver.rk_state = None  # drop the solver's own copies of the last step
        elif fixed_event_end:
            final_t1, final_y = fixed_event_end[1], fixed_event_end[3]  # the end of the step with the event
            del solver._step_func  # drop the recording wrapper (an instance attribute)
        else:
            final_t1, final_y = t[-1], solution[-1]  # torchdiffeq's grid ends exactly at t[-1]
        # Keep the solver (its tableau copy, interpolation methods) but not the recorder's lists: the
        # trajectory below is the only owner of the states, so autograd frees them after backward.
        solver.func = self.func
        self.solver = solver

        time_dtype = recorder.t0[0].dtype if recorder.t0 else t.dtype
        if recorder.t0:
            t0 = torch.stack(recorder.t0)
            t1 = torch.cat([t0[1:], final_t1.reshape(1).to(time_dtype)])
            dt = torch.stack([d.to(time_dtype) for d in recorder.dt])
        else:
            t0 = t1 = dt = torch.zeros(0, dtype=time_dtype, device=y0.device)
        states = [*recorder.states, final_y] if recorder.states else [y0]

        # Output k >= 1 is produced in the first accepted step that ends at or after t[k] (both the
        # adaptive `while next_t > t1` loop and the fixed-grid `while t1 >= t[j]` loop do this).
        outputs_in_step: dict[int, list[int]] = {}
        if self.event_fn is not None:
            # The state at the event: dense output inside the last step, at the constant time event_t
            # (found under no_grad). No step at all when event_fn(t0, y0) == 0; the caller handles that.
            if self.num_steps:
                outputs_in_step[self.num_steps - 1] = [1]
        else:
            step_of_output = torch.searchsorted(t1.cpu(), t[1:].detach().cpu().to(time_dtype), side="left").tolist()
            for k, n in enumerate(step_of_output, start=1):
                outputs_in_step.setdefault(n, []).append(k)

        stage_inputs = None
        if self.store_stages:
            if any(len(inputs) != tab.num_stages for inputs in recorder.stage_inputs):
                raise RuntimeError(f"torchdiffeq's {self.method} evaluated a different number of stages than its "
                                   f"tableau has ({tab.num_stages}); please report this with your torchdiffeq version")
            stage_inputs = [torch.stack(inputs) for inputs in recorder.stage_inputs]
        trajectory = Trajectory(states, t0, t1, dt, recorder.carried, outputs_in_step, stage_inputs=stage_inputs)
        trajectory.host_data["starts"] = recorder.starts
        trajectory.host_data["stage_times"] = self._stage_times(t0, t1, dt, y0)
        return solution, trajectory

    def _stage_times(self, t0: torch.Tensor, t1: torch.Tensor, dt: torch.Tensor,
                     y0: torch.Tensor) -> torch.Tensor:
        """``(N, s)`` times at which torchdiffeq evaluated each stage, in the dtype it computed them in."""
        if self.adaptive:
            # _runge_kutta_step casts t0, dt, t1 to the state's real dtype and uses t1 where alpha == 1.
            t_dtype = y0.abs().dtype
            t0, dt, t1 = t0.to(t_dtype), dt.to(t_dtype), t1.to(t_dtype)
            alpha = self.solver.tableau.alpha  # torchdiffeq's own copy, already in the state dtype
            times = [t0] + [t1 if a == 1.0 else t0 + alpha[i] * dt for i, a in enumerate(self.tableau.c[1:])]
        else:
            times = [t1 if c == "t1" else t0 + dt * c for c in self.fixed_rule.stage_times]
        return torch.stack(times, dim=-1) if len(t0) else torch.zeros(0, self.tableau.num_stages)

    # -- backward -----------------------------------------------------------------------------------------
    def stage_calls(self, trajectory: Trajectory, n: int) -> list[StageCall | None]:
        times = trajectory.host_data["stage_times"][n]
        calls: list[StageCall | None] = []
        if self.adaptive:
            start = trajectory.host_data["starts"][n]
            first = {_START_INITIAL: Perturb.NONE, _START_FSAL: Perturb.PREV, _START_JUMP: Perturb.NEXT}.get(start)
            calls.append(None if start == _START_CARRIED else StageCall(times[0], (("perturb", first),)))
            for i, c in enumerate(self.tableau.c[1:], start=1):
                calls.append(StageCall(times[i], (("perturb", Perturb.PREV if c == 1.0 else Perturb.NONE),)))
        else:
            perturb = bool(self.solver.perturb)
            for i, prev in enumerate(self.fixed_rule.perturb_prev):
                flag = Perturb.NONE
                if perturb:
                    flag = Perturb.NEXT if i == 0 else (Perturb.PREV if prev else Perturb.NONE)
                calls.append(StageCall(times[i], (("perturb", flag),)))
        return calls

    def _shifted(self, t: torch.Tensor) -> torch.Tensor:
        # t + 0 is t bit for bit: the shift only carries the derivative w.r.t. t_0.
        return t if self.time_shift is None else t + self.time_shift.to(t.dtype)

    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        return self.func(self._shifted(t), y, **dict(kwargs))

    def dense_output(self, trajectory: Trajectory, n: int, y0: torch.Tensor, y1: torch.Tensor,
                     k: Sequence[torch.Tensor], t_out: torch.Tensor) -> torch.Tensor:
        # Unshifted step ends: the event state's dependence on t_0 through them is event_rate (see solve).
        t0, t1, dt = trajectory.t0[n], trajectory.t1[n], trajectory.dt[n]
        if self.event_fn is not None:
            t_out = self.event_t  # the only output after y0; a constant, as in torchdiffeq's find_event
        if self.adaptive:
            coeffs = self.solver._interp_fit(y0, y1, torch.stack(list(k), dim=-1), dt)
            return _interp_evaluate(coeffs, t0, t1, t_out.to(t0.dtype))
        if self.solver.interp == "linear":
            return self.solver._linear_interp(t0, t1, y0, y1, t_out)
        if self.solver.interp == "cubic":
            f1 = self.func(self._shifted(t1), y1)
            return self.solver._cubic_hermite_interp(t0, y0, k[0], t1, y1, f1, t_out)
        raise ValueError(f"Unknown interpolation method {self.solver.interp!r}; torchdiffeq supports "
                         "'linear' and 'cubic'")


def _record_fixed_grid_event_steps(solver: Any, recorder: _Recorder) -> list:
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


# --------------------------------------------------------------------------------------------------------
# Public API

def odeint_symplectic_adjoint(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *,
                              rtol: float | torch.Tensor = 1e-7, atol: float | torch.Tensor = 1e-9,
                              method: str | None = None, options: dict | None = None,
                              event_fn: Callable | None = None,
                              adjoint_params: Iterable[torch.Tensor] | None = None,
                              store_stages: bool = False):
    """``torchdiffeq.odeint`` with gradients by the symplectic adjoint method.

    Same arguments and same returned values as ``torchdiffeq.odeint`` (the forward solve *is*
    torchdiffeq's, bit for bit); ``adjoint_params`` as in ``torchdiffeq.odeint_adjoint`` (default: the
    parameters of ``func``, which must then be an ``nn.Module``, that require grad).

    Gradients w.r.t. ``y0`` and ``adjoint_params`` are exact for the discrete solution: they equal
    backpropagation through the same accepted steps with the step sizes held constant, up to rounding.
    Memory held between forward and backward is one state per accepted step; the backward pass holds one
    graph of ``func`` at a time. If ``t.requires_grad``, ``∂L/∂t_k = g_kᵀ f(t_k, y(t_k))`` for ``k ≥ 1`` and
    ``∂L/∂t_0 = -λ_0ᵀ f(t_0, y_0)`` (``g_k`` the cotangent of output ``k``, ``λ_0`` that of ``y0`` from later
    outputs), the formula ``torchdiffeq.odeint_adjoint`` uses.

    ``store_stages=True`` keeps the stage inputs of every accepted step from the forward pass (memory
    ``N·s·|y|`` instead of ``N·|y|``) so that the backward pass need not recompute them: about one forward
    pass faster. Still one graph of ``func`` at a time; the gradient is the same.

    Events: with ``event_fn``, the solve runs from ``t[0]`` (in the direction of ``t[1]``) until
    ``event_fn(t, y)`` changes sign and returns ``(event_t, solution)`` exactly as ``torchdiffeq.odeint`` does
    (adaptive methods, and fixed grids with ``options=dict(step_size=...)``), so it serves as the
    ``odeint_interface`` of ``torchdiffeq.odeint_event``. ``event_t`` is a constant (no gradient, as in
    torchdiffeq: ``odeint_event`` reroutes its gradient through the event state); ``solution[1]``, the last
    step's dense output at ``event_t``, is differentiable w.r.t. ``y0``, ``adjoint_params`` and ``t[0]``, with
    the gradient of backprop through the same steps (for ``t[0]`` too, unlike the formula above).

    Supported methods: every explicit Runge–Kutta method of the installed torchdiffeq (see
    :func:`supported_methods`). Not supported: double backward (``create_graph=True``).

    Args:
        func: ``f(t, y)``; ``t`` a scalar tensor, ``y`` shaped like ``y0`` (or a tuple like it).
        y0: initial state, a tensor or a tuple of tensors.
        t: 1-D tensor of output times, strictly increasing or strictly decreasing; ``t[0]`` is the start.
            With ``event_fn``: two times, the start and any time that gives the direction.
        event_fn: optional ``event_fn(t, y) -> Tensor``; the solve stops where it crosses zero.
    Returns:
        ``(len(t), *y0.shape)`` tensor, or a tuple of such tensors for a tuple ``y0``. With ``event_fn``:
        ``(event_t, solution)``, ``event_t`` a scalar tensor and ``solution`` of shape ``(2, *y0.shape)``
        (``y0`` and the state at ``event_t``), or a tuple of such for a tuple ``y0``.
    """
    _check_time(t)
    method = "dopri5" if method is None else method
    if method not in SOLVERS or method not in supported_methods():
        raise ValueError(f"method={method!r} is not supported by the symplectic adjoint, which needs an explicit "
                         f"Runge-Kutta method; supported: {', '.join(supported_methods())}.")
    params = _adjoint_params(func, adjoint_params)
    if event_fn is not None:
        _check_event_inputs(event_fn, t, method, options)

    shapes, nfunc, y0_flat, t_norm, rtol, atol, method, options, event_fn, t_is_reversed = _check_inputs(
        func, y0, t, rtol, atol, method, options, event_fn, SOLVERS)
    host = _TorchdiffeqHost(nfunc, method, rtol, atol, options, store_stages=store_stages, event_fn=event_fn)
    if event_fn is None:
        solution = odeint_symplectic(host, y0_flat, t_norm, params)
    else:
        t_core = t_norm
        if t_norm.requires_grad and torch.is_grad_enabled():
            # ∂L/∂t_0 of the discrete solution (what backprop through the same steps gives, and what
            # odeint_event's rerouting of the event time needs): see _TorchdiffeqHost.time_shift.
            host.time_shift = t_norm[0] - t_norm[0].detach()
            params, t_core = (*params, host.time_shift), t_norm.detach()
        solution = odeint_symplectic(host, y0_flat, t_core, params)
        if host.event_rate is not None:
            solution = _EventStateTimeShift.apply(solution, host.time_shift, host.event_rate)
        if host.num_steps == 0:  # event_fn(t0, y0) == 0: torchdiffeq returns y0 itself as the event state
            solution = torch.cat([solution[:1], y0_flat[None]])
        event_t = host.event_t.to(t_norm)
        if t_is_reversed:
            event_t = -event_t
    if shapes is not None:
        solution = _flat_to_shape(solution, (len(t),), shapes)
    return solution if event_fn is None else (event_t, solution)


def odeint_adjoint(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *,
                   rtol: float | torch.Tensor = 1e-7, atol: float | torch.Tensor = 1e-9,
                   method: str | None = None, options: dict | None = None, event_fn: Callable | None = None,
                   adjoint_rtol: float | None = None, adjoint_atol: float | None = None,
                   adjoint_method: str | None = None, adjoint_options: dict | None = None,
                   adjoint_params: Iterable[torch.Tensor] | None = None):
    """Drop-in for ``torchdiffeq.odeint_adjoint`` that also accepts ``adjoint_method="symplectic"``.

    Any other ``adjoint_method`` keeps torchdiffeq's meaning (the solver of the continuous adjoint ODE) and
    the call goes to torchdiffeq unchanged. With ``"symplectic"`` the call goes to
    :func:`odeint_symplectic_adjoint`; ``adjoint_rtol``, ``adjoint_atol`` and ``adjoint_options`` are then
    accepted and ignored, because the symplectic adjoint solves no second ODE: it replays the forward
    pass's own accepted steps exactly, so there is no backward tolerance to choose.
    """
    if adjoint_method == SYMPLECTIC:
        return odeint_symplectic_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                         event_fn=event_fn, adjoint_params=adjoint_params)
    return _original_odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                    event_fn=event_fn, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                    adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                                    adjoint_params=adjoint_params)


def _check_time(t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D torch.Tensor of times, got {type(t).__name__}")
    if not torch.is_floating_point(t):
        raise TypeError(f"t must be a floating point tensor, got dtype {t.dtype}; e.g. torch.linspace(0, 1, 10)")
    if t.ndim != 1 or len(t) == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor of times, got shape {tuple(t.shape)}")
    if len(t) > 1:
        diff = t[1:] - t[:-1]
        if not ((diff > 0).all() or (diff < 0).all()):
            raise ValueError("t must be strictly increasing or strictly decreasing (no repeated or "
                             f"out-of-order times), got {t.detach().cpu().tolist()}")


def _check_event_inputs(event_fn: Any, t: torch.Tensor, method: str, options: dict | None) -> None:
    if not callable(event_fn):
        raise TypeError(f"event_fn must be a callable event_fn(t, y) -> Tensor, got {type(event_fn).__name__}")
    if len(t) != 2:
        raise ValueError(f"with event_fn, t must hold 2 times (the start, and any other time giving the direction "
                         f"of integration), as in torchdiffeq; got len(t)={len(t)}. torchdiffeq.odeint_event "
                         "builds it for you.")
    if not issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver) and (options or {}).get("step_size") is None:
        raise ValueError(f"event handling with the fixed-grid method {method!r} needs a step size: pass "
                         "options=dict(step_size=...), as torchdiffeq requires.")


def _adjoint_params(func: Callable, adjoint_params: Iterable[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise ValueError("func must be an instance of nn.Module to find its parameters; alternatively pass "
                             "them explicitly as `adjoint_params` (use adjoint_params=() if there are none).")
        adjoint_params = find_parameters(func)
    params = tuple(adjoint_params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params must be tensors, got {type(p).__name__}")
    return tuple(p for p in params if p.requires_grad)
