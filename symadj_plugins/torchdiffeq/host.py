"""``_TorchdiffeqHost``: one torchdiffeq solve as the core's ``HostSolver``. The forward pass runs torchdiffeq's own
solver with the step recorder as its ``func``, then turns what was recorded into the core's ``Trajectory``; the
backward pass tells the core where and how torchdiffeq evaluated each stage and how it interpolates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchdiffeq

from ..core import HostSolver, StageCall, Trajectory
from ..core.budget import MemoryBudget
from ..core.recording import StageKeeper
from ._internals import (
    SOLVERS,
    Perturb,
    RKAdaptiveStepsizeODESolver,
    _adaptive_tableau,
    _interp_evaluate,
    perturb_base,
    perturbed_time,
)
from .events import _event_rate, _record_fixed_grid_event_steps
from .fixed_grid import _FIXED_GRID, FixedGridRule, fixed_grid_perturb_flags, fixed_grid_stage_times
from .recording import (
    _START_CARRIED,
    _START_FSAL,
    _START_INITIAL,
    _START_JUMP,
    _TorchdiffeqStepRecorder,
    _TorchdiffeqSteps,
)

__all__ = ["_TorchdiffeqHost"]

# How an adaptive step's first stage was evaluated in the forward pass (None: carried, not evaluated again).
_FIRST_STAGE_PERTURB = {_START_INITIAL: Perturb.NONE, _START_FSAL: Perturb.PREV, _START_JUMP: Perturb.NEXT}


class _TorchdiffeqHost(HostSolver):
    """One torchdiffeq solve, as the core's :class:`~symadj_plugins.core.adjoint.HostSolver`."""

    def __init__(self, func: Callable, method: str | type, rtol, atol, options: dict,
                 memory_budget: MemoryBudget | None = None, params: Sequence[torch.Tensor] = (),
                 rule: FixedGridRule | None = None, user_func: Callable | None = None,
                 event_fn: Callable | None = None):
        self.func = func  # torchdiffeq's normalised func (_PerturbFunc around reversal/tuple wrappers)
        self._perturb_base = perturb_base(func)  # what _PerturbFunc calls (the replay calls it directly)
        self.user_func = user_func  # the caller's func, whose module buffers the replay guards
        # What the forward pass keeps for the backward pass (core.budget).
        self.memory_budget = memory_budget or MemoryBudget.parse("min")
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
        self._set_solver_class(method, rule)
        self.rtol, self.atol, self.options = rtol, atol, options
        self.solver: Any = None

    def _set_solver_class(self, method: str | type, rule: FixedGridRule | None) -> None:
        """``solver_cls``, ``method`` (its name), ``adaptive``, ``tableau`` and ``fixed_rule``."""
        # A name in torchdiffeq's SOLVERS, or a solver class (a fixed-grid one torchdiffeq lacks comes with its rule).
        self.solver_cls = SOLVERS[method] if isinstance(method, str) else method
        self.method = method if isinstance(method, str) else self.solver_cls.__name__
        self.adaptive = issubclass(self.solver_cls, RKAdaptiveStepsizeODESolver)
        if self.adaptive:
            self.tableau = _adaptive_tableau(self.solver_cls)
            self.fixed_rule = None
            return
        self.fixed_rule = rule if rule is not None else _FIXED_GRID.get(self.solver_cls)
        if self.fixed_rule is None:
            raise TypeError(f"{self.method} is not a fixed-grid solver the symplectic adjoint knows; pass its "
                            "FixedGridRule as rule=")
        self.tableau = self.fixed_rule.tableau

    # -- forward ----------------------------------------------------------------------------------------
    def solve(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Trajectory]:
        # A last stage evaluated at (t_{n+1}⁻, y_{n+1}) can be re-evaluated; any other must be stored.
        carried_last_stage = self.adaptive and not self.tableau.fsal
        keeper = StageKeeper(self.memory_budget, y0, self.tableau.num_stages, self.params)
        recorder = _TorchdiffeqStepRecorder(self.func, self.adaptive, carried_last_stage, keeper)
        solver = self.solver_cls(func=recorder, y0=y0, rtol=self.rtol, atol=self.atol, **self.options)
        recorder.solver = solver
        solution, fixed_event_end = self._integrate(solver, recorder, t)
        if self.time_shift is not None and self.num_steps:
            self.event_rate = _event_rate(self.func, solver, self.adaptive, self.event_t, fixed_event_end)
        final_t1, final_y = self._end_of_solve(solver, solution, t, fixed_event_end)

        time_dtype = recorder.t0[0].dtype if recorder.t0 else t.dtype
        t0, t1, dt = self._step_times(recorder, final_t1, time_dtype, y0.device)
        states = [*recorder.states, final_y] if recorder.states else [y0]
        outputs_in_step = self._outputs_in_step(t1, t, time_dtype)

        recorder.finish()
        stage_inputs, stage_graphs, stage_rng = keeper.results()
        self._check_stages(keeper, len(states) - 1)
        host_data = _TorchdiffeqSteps(recorder.starts, self._stage_times(t0, t1, dt, y0))
        trajectory = Trajectory(states, t0, t1, dt, recorder.carried, outputs_in_step, host_data,
                                stage_inputs=stage_inputs, stage_graphs=stage_graphs, stage_rng=stage_rng)
        return solution, trajectory

    def _integrate(self, solver: Any, recorder: _TorchdiffeqStepRecorder, t: torch.Tensor) -> tuple[torch.Tensor, list]:
        """torchdiffeq's own solve, recorded. Returns its solution and, for a fixed-grid event solve, the last step's
        ``[t0, t1, y0, y1, f0]`` (see :func:`~.events._record_fixed_grid_event_steps`), else ``[]``. Sets
        ``num_steps`` and, in event mode, ``event_t``."""
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
        return solution, fixed_event_end

    def _end_of_solve(self, solver: Any, solution: torch.Tensor, t: torch.Tensor,
                      fixed_event_end: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, y)`` at the end of the last accepted step. Keeps ``solver`` as ``self.solver`` (its tableau copy,
        interpolation methods) but drops what it holds of this solve: the trajectory is then the only owner of the
        states, so autograd frees them after backward."""
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
        solver.func = self.func  # not the recorder, whose lists hold the states
        self.solver = solver
        return final_t1, final_y

    @staticmethod
    def _step_times(recorder: _TorchdiffeqStepRecorder, final_t1: torch.Tensor, time_dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t0, t1, dt)``, each ``(N,)`` in ``time_dtype``, of the ``N`` accepted steps."""
        if not recorder.t0:
            empty = torch.zeros(0, dtype=time_dtype, device=device)
            return empty, empty, empty
        t0 = torch.stack(recorder.t0)
        t1 = torch.cat([t0[1:], final_t1.reshape(1).to(time_dtype)])
        dt = torch.stack([d.to(time_dtype) for d in recorder.dt])
        return t0, t1, dt

    def _outputs_in_step(self, t1: torch.Tensor, t: torch.Tensor, time_dtype: torch.dtype) -> dict[int, list[int]]:
        """Which outputs (indices into ``t``, or the event state ``1``) each accepted step produces."""
        outputs_in_step: dict[int, list[int]] = {}
        if self.event_fn is not None:
            # The state at the event: dense output inside the last step, at the constant time event_t
            # (found under no_grad). No step at all when event_fn(t0, y0) == 0; the caller handles that.
            if self.num_steps:
                outputs_in_step[self.num_steps - 1] = [1]
            return outputs_in_step
        # Output k >= 1 is produced in the first accepted step that ends at or after t[k] (both the
        # adaptive `while next_t > t1` loop and the fixed-grid `while t1 >= t[j]` loop do this).
        step_of_output = torch.searchsorted(t1.cpu(), t[1:].detach().cpu().to(time_dtype), side="left").tolist()
        for k, n in enumerate(step_of_output, start=1):
            outputs_in_step.setdefault(n, []).append(k)
        return outputs_in_step

    def _check_stages(self, keeper: StageKeeper, num_steps: int) -> None:
        """Every accepted step evaluated the tableau's stages; random draws only inside the replayed steps."""
        s = self.tableau.num_stages
        if len(keeper.stage_rng) != num_steps or any(len(r) != s for r in keeper.stage_rng):
            raise RuntimeError(f"torchdiffeq's {self.method} evaluated a different number of stages than its tableau "
                               f"has ({s}); please report this with your torchdiffeq version")
        if keeper.drew_random_numbers and not self.adaptive and self.solver.interp == "cubic":
            raise ValueError(
                "the vector field draws random numbers, and interp='cubic' evaluates it once more per output, outside "
                "the steps the symplectic adjoint replays with the forward pass's random numbers; use interp='linear' "
                "(torchdiffeq's default) or a deterministic field.")

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
            times = fixed_grid_stage_times(self.fixed_rule, t0, t1, dt)
        return torch.stack(times, dim=-1) if len(t0) else torch.zeros(0, self.tableau.num_stages)

    # -- backward -----------------------------------------------------------------------------------------
    def stage_calls(self, trajectory: Trajectory, n: int) -> list[StageCall | None]:
        times = trajectory.host_data.stage_times[n]
        if not self.adaptive:
            flags = fixed_grid_perturb_flags(self.fixed_rule, bool(self.solver.perturb))
            return [StageCall(times[i], (("perturb", flag),)) for i, flag in enumerate(flags)]
        start = trajectory.host_data.starts[n]
        calls: list[StageCall | None] = [
            None if start == _START_CARRIED else StageCall(times[0], (("perturb", _FIRST_STAGE_PERTURB.get(start)),))]
        for i, c in enumerate(self.tableau.c[1:], start=1):
            calls.append(StageCall(times[i], (("perturb", Perturb.PREV if c == 1.0 else Perturb.NONE),)))
        return calls

    def _shifted(self, t: torch.Tensor) -> torch.Tensor:
        # t + 0 is t bit for bit: the shift only carries the derivative w.r.t. t_0.
        return t if self.time_shift is None else t + self.time_shift.to(t.dtype)

    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        if self.time_shift is None and self._perturb_base is not None:
            # What _PerturbFunc would do, without its per-call overhead (see perturb_base).
            return self._perturb_base(perturbed_time(t, y, dict(kwargs).get("perturb", Perturb.NONE)), y)
        # Event mode: the time shift carries ∂L/∂t_0 through torchdiffeq's own perturbation.
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
