"""``_TorchdiffeqHost``: one torchdiffeq solve as the core's ``HostSolver``. The forward pass runs torchdiffeq's own
solver with the step recorder as its ``func``, then turns what was recorded into the core's ``Trajectory``; the
backward pass tells the core where and how torchdiffeq evaluated each stage and how it interpolates. Event mode
is a subclass that only :mod:`.events` knows (``_TorchdiffeqEventHost``); the methods it overrides say so."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchdiffeq

from ..core import HostSolver, StageCall, Trajectory
from ..core.budget import MemoryBudget
from ..core.checkpointing import Restart
from ..core.recording import StageKeeper
from ._internals import (
    SOLVERS,
    Perturb,
    RKAdaptiveStepsizeODESolver,
    _adaptive_tableau,
    _runge_kutta_step,
    perturb_base,
    perturbed_time,
)
from .dense_output import cubic_hermite_interp, interp_evaluate, linear_interp
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
                 rule: FixedGridRule | None = None, user_func: Callable | None = None, params_inferred: bool = False):
        self.params_inferred = params_inferred  # see HostSolver
        self.func = func  # torchdiffeq's normalised func (_PerturbFunc around reversal/tuple wrappers)
        self._perturb_base = perturb_base(func)  # what _PerturbFunc calls (the replay calls it directly)
        self.user_func = user_func  # the caller's func, whose module buffers the replay guards
        # What the forward pass keeps for the backward pass (core.budget).
        self.memory_budget = memory_budget or MemoryBudget.parse("trajectory")
        self.params = tuple(params)  # differentiated: alive anyway, so not counted as graph bytes
        self.num_steps = 0  # set by solve
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
        # A step restarts from its state, and from the stage it carries in where its first stage is carried.
        keeper = StageKeeper(self.memory_budget, y0, self.tableau.num_stages, self.params,
                             restart_states=2 if carried_last_stage else 1)
        recorder = _TorchdiffeqStepRecorder(self.func, self.adaptive, carried_last_stage, keeper)
        solver = self.solver_cls(func=recorder, y0=y0, rtol=self.rtol, atol=self.atol, **self.options)
        recorder.solver = solver
        solution = self._integrate(solver, recorder, t)
        final_t1, final_y = self._end_of_solve(solver, solution, t)

        time_dtype = recorder.t0[0].dtype if recorder.t0 else t.dtype
        t0, t1, dt = self._step_times(recorder, final_t1, time_dtype, y0.device)
        outputs_in_step = self._outputs_in_step(t1, t, time_dtype)

        recorder.finish()
        keeper.add_state(final_y if recorder.t0 else y0, final=True)
        states, carried, _, snapshots = keeper.kept_states()
        stage_inputs, stage_graphs, stage_rng = keeper.results()
        self._check_stages(keeper, len(states) - 1)
        host_data = _TorchdiffeqSteps(recorder.starts, self._stage_times(t0, t1, dt, y0))
        trajectory = Trajectory(states, t0, t1, dt, carried, outputs_in_step, host_data, stage_inputs=stage_inputs,
                                stage_graphs=stage_graphs, stage_rng=stage_rng, snapshots=snapshots,
                                rebuild_step_graphs=keeper.rebuilds_step_graphs)
        return solution, trajectory

    def _integrate(self, solver: Any, recorder: _TorchdiffeqStepRecorder, t: torch.Tensor) -> torch.Tensor:
        """torchdiffeq's own solve, recorded (the event host overrides it). Returns its solution; sets
        ``num_steps``."""
        solution = solver.integrate(t)
        if len(t) > 1 and not recorder.t0:
            raise RuntimeError(f"torchdiffeq {torchdiffeq.__version__} did not report its steps through "
                               "func.callback_step / callback_accept_step (added in torchdiffeq 0.2.4); "
                               "symadj-plugins needs torchdiffeq>=0.2.4")
        self.num_steps = len(recorder.t0)
        return solution

    def _end_of_solve(self, solver: Any, solution: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, y)`` at the end of the last accepted step. Keeps ``solver`` as ``self.solver`` (its tableau copy,
        interpolation methods) but drops what it holds of this solve: the trajectory is then the only owner of the
        states, so autograd frees them after backward."""
        final_t1, final_y = self._last_step_end(solver, solution, t)
        if self.adaptive:
            solver.rk_state = None  # drop the solver's own copies of the last step
        solver.func = self.func  # not the recorder, whose lists hold the states
        self.solver = solver
        return final_t1, final_y

    def _last_step_end(self, solver: Any, solution: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, y)`` at the end of the last accepted step, read before ``_end_of_solve`` drops the solver's state
        (the event host overrides it)."""
        if self.adaptive:
            return solver.rk_state.t1, solver.rk_state.y1
        # torchdiffeq's grid ends exactly at t[-1]. A copy, not a view of the solution: the caller may write into
        # the solution before backward(), as with backprop.
        return t[-1], solution[-1].clone()

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
        """Which outputs (indices into ``t``) each accepted step produces (the event host overrides it)."""
        outputs_in_step: dict[int, list[int]] = {}
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
        times = trajectory.host_data.stage_times[n].unbind(0)  # one op, not one per stage
        if not self.adaptive:
            flags = fixed_grid_perturb_flags(self.fixed_rule, bool(self.solver.perturb))
            return [StageCall(times[i], (("perturb", flag),)) for i, flag in enumerate(flags)]
        start = trajectory.host_data.starts[n]
        calls: list[StageCall | None] = [
            None if start == _START_CARRIED else StageCall(times[0], (("perturb", _FIRST_STAGE_PERTURB.get(start)),))]
        for i, c in enumerate(self.tableau.c[1:], start=1):
            calls.append(StageCall(times[i], (("perturb", Perturb.PREV if c == 1.0 else Perturb.NONE),)))
        return calls

    def advance(self, trajectory: Trajectory, n: int, restart: Restart,
                replaying: Callable[[int, int], contextlib.AbstractContextManager]) -> Restart:
        """Step ``n`` again with torchdiffeq's own step (``_runge_kutta_step``, or the fixed-grid solver's
        ``_step_func``), at the recorded ``t0``, ``dt``, ``t1`` and with the same perturbation flags: ``y_{n+1}`` equal
        to the forward pass's bit for bit."""
        stage = itertools.count(1 if self.adaptive else 0)

        def func(t, y, perturb=Perturb.NONE):
            with replaying(n, next(stage)):
                return self.func(t, y, perturb=perturb)

        t0, t1, dt, y0 = trajectory.t0[n], trajectory.t1[n], trajectory.dt[n], restart.state
        if not self.adaptive:
            dy, _ = self.solver._step_func(func, t0, self._fixed_step_size(dt), t1, y0)
            return Restart(y0 + dy)
        f0 = restart.carried
        if f0 is None:  # evaluated at the start of the step, as the forward pass did (its time and flag)
            first = self.stage_calls(trajectory, n)[0]
            with replaying(n, 0):
                f0 = self.func(first.t, y0, **dict(first.kwargs))
        y1, f1, _, _ = _runge_kutta_step(func, y0, f0, t0, dt, t1, tableau=self.solver.tableau)
        carries = n + 1 < trajectory.num_steps and trajectory.host_data.starts[n + 1] == _START_CARRIED
        return Restart(y1, carried=f1 if carries else None)

    def _fixed_step_size(self, dt: torch.Tensor):
        """The step size a fixed-grid step was taken with: ``integrate`` passes the grid difference (``dt``); the event
        host overrides it (``integrate_until_event`` passes the step size as given, a Python float)."""
        return dt

    def _shifted(self, t: torch.Tensor) -> torch.Tensor:
        """The time at which the replay evaluates ``func`` for the forward pass's time ``t`` (the event host adds its
        time shift)."""
        return t

    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        if self._perturb_base is not None:
            # What _PerturbFunc would do, without its per-call overhead (see perturb_base).
            return self._perturb_base(perturbed_time(t, y, dict(kwargs).get("perturb", Perturb.NONE)), y)
        return self.func(t, y, **dict(kwargs))

    def dense_output(self, trajectory: Trajectory, n: int, y0: torch.Tensor, y1: torch.Tensor,
                     k: Sequence[torch.Tensor], t_out: torch.Tensor) -> torch.Tensor:
        t0, t1, dt = trajectory.t0[n], trajectory.t1[n], trajectory.dt[n]
        times = t_out.reshape(-1, *[1] * y0.dim())  # a column of times: the values come out stacked
        if self.adaptive:
            coeffs = self.solver._interp_fit(y0, y1, torch.stack(list(k), dim=-1), dt)  # fitted once for all times
            return interp_evaluate(coeffs, t0, t1, times.to(t0.dtype))
        if self.solver.interp == "linear":
            return linear_interp(t0, t1, y0, y1, times)
        if self.solver.interp == "cubic":
            f1 = self.func(self._shifted(t1), y1)  # torchdiffeq evaluates it per output; once serves them all
            return cubic_hermite_interp(t0, y0, k[0], t1, y1, f1, times)
        raise ValueError(f"Unknown interpolation method {self.solver.interp!r}; torchdiffeq supports "
                         "'linear' and 'cubic'")
