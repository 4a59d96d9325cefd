"""One torchdyn solve as the core's ``HostSolver``: torchdyn's own forward solve, recorded, and its replay."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core import ButcherTableau, HostSolver, StageCall, Trajectory
from ..core.budget import MemoryBudget
from ..core.checkpointing import Restart
from ..core.recording import StageKeeper
from ._internals import _problems, _tableau_of
from .coefficients import _rounded_coefficients
from .outputs import _adaptive_outputs, _augment, _fixed_outputs, _Slots, _user_solution, _with_accumulator
from .recording import _check_states, _stage_times, _TorchdynStepRecorder, _TorchdynSteps


class _TorchdynHost(HostSolver):
    """One torchdyn solve (``ODEProblem`` + ``x`` + ``t_span``) as the core's
    :class:`~symadj_plugins.core.adjoint.HostSolver`.

    Core coordinates: the state is ``x`` itself, or with an ``integral_loss`` the flat vector ``[x.flatten(), q]``
    whose last entry accumulates the loss. Time is torchdyn's normalised, increasing ``t_span`` (``t_core``, with
    one more slot for the final state under an adaptive solver with an integral loss); which output slots torchdyn
    and the core return is :mod:`.outputs`' job (``self.slots``). ``x`` and ``t_span`` given to ``__init__`` fix
    these coordinates (shape, time direction); :meth:`solve` solves the ``y0`` and ``t`` it is given, mapped back
    to torchdyn's ``x`` and ``t_span``.
    """

    params_inferred = True  # the vector field's (and integral loss's) parameters(): torchdyn has no way to list others

    def __init__(self, problem: Any, x: torch.Tensor, t_span: torch.Tensor, save_at: Any, args: Any,
                 interpolator: Any, memory_budget: MemoryBudget, params: Sequence[torch.Tensor] = ()):
        self.problem = problem
        self.params = tuple(params)
        self.solver = problem.solver
        self.adaptive = self.solver.stepping_class == "adaptive"
        self.interpolator = interpolator  # the one torchdyn's _adaptive_odeint uses (None if it uses none)
        self.integral_loss = problem.integral_loss
        if self.integral_loss is not None:  # the accumulator's stored values are placeholders: not replay-checked
            self.checked_entries = slice(0, -1)
            # The forward pass's graphs of f are graphs of x alone, not of the state with the accumulator.
            memory_budget = memory_budget.without_graphs()
        self.memory_budget = memory_budget
        self.t_span, self.save_at, self.args = t_span, save_at, args
        self.x_shape, self.state_dtype = x.shape, x.dtype
        self.reversed = bool(t_span[1] < t_span[0])
        t_norm = (-t_span if self.reversed else t_span).detach().to(x.device)
        if self.integral_loss is not None and self.adaptive:
            t_norm = torch.cat([t_norm, t_norm[-1:]])  # one extra slot: the final state, for the accumulator
        self.t_core = t_norm
        self.module_state = _module_state(problem.vf)
        self.tableau: ButcherTableau | None = None
        self.f: Callable | None = None
        self.t_eval: torch.Tensor | None = None
        self.slots = _Slots(user=[])
        self.time_shape = torch.Size()

    # -- forward ----------------------------------------------------------------------------------------
    def solve(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Trajectory]:
        # torchdyn's x and t_span from the core's coordinates (negation undoes negation exactly).
        x = y0 if self.integral_loss is None else y0[:-1].view(self.x_shape)
        t_span = t[:len(self.t_span)].to(self.t_span.device)
        t_span = -t_span if self.reversed else t_span
        recorder, solution = self._record(x, t_span)
        steps = recorder.steps
        states, carried, extra, snapshots = recorder.keeper.kept_states()
        _check_states(x, [state for state in states if state is not None])
        stage_times, stage_dtypes, self.time_shape = _stage_times(steps, self.tableau.num_stages,
                                                                  type(self.solver).__name__)
        # Each step's (t, t + dt, dt) as torchdyn computed them (their dtypes can differ from step to step).
        step_times = [(step.t, step.t + step.dt, step.dt) for step in steps]
        t0, t1, dt = (torch.stack([times[i].reshape(()) for times in step_times]) for i in range(3))

        if self.adaptive:
            points = t[1:len(self.t_span)].tolist()
            outputs_in_step, self.slots = _adaptive_outputs(solution, states, t1, points, self.interpolator is not None)
        else:
            outputs_in_step, self.slots = _fixed_outputs(self.t_eval, solution, steps, states)
        if self.integral_loss is not None:
            solution, states = _augment(solution, states, outputs_in_step, self.slots, self.adaptive)
            carried = [None if k is None else _with_accumulator(k) for k in carried]
        self.returned_slots = self.slots.returned

        rounded = _rounded_coefficients(self.solver, self.tableau.num_stages, steps, x)
        host_data = _TorchdynSteps(stage_times, stage_dtypes, step_times, rounded)
        stage_inputs, stage_graphs, stage_rng = recorder.keeper.results()
        if stage_inputs is not None and self.integral_loss is not None:
            stage_inputs = [None if inputs is None else [_with_accumulator(v) for v in inputs]
                            for inputs in stage_inputs]
        trajectory = Trajectory(states, t0, t1, dt, carried, outputs_in_step, host_data, stage_inputs=stage_inputs,
                                stage_graphs=stage_graphs, stage_rng=stage_rng, restart_extra=extra,
                                snapshots=snapshots, rebuild_step_graphs=recorder.keeper.rebuilds_step_graphs)
        return solution, trajectory

    def _record(self, x: torch.Tensor, t_span: torch.Tensor) -> tuple[_TorchdynStepRecorder, torch.Tensor]:
        """torchdyn's own solve from ``x`` over ``t_span``, recorded: returns the recorder and torchdyn's ``sol``;
        sets ``f``, ``t_eval``, ``solver`` and ``tableau``."""
        problem = self.problem
        # An adaptive step restarts from its state and the k1 torchdyn passed it (first same as last).
        keeper = StageKeeper(self.memory_budget, x, _tableau_of(self.solver).num_stages, self.params,
                             restart_states=2 if self.adaptive else 1)
        with _TorchdynStepRecorder(self.solver, keeper) as recorder:
            self.t_eval, sol = _problems.odeint(recorder.watched_field(problem.vf), x, t_span, recorder.solver,
                                                problem.atol, problem.rtol, interpolator=problem.interpolator,
                                                save_at=self.save_at, args=self.args)
        recorder.finish()
        self.solver = recorder.solver  # this solve's copy, with the tableau torchdyn synchronised to x
        self.f = recorder.f
        self.tableau = _tableau_of(self.solver)
        return recorder, sol

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.problem.vf, self.integral_loss) if isinstance(m, torch.nn.Module)]

    def step_coefficients(self, trajectory: Trajectory, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h·A, h·b)`` of step ``n`` exactly as torchdyn's step used them (see :mod:`.coefficients`), in the
        state dtype."""
        rounded = trajectory.host_data.rounded_coefficients.get(n)
        if rounded is not None:
            return rounded
        return super().step_coefficients(trajectory, n)

    def user_solution(self, output: torch.Tensor) -> torch.Tensor:
        """torchdyn's ``sol`` from the rows the core returned (differentiably)."""
        return _user_solution(output, self.slots, self.integral_loss is not None, self.x_shape)

    # -- backward -----------------------------------------------------------------------------------------
    def stage_calls(self, trajectory: Trajectory, n: int) -> list[StageCall | None]:
        times, dtypes = trajectory.host_data.stage_times[n], trajectory.host_data.stage_dtypes[n]
        calls: list[StageCall | None] = [StageCall(times[i].reshape(self.time_shape).to(dtype))
                                         for i, dtype in enumerate(dtypes)]
        if n - 1 in trajectory.host_data.rounded_coefficients:  # k1 carried in from a step that rounded (recording)
            calls[0] = None
        return calls

    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        with self._module_state_restored():
            if self.integral_loss is None:
                return self.f(t, y)
            x = y[:-1].view(self.x_shape)
            dx = self.f(t, x)
            # torchdyn's f_ = -f(-t, x) for reversed time; the accumulator follows the same rule, like a state
            # column the vector field returns (DEFunc's integral loss under 'autograd').
            dq = self.integral_loss(-t if self.reversed else t, x).sum().reshape(1).to(dx.dtype)
            return torch.cat([dx.reshape(-1), -dq if self.reversed else dq])

    @contextlib.contextmanager
    def _module_state_restored(self) -> Iterator[None]:
        """Runs the block with the module attributes the forward solve saw (see :func:`_module_state`)."""
        current = [getattr(module, name) for module, name, _ in self.module_state]
        for module, name, value in self.module_state:
            setattr(module, name, value)
        try:
            yield
        finally:
            for (module, name, _), value in zip(self.module_state, current):
                setattr(module, name, value)

    def advance(self, trajectory: Trajectory, n: int, restart: Restart,
                replaying: Callable[[int, int], contextlib.AbstractContextManager]) -> Restart:
        """Step ``n`` again with torchdyn's own ``solver.step`` at the recorded ``t`` and ``dt``, from the state and the
        ``k1`` torchdyn passed it: ``x_{n+1}`` equal to the forward pass's bit for bit (the accumulator of an integral
        loss is a placeholder, see :func:`.outputs._augment`)."""
        k1 = restart.extra
        stage = itertools.count(0 if k1 is None else 1)

        def f(t_, x_):
            with replaying(n, next(stage)), self._module_state_restored():
                return self.f(t_, x_)

        x = restart.state if self.integral_loss is None else restart.state[:-1].view(self.x_shape)
        t, _, dt = trajectory.host_data.step_times[n]
        k1_next, x_new, *_ = self.solver.step(f, x, t, dt, k1=k1, args=self.args)
        carried = k1_next if n in trajectory.host_data.rounded_coefficients else None
        if self.integral_loss is not None:
            x_new, carried = _with_accumulator(x_new), None if carried is None else _with_accumulator(carried)
        return Restart(x_new, carried=carried, extra=k1_next if self.adaptive else None)

    def dense_output(self, trajectory: Trajectory, n: int, y0: torch.Tensor, y1: torch.Tensor,
                     k: Sequence[torch.Tensor], t_out: torch.Tensor) -> torch.Tensor:
        interpolator = self.interpolator
        if interpolator is None:  # every output is a step end
            return y1.expand(len(t_out), *y1.shape)
        t0, t1, dt = trajectory.host_data.step_times[n]
        # _adaptive_odeint's interpolation, through torchdyn's own fit/evaluate; linear in (y0, y1, k). Fitted once;
        # evaluated at a column of times (torchdyn's evaluate broadcasts), so the values come out stacked.
        x_mid = y0 + dt * sum([interpolator.bmid[i] * k[i] for i in range(len(k))])
        coefs = interpolator.fit(dt, k[0], k[-1], y0, y1, x_mid)
        times = t_out.reshape(-1, *[1] * y0.dim())
        value = interpolator.evaluate(coefs, t0, t1, times)
        return torch.where(t1 == times, y1, value)  # a t_span point at the step end is the state itself


def _module_state(vf: Any) -> tuple[tuple[Any, str, Any], ...]:
    """``(module, attribute, value)`` of the attributes ``NeuralODE._prep_integration`` sets before each solve
    (``noise`` of a trace estimator, ``_control``), snapshotted now and put back around each replayed call."""
    if not isinstance(vf, torch.nn.Module):
        return ()
    state = []
    for module in vf.modules():
        if hasattr(module, "trace_estimator") and hasattr(module, "noise"):
            state.append((module, "noise", module.noise))
        if hasattr(module, "_control"):
            state.append((module, "_control", module._control))
    return tuple(state)
