"""torchdiffeq adapter: the symplectic adjoint behind torchdiffeq's own solvers.

The forward pass is ``torchdiffeq``'s: its input normalisation (``_check_inputs``: tuple states, reversed
time, perturbed times, norms, callbacks), its solver classes and tableaux, its step-size controller. We
only listen to it (the official ``callback_accept_step`` / ``callback_step`` hooks) to record each accepted
step, and replace the backward pass by the core's exact reverse sweep.

Private torchdiffeq names this module depends on (``_check_torchdiffeq()`` verifies them at ``register()`` and
raises naming the installed version if they differ; each is exercised by ``tests/test_torchdiffeq_internals.py``):

- ``torchdiffeq._impl.odeint.SOLVERS`` and ``torchdiffeq._impl.misc._check_inputs`` / ``_flat_to_shape`` /
  ``Perturb``: the entry points ``torchdiffeq.odeint`` itself uses.
- ``torchdiffeq._impl.adjoint.find_parameters``: the default ``adjoint_params``.
- ``RKAdaptiveStepsizeODESolver``: ``.tableau`` (``alpha``, ``beta``, ``c_sol``), ``.rk_state`` (``y1``, ``f1``,
  ``t1``) read at accepted steps, ``._interp_fit`` and ``interp._interp_evaluate`` for dense output.
- ``FixedGridODESolver``: ``.perturb``, ``.interp``, ``._linear_interp``, ``._cubic_hermite_interp``, and the
  stage times of ``Euler``, ``Midpoint``, ``RK4`` (3/8 rule), ``Heun2``, ``Heun3`` (``_FIXED_GRID`` below).
- Patched by :func:`install` (undone by ``unregister()``): ``torchdiffeq.odeint_adjoint`` (public); the
  ``_check_inputs`` that ``torchdiffeq._impl.odeint.odeint`` and ``torchdiffeq._impl.adjoint.odeint_adjoint`` call,
  to refuse ``method="symplectic"`` with an explanation; ``torchdiffeq._impl.adjoint.odeint``, the solve of
  torchdiffeq's own adjoint backward pass, to explain ``adjoint_method="symplectic"`` reaching it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
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

from ._registry import check_internals
from .core import ButcherTableau, HostSolver, StageCall, Trajectory, odeint_symplectic
from .core.budget import MemoryBudget
from .core.recording import FirstStage, StageKeeper
from .core.replay import RngState
from .core.tableaux import EULER, HEUN2, HEUN3, MIDPOINT, RK4_38
from .inputs import check_times, parameters_requiring_grad
from .options import SymplecticAdjoint, current_options

__all__ = ["odeint_symplectic_adjoint", "odeint_adjoint", "supported_methods", "SYMPLECTIC", "FixedGridRule",
           "torchdiffeq_host", "install"]

SYMPLECTIC = "symplectic"
"""The ``adjoint_method`` value that selects the symplectic adjoint in :func:`odeint_adjoint`."""

_original_odeint_adjoint = torchdiffeq.odeint_adjoint


# --------------------------------------------------------------------------------------------------------
# Fixed-grid solvers: torchdiffeq writes their steps out by hand, so their tableaux (core/tableaux.py) and
# stage times (here) are restated. A stage time is ``t0 + dt * c`` or, where torchdiffeq uses the grid point
# itself, ``"t1"``. ``PREV`` marks a stage torchdiffeq perturbs to just before ``t1`` when ``perturb=True``;
# stage 1 is always perturbed to just after ``t0`` then.

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
_START_CARRIED = "carried"    # previous last stage, not at y_n (fehlberg2, adaptive_heun, master's tsit5): stored


class _TorchdiffeqStepRecorder:
    """Stands between a torchdiffeq solver and its (normalised) ``func`` and records accepted steps.

    It forwards every call and every callback, so the solver and the user's callbacks see exactly what
    they would see under ``torchdiffeq.odeint``. The stage evaluations of each attempted step (adaptive: the
    ``s - 1`` calls after ``callback_step``, stage 1 being carried in; fixed grid: the ``s`` calls after it) go
    through the core's :class:`~symadj_plugins.core.recording.StageKeeper`, which keeps what the memory budget
    allows and notes the random-number state of those that drew random numbers.
    """

    def __init__(self, func: Callable, adaptive: bool, carried_last_stage: bool, keeper: StageKeeper):
        self.func = func
        self.adaptive = adaptive
        self.carried_last_stage = carried_last_stage
        self.keeper = keeper
        self.solver: Any = None
        self.t0: list[torch.Tensor] = []
        self.dt: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        self.starts: list[str] = []
        self.carried: list[torch.Tensor | None] = []
        self._jumped = False
        self._checked = False
        self._first_rng: RngState | None = None  # f(t_0, y_0), an adaptive solve's first call
        self._jump_rng: RngState | None = None  # f(t_n⁺, y_n) after a jump_t
        self._num_calls = 0

    def __call__(self, t: torch.Tensor, y: torch.Tensor, perturb: Perturb = Perturb.NONE) -> torch.Tensor:
        if self.keeper.expects_stage:
            out = self.keeper.evaluate(self.func, t, y, perturb=perturb)
        else:  # not a stage: f(t_0, y_0), the initial step's probe, f after a jump, cubic interpolation
            out, rng = self.keeper.randomness.call(self.func, t, y, perturb=perturb)
            self.keeper.drew_random_numbers |= rng is not None
            if self._num_calls == 0:
                self._first_rng = rng
            if perturb is Perturb.NEXT:
                self._jump_rng = rng
        if not self._checked:
            _check_func_output(out, y)
            self._checked = True
        if perturb is Perturb.NEXT:
            self._jumped = True
        self._num_calls += 1
        return out

    def callback_step(self, t0, y0, dt):
        self.begin_step(t0, y0, dt)
        self.func.callback_step(t0, y0, dt)

    def begin_step(self, t0, y0, dt):
        """A step is attempted: its stage evaluations follow; record it if the grid is fixed (every step
        accepted). Called by ``callback_step``, and directly for fixed-grid steps taken by
        ``integrate_until_event``, which calls no callback."""
        if self.adaptive:
            self.keeper.begin_attempt(self._first_stage(y0))
        else:  # fixed grid: every step is accepted, and the previous one is over
            self.keeper.finish_attempt(accepted=True)
            self.keeper.begin_attempt(None)
            self._record(t0, y0, dt, _START_INITIAL, None)

    def _first_stage(self, y0: torch.Tensor) -> FirstStage:
        """How an adaptive attempt's k_1 was obtained (see the ``_START_*`` kinds)."""
        if not self.states:
            return FirstStage(y0, rng=self._first_rng)
        if self._jumped:
            return FirstStage(y0, rng=self._jump_rng)
        if self.carried_last_stage:
            return FirstStage(y0)  # stored, never evaluated again
        last = self.keeper.last_stage()  # first same as last: the previous step's last evaluation
        return FirstStage(y0, last.graph, last.rng)

    def finish(self) -> None:
        """After the solve: a fixed-grid step in progress is over."""
        self.keeper.finish_attempt(accepted=True)

    def callback_accept_step(self, t0, y0, dt):
        if self.adaptive:
            self.keeper.finish_attempt(accepted=True)
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
        self.keeper.finish_attempt(accepted=False)
        self.func.callback_reject_step(t0, y0, dt)

    def _record(self, t0, y0, dt, start, carried):
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


@dataclass
class _TorchdiffeqSteps:
    """The torchdiffeq adapter's record of a solve, beside the core's :class:`Trajectory`.

    Attributes:
        starts: per accepted step, how its first stage was obtained (``_START_*``).
        stage_times: ``(N, s)`` times at which torchdiffeq evaluated each stage, in the dtype it computed them in.
    """

    starts: list[str]
    stage_times: torch.Tensor


class _TorchdiffeqHost(HostSolver):
    """One torchdiffeq solve, as the core's :class:`~symadj_plugins.core.adjoint.HostSolver`."""

    def __init__(self, func: Callable, method: str | type, rtol, atol, options: dict, store_stages: bool = False,
                 memory_budget: MemoryBudget | None = None, params: Sequence[torch.Tensor] = (),
                 rule: FixedGridRule | None = None, user_func: Callable | None = None,
                 event_fn: Callable | None = None):
        self.func = func  # torchdiffeq's normalised func (_PerturbFunc around reversal/tuple wrappers)
        self.user_func = user_func  # the caller's func, whose module buffers the replay guards
        # What the forward pass keeps for the backward pass (core.budget); store_stages is the older switch.
        self.memory_budget = memory_budget or MemoryBudget.parse("stages" if store_stages else "min")
        self.params = tuple(params)  # differentiated: alive anyway, so not counted as graph bytes
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
        # A name in torchdiffeq's SOLVERS, or a solver class (a fixed-grid one torchdiffeq lacks comes with its rule).
        self.solver_cls = SOLVERS[method] if isinstance(method, str) else method
        self.method = method if isinstance(method, str) else self.solver_cls.__name__
        self.adaptive = issubclass(self.solver_cls, RKAdaptiveStepsizeODESolver)
        if self.adaptive:
            self.tableau = _adaptive_tableau(self.solver_cls)
            self.fixed_rule = None
        else:
            self.fixed_rule = rule if rule is not None else _FIXED_GRID.get(self.solver_cls)
            if self.fixed_rule is None:
                raise TypeError(f"{self.method} is not a fixed-grid solver the symplectic adjoint knows; pass its "
                                "FixedGridRule as rule=")
            self.tableau = self.fixed_rule.tableau
        self.rtol, self.atol, self.options = rtol, atol, options
        self.solver: Any = None

    # -- forward ----------------------------------------------------------------------------------------
    def solve(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Trajectory]:
        tab = self.tableau
        # A last stage evaluated at (t_{n+1}⁻, y_{n+1}) can be re-evaluated; any other must be stored.
        carried_last_stage = self.adaptive and not tab.fsal
        keeper = StageKeeper(self.memory_budget, y0, tab.num_stages, self.params)
        recorder = _TorchdiffeqStepRecorder(self.func, self.adaptive, carried_last_stage, keeper)
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
            # torchdiffeq's grid ends exactly at t[-1]. A copy, not a view of the solution: the caller may write
            # into the solution before backward(), as with backprop.
            final_t1, final_y = t[-1], solution[-1].clone()
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

        recorder.finish()
        stage_inputs, stage_graphs, stage_rng = keeper.results()
        if len(keeper.stage_rng) != len(states) - 1 or any(len(r) != tab.num_stages for r in keeper.stage_rng):
            raise RuntimeError(f"torchdiffeq's {self.method} evaluated a different number of stages than its tableau "
                               f"has ({tab.num_stages}); please report this with your torchdiffeq version")
        if keeper.drew_random_numbers and not self.adaptive and self.solver.interp == "cubic":
            raise ValueError(
                "the vector field draws random numbers, and interp='cubic' evaluates it once more per output, outside "
                "the steps the symplectic adjoint replays with the forward pass's random numbers; use interp='linear' "
                "(torchdiffeq's default) or a deterministic field.")
        host_data = _TorchdiffeqSteps(recorder.starts, self._stage_times(t0, t1, dt, y0))
        trajectory = Trajectory(states, t0, t1, dt, recorder.carried, outputs_in_step, host_data,
                                stage_inputs=stage_inputs, stage_graphs=stage_graphs, stage_rng=stage_rng)
        return solution, trajectory

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.user_func,) if isinstance(m, torch.nn.Module)]

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
        times = trajectory.host_data.stage_times[n]
        calls: list[StageCall | None] = []
        if self.adaptive:
            start = trajectory.host_data.starts[n]
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


# --------------------------------------------------------------------------------------------------------
# Public API

def odeint_symplectic_adjoint(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *,
                              rtol: float | torch.Tensor = 1e-7, atol: float | torch.Tensor = 1e-9,
                              method: str | None = None, options: dict | None = None,
                              event_fn: Callable | None = None,
                              adjoint_params: Iterable[torch.Tensor] | None = None,
                              memory_budget: int | float | str | None = None,
                              adjoint: SymplecticAdjoint | None = None,
                              store_stages: bool | None = None):
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

    ``memory_budget`` (or ``adjoint=SymplecticAdjoint(memory_budget=...)``, or a ``symadj_plugins.options(...)``
    block) trades memory for speed; the gradient is the same at every budget, to rounding. The default,
    ``"stages"``, keeps the stage inputs of every accepted step (``s`` states per step) so that the backward pass
    does not recompute them; ``"min"`` (or ``0``) keeps one state per step; a number of bytes (``"256MiB"``) also
    keeps the graphs of the stage evaluations of as many steps as fit (those steps then cost what backprop costs);
    ``"max"`` keeps everything. ``store_stages=True``/``False`` is the older spelling of ``"stages"``/``"min"``.
    See :class:`symadj_plugins.SymplecticAdjoint`.

    torchdiffeq's backward-pass hooks ``func.callback_step_adjoint``, ``callback_accept_step_adjoint`` and
    ``callback_reject_step_adjoint`` are never called here: they belong to the continuous adjoint's backward ODE
    solve, and the symplectic adjoint solves no backward ODE (it replays the forward pass's accepted steps). Nothing
    raises; the forward hooks ``callback_step``, ``callback_accept_step`` and ``callback_reject_step`` are called
    exactly as by ``torchdiffeq.odeint``. To observe the backward pass, use PyTorch hooks, e.g.
    ``nn.Module.register_full_backward_hook`` on ``func``, which runs once per stage evaluation of each step in the
    backward pass.

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
    check_times(t)
    method = "dopri5" if method is None else method
    if method == SYMPLECTIC:
        raise ValueError(_SYMPLECTIC_IS_NOT_A_METHOD)
    if method in SOLVERS and method not in supported_methods():
        raise ValueError(f"method={method!r} is not supported by the symplectic adjoint, which needs an explicit "
                         f"Runge-Kutta method; supported: {', '.join(supported_methods())}.")
    # A name torchdiffeq does not know (a typo, a method of a newer torchdiffeq) gets torchdiffeq's own
    # "Invalid method" from _check_inputs below.
    params = _adjoint_params(func, adjoint_params)
    budget = _memory_budget(memory_budget, adjoint, store_stages)
    if event_fn is not None:
        _check_event_inputs(event_fn, t, method, options)

    shapes, nfunc, y0_flat, t_norm, rtol, atol, method, options, event_fn, t_is_reversed = _check_inputs(
        func, y0, t, rtol, atol, method, options, event_fn, SOLVERS)
    host = _TorchdiffeqHost(nfunc, method, rtol, atol, options, memory_budget=budget, params=params, user_func=func,
                            event_fn=event_fn)
    if event_fn is None:
        solution = odeint_symplectic(host, y0_flat, t_norm, params)
    else:
        t_core = t_norm
        if t_norm.requires_grad and torch.is_grad_enabled():
            # ∂L/∂t_0 of the discrete solution (what backprop through the same steps gives, and what
            # odeint_event's rerouting of the event time needs): see _TorchdiffeqHost.time_shift.
            host.time_shift = t_norm[0] - t_norm[0].detach()
            # The forward pass's graphs of f do not see the shift: those steps replay instead.
            host.memory_budget = dataclasses.replace(host.memory_budget, graphs=False)
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
    :func:`odeint_symplectic_adjoint`; ``adjoint_options`` then holds the symplectic adjoint's options
    (``dict(memory_budget=...)``: the fields of :class:`symadj_plugins.SymplecticAdjoint`; any other key is a
    ``ValueError`` naming the valid ones), and ``adjoint_rtol`` and ``adjoint_atol`` are accepted and ignored,
    because the symplectic adjoint solves no second ODE: it replays the forward pass's own accepted steps
    exactly, so there is no backward tolerance to choose.
    """
    if method == SYMPLECTIC:
        raise ValueError(_SYMPLECTIC_IS_NOT_A_METHOD)
    if adjoint_method == SYMPLECTIC:
        adjoint = SymplecticAdjoint.from_options(adjoint_options)
        return odeint_symplectic_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                         event_fn=event_fn, adjoint_params=adjoint_params, adjoint=adjoint)
    return _original_odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                    event_fn=event_fn, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                    adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                                    adjoint_params=adjoint_params)


def torchdiffeq_host(func: Callable, method: str | type, rtol: float | torch.Tensor, atol: float | torch.Tensor,
                     options: dict, *, rule: FixedGridRule | None = None, store_stages: bool = False) -> HostSolver:
    """The core's :class:`~symadj_plugins.core.adjoint.HostSolver` for one torchdiffeq solve, for code that drives
    the core itself (``compat``): ``host.solve(y0, t)`` runs torchdiffeq's solver and records its accepted steps.

    Args:
        func, rtol, atol, options: as torchdiffeq's ``_check_inputs`` returns them (flat state, increasing time,
            ``func`` taking ``perturb=``).
        method: a name in torchdiffeq's ``SOLVERS`` or a solver class.
        rule: for a ``FixedGridODESolver`` subclass torchdiffeq does not ship, how it steps.
        store_stages: as in :func:`odeint_symplectic_adjoint`.

    Besides the ``HostSolver`` methods, the host's ``func``, ``adaptive``, ``tableau`` and, after ``solve``,
    ``solver`` (torchdiffeq's solver object that took the steps) are part of this contract.
    """
    return _TorchdiffeqHost(func, method, rtol, atol, options, store_stages=store_stages, rule=rule)


def _memory_budget(memory_budget: Any, adjoint: SymplecticAdjoint | None, store_stages: bool | None) -> MemoryBudget:
    """The budget from the arguments of :func:`odeint_symplectic_adjoint`, else the options in effect."""
    given = [name for name, value in (("memory_budget", memory_budget), ("adjoint", adjoint),
                                      ("store_stages", store_stages)) if value is not None]
    if len(given) > 1:
        raise TypeError(f"pass one of memory_budget, adjoint and store_stages, not {' and '.join(given)}")
    if adjoint is not None:
        if not isinstance(adjoint, SymplecticAdjoint):
            raise TypeError(f"adjoint must be a symadj_plugins.SymplecticAdjoint, got {type(adjoint).__name__}")
        return adjoint.budget
    if store_stages is not None:
        return MemoryBudget.parse("stages" if store_stages else "min")
    if memory_budget is not None:
        return MemoryBudget.parse(memory_budget)
    return current_options().budget


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
    return parameters_requiring_grad(adjoint_params)


# --------------------------------------------------------------------------------------------------------
# Registration (symadj_plugins.register() calls install(); unregister() undoes what it returns).

TESTED_VERSIONS = "0.2.4 and 0.2.5"

_SYMPLECTIC_IS_NOT_A_METHOD = (
    f"method={SYMPLECTIC!r} is not an ODE solver: the symplectic adjoint is a way to compute the gradient of a "
    "solve, selected with adjoint_method. Use odeint_adjoint(func, y0, t, method='dopri5', "
    f"adjoint_method={SYMPLECTIC!r}) (torchdiffeq's, after symadj_plugins.register(), or "
    "symadj_plugins.torchdiffeq.odeint_adjoint), or symadj_plugins.torchdiffeq.odeint_symplectic_adjoint(func, y0, "
    "t, method='dopri5').")

_STALE_ODEINT_ADJOINT = (
    f"adjoint_method={SYMPLECTIC!r} reached torchdiffeq's own odeint_adjoint, which solves the continuous "
    "adjoint. The name odeint_adjoint was probably imported (`from torchdiffeq import odeint_adjoint`) "
    "before symadj_plugins.register(). Call register() before that import, call "
    "torchdiffeq.odeint_adjoint(...), or use symadj_plugins.torchdiffeq.odeint_adjoint.")


def install() -> list[tuple[object, str, object]]:
    """Hooks ``adjoint_method="symplectic"`` into torchdiffeq; returns the ``(owner, attribute, original)`` triples
    it replaced (the undo list ``symadj_plugins.unregister()`` applies). Use ``symadj_plugins.register()``.

    Raises ``RuntimeError`` naming the installed torchdiffeq version, before patching anything, if its internals
    are not what this module expects. torchdiffeq's ``SOLVERS`` is not touched: ``"symplectic"`` never appears
    among its methods.
    """
    check_internals("torchdiffeq", TESTED_VERSIONS, _check_torchdiffeq(),
                    "The symplectic adjoint cannot guarantee exact gradients with it; use torchdiffeq.odeint or "
                    "odeint_adjoint without it, or a torchdiffeq version it supports.")
    odeint_module, adjoint_module = _modules()
    changes = [(torchdiffeq, "odeint_adjoint", torchdiffeq.odeint_adjoint),
               (odeint_module, "_check_inputs", odeint_module._check_inputs),
               (adjoint_module, "_check_inputs", adjoint_module._check_inputs),
               (adjoint_module, "odeint", adjoint_module.odeint)]
    torchdiffeq.odeint_adjoint = odeint_adjoint
    odeint_module._check_inputs = _refusing_symplectic_method(odeint_module._check_inputs)
    adjoint_module._check_inputs = _refusing_symplectic_method(adjoint_module._check_inputs)
    # A name bound before register() still reaches torchdiffeq's own odeint_adjoint, whose backward pass solves
    # the adjoint ODE with odeint(..., method=adjoint_method): there, "symplectic" gets an explanation.
    adjoint_module.odeint = _explaining_stale_adjoint(adjoint_module.odeint)
    return changes


def _modules():
    # sys.modules: torchdiffeq._impl re-exports the *function* odeint under the submodule's name.
    return sys.modules["torchdiffeq._impl.odeint"], sys.modules["torchdiffeq._impl.adjoint"]


def _refusing_symplectic_method(check_inputs: Callable) -> Callable:
    @functools.wraps(check_inputs)
    def _check_inputs(func, y0, t, rtol, atol, method, *args, **kwargs):
        if method == SYMPLECTIC:
            raise ValueError(_SYMPLECTIC_IS_NOT_A_METHOD)
        return check_inputs(func, y0, t, rtol, atol, method, *args, **kwargs)

    return _check_inputs


def _explaining_stale_adjoint(odeint: Callable) -> Callable:
    @functools.wraps(odeint)
    def _odeint(*args, method=None, **kwargs):
        if method == SYMPLECTIC:
            raise RuntimeError(_STALE_ODEINT_ADJOINT)
        return odeint(*args, method=method, **kwargs)

    return _odeint


def _check_torchdiffeq() -> list[str]:
    """What differs from the torchdiffeq this adapter was written for (empty if nothing): the private names of the
    module docstring, by presence and, for the ones :func:`install` wraps, by signature."""
    from torchdiffeq._impl import misc

    found: list[str] = []
    odeint_module, adjoint_module = _modules()
    for module in (odeint_module, adjoint_module):
        fn = getattr(module, "_check_inputs", None)
        if fn is None or _parameter_names(fn)[:6] != ["func", "y0", "t", "rtol", "atol", "method"]:
            found.append(f"{module.__name__}._check_inputs is missing or does not take (func, y0, t, rtol, atol, "
                         "method, ...)")
    if not callable(getattr(adjoint_module, "odeint", None)) or "method" not in _parameter_names(adjoint_module.odeint):
        found.append(f"{adjoint_module.__name__}.odeint is missing or has no method parameter")
    for name in ("_check_inputs", "_flat_to_shape", "Perturb", "_PerturbFunc"):
        if not hasattr(misc, name):
            found.append(f"torchdiffeq._impl.misc.{name} is missing")
    if "callback_accept_step" not in getattr(misc, "_all_callback_names", ()):
        found.append("func.callback_accept_step is not a torchdiffeq callback (added in torchdiffeq 0.2.4)")
    for attr in ("_interp_fit", "_adaptive_step", "_before_integrate"):
        if not hasattr(RKAdaptiveStepsizeODESolver, attr):
            found.append(f"RKAdaptiveStepsizeODESolver.{attr} is missing")
    if not {"alpha", "beta", "c_sol"} <= set(getattr(getattr(SOLVERS.get("dopri5"), "tableau", None), "_fields", ())):
        found.append("the dopri5 solver's tableau has no alpha, beta, c_sol")
    for attr in ("_linear_interp", "_cubic_hermite_interp", "_step_func", "integrate"):
        if not hasattr(_fixed_grid.FixedGridODESolver, attr):
            found.append(f"FixedGridODESolver.{attr} is missing")
    for cls in _FIXED_GRID:
        if SOLVERS.get(cls.__name__.lower(), cls) is not cls:
            found.append(f"torchdiffeq's solver name {cls.__name__.lower()!r} no longer means {cls.__name__}")
    return found


def _parameter_names(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)
