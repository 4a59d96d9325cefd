"""torchdyn adapter: ``sensitivity="symplectic_adjoint"`` in torchdyn's ``NeuralODE`` and ``ODEProblem``.

After ``symadj_plugins.register()``::

    model = torchdyn.core.NeuralODE(f, sensitivity="symplectic_adjoint", solver="dopri5")
    t_eval, sol = model(x, t_span)          # torchdyn's own forward pass, bit for bit
    loss(sol).backward()                    # exact gradient, one stored state per accepted step

The forward pass *is* torchdyn's: ``torchdyn.numerics.odeint`` is called exactly as the ``'autograd'`` branch of
``ODEProblem.odeint`` calls it (its solver objects and tableaux, ``init_step``, ``adapt_step``, ``hairer_norm``,
its handling of ``t_span``, ``save_at`` and ``interpolator``), so ``(t_eval, sol)`` are identical (``torch.equal``)
to ``sensitivity="autograd"``. It runs on a shallow copy of the problem's solver whose ``step`` is shadowed by a
recorder (nothing shared is patched per call, so one model can solve in several threads) that forwards every
call and notes, for each accepted step, ``(t, dt, x)`` and the time at which each stage's
``f`` call really happened. The core's reverse sweep (``symadj_plugins.core``) then replays those steps.

What is exact: gradients w.r.t. ``x`` and the vector field's parameters (``vf.parameters()``, which includes
``optimizable_params`` as torchdyn registers them, and an ``integral_loss`` module's parameters) equal
backpropagation through the same accepted steps with the step sizes held constant, up to rounding. Fixed-step
solvers: that *is* ``sensitivity="autograd"``. Adaptive ones: torchdyn's autograd also differentiates the first
step size chosen by ``init_step`` (and the clipped steps that inherit it); we do not (the paper's convention).
"The same steps" includes torchdyn's rounding: with a float64 state its ``adapt_step`` returns a float32 ``dt``
and ``dopri5``/``tsit5`` then form some ``dt * a_ij`` in float32; those steps' coefficients are read off
torchdyn's own ``step`` and handed to the core (:meth:`_TorchdynHost.step_coefficients`).

Supported: torchdyn's explicit Runge–Kutta solvers ``euler``, ``midpoint``, ``rk4``, ``dopri5``, ``tsit5`` (by
name or as instances of exactly those classes); ``atol``/``rtol``; ``interpolator`` ``None`` or ``'4th'``;
``save_at``; ``args``; reversed ``t_span``; ``order`` (torchdyn's ``DEFunc`` turns an order-``k`` system into a
first-order one, which is what the solver sees); ``integral_loss`` (torchdyn's adjoint convention: the state is
not augmented, and backward adds the exact gradient of ``Σ ∫ integral_loss(t, x) dt``, the quadrature that the
solver's own stages define, i.e. what ``'autograd'`` computes on a state augmented with the accumulator).
Rejected with a ``ValueError``: other solvers (``alf``, ``ieuler``, hypersolvers, multiple shooting), other
interpolators, dict states, gradients w.r.t. ``t_span``, a ``t_span`` that is not strictly monotonic.

Private torchdyn names (and behaviours) this module depends on; ``_check_torchdyn()`` verifies them at
``register()`` (:func:`install`) and raises naming the installed version if they differ; tests/test_torchdyn*.py
cover each:

- ``torchdyn.core.problems.ODEProblem._autograd_func``: the sensitivity dispatch we wrap (the only hook).
  ``ODEProblem.odeint`` calls ``self._autograd_func()(self.vf_params, x, t_span, save_at, args)`` for every
  ``sensalg`` but ``'autograd'``. ``MultipleShootingProblem._autograd_func`` is wrapped only to reject us clearly.
- ``ODEProblem`` attributes ``sensalg``, ``vf``, ``solver``, ``atol``, ``rtol``, ``interpolator``, ``integral_loss``.
- ``torchdyn.core.problems.odeint``: the forward solve (the name ``ODEProblem.odeint`` itself uses).
- ``torchdyn.numerics.solvers.ode``: ``Euler``, ``Midpoint``, ``RungeKutta4``, ``DormandPrince45``, ``Tsitouras45``:
  ``step(f, x, t, dt, k1=None, args=None)`` returning the new state second, calling ``f(t, x)`` once per stage in
  stage order; ``.tableau = (c, a, b_sol, b_err)`` (synchronised to ``x`` by ``sync_device_dtype``) with stage
  ``i >= 2`` evaluated at ``t + c[i - 2] * dt``: for ``RungeKutta4`` that is ``(t, t, t + dt/2, t + dt/2)``, not the
  textbook ``(t, t + dt/2, t + dt/2, t + dt)`` (the replay uses the times recorded from the ``f`` calls, so it
  follows the step, not ``c``); ``Euler`` and ``Midpoint`` coefficients are hard-coded in their ``step`` and
  written here; ``.stepping_class``; ``SOLVER_DICT`` names.
- ``torchdyn.numerics.utils.adapt_step`` (behaviour): returns ``dt`` in the dtype of the solver's float32
  ``safety``/``min_factor``/``max_factor`` when ``dt`` is 0-dim; see ``_rounded_coefficients``.
- ``torchdyn.numerics.odeint._adaptive_odeint`` (mirrored, not called): an accepted step ``[t, t + dt]`` emits
  the ``t_span`` points ``p`` with ``t + dt > p`` by interpolation (when an interpolator is in use), then ``p`` if
  ``t + dt == p`` as the new state; ``k1`` is carried from the previous step's last stage (FSAL); the interpolant
  is ``interpolator.fit(dt, k1, k_last, x, x_new, x + dt * sum(bmid[i] * k[i]))``; ``Tsitouras45`` forces
  ``interpolator = None``. ``_fixed_odeint`` (mirrored): a step end ``t`` is output iff
  ``torch.isclose(t, save_at).sum()``. ``odeint`` replaces ``f`` by ``-f(-t, x)`` for reversed time.
- ``torchdyn.numerics.interpolators``: ``FourthOrder`` (``bmid``, ``fit``, ``evaluate``, ``sync_device_dtype``),
  ``str_to_interp``, ``INTERP_DICT``.
- Module attributes that ``NeuralODE._prep_integration`` sets before each solve and the vector field reads:
  ``noise`` of modules with a ``trace_estimator`` (CNF, Hutchinson) and ``_control`` (``DataControl``). They are
  snapshotted in the forward pass and put back during the replay, so a second forward before ``backward()``
  does not change the first one's gradient.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _torchdyn_guard
from ._registry import check_internals, internals_error
from .core import ButcherTableau, HostSolver, StageCall, Trajectory, odeint_symplectic
from .core.replay import RandomnessWatch, RngState
from .core.tableaux import EULER, MIDPOINT
from .inputs import check_times, parameters_requiring_grad

try:
    from torchdyn.core import problems as _problems
    from torchdyn.numerics import interpolators as _interpolators
    from torchdyn.numerics.solvers import ode as _ode
except ImportError as exc:  # pragma: no cover - exercised only with a broken torchdyn
    raise ImportError(f"symadj_plugins.torchdyn needs torchdyn (tested with 1.0.6): {exc}") from exc

__all__ = ["SENSITIVITY", "SUPPORTED_SOLVERS", "install", "register", "supported_solvers"]

SENSITIVITY = _torchdyn_guard.SENSITIVITY  # "symplectic_adjoint"
"""The ``sensitivity`` value that selects the symplectic adjoint in torchdyn's ``ODEProblem`` / ``NeuralODE``."""

TESTED_VERSION = "1.0.6"
_TORCHDYN_SENSITIVITIES = ("autograd", "adjoint", "interpolated_adjoint")
VALID_SENSITIVITIES = (*_TORCHDYN_SENSITIVITIES, SENSITIVITY)

SUPPORTED_SOLVERS: dict[str, type] = {
    "euler": _ode.Euler,
    "midpoint": _ode.Midpoint,
    "rk4": _ode.RungeKutta4,
    "dopri5": _ode.DormandPrince45,
    "tsit5": _ode.Tsitouras45,
}
"""torchdyn's explicit Runge–Kutta solvers, by the name torchdyn accepts for them."""

# Solvers whose step hard-codes its coefficients (no ``.tableau``); the probe at install checks them.
_HARD_CODED: dict[type, ButcherTableau] = {
    _ode.Euler: EULER,          # x + dt * f(t, x)
    _ode.Midpoint: MIDPOINT,    # x + dt * f(t + 0.5 dt, x + 0.5 dt k1)
}


def supported_solvers() -> list[str]:
    """The names of :data:`SUPPORTED_SOLVERS`."""
    return list(SUPPORTED_SOLVERS)


def _internals_error(what: str) -> RuntimeError:
    return internals_error("torchdyn", TESTED_VERSION, what, _INTERNALS_ADVICE)


_INTERNALS_ADVICE = (f"sensitivity='{SENSITIVITY}' cannot guarantee exact gradients with it; use "
                     "sensitivity='autograd', or a torchdyn version it supports.")


# --------------------------------------------------------------------------------------------------------
# Tableaux: torchdyn's own, read off the solver object.

def _tableau_of(solver: Any) -> ButcherTableau:
    """The tableau ``solver.step`` uses, with ``c`` the stage times its step really uses (see module docs).

    Read from the solver's ``.tableau`` as it is *now* (after ``sync_device_dtype``), so a tableau created in
    float32 and moved to float64 replays with its float32-rounded coefficients, like torchdyn's step does.
    """
    cls = type(solver)
    if cls in _HARD_CODED:
        return _HARD_CODED[cls]
    c, a, b_sol, _ = solver.tableau
    s = len(b_sol)
    c_rows = tuple(float(v) for v in c.tolist())
    stage_times = (0.0, *c_rows[: s - 1])  # stage i >= 2 at t + c[i - 2] * dt
    return _cached_tableau(cls.__name__, stage_times, tuple(tuple(row.tolist()) for row in a), tuple(b_sol.tolist()))


@functools.lru_cache(maxsize=128)
def _cached_tableau(name: str, c: tuple, a_rows: tuple, b: tuple) -> ButcherTableau:
    return ButcherTableau.from_rows(c, a_rows, b, name=name)


# --------------------------------------------------------------------------------------------------------
# Recording torchdyn's accepted steps.

@dataclass
class _Step:
    t: torch.Tensor
    dt: torch.Tensor
    x: torch.Tensor
    k1_given: bool
    stage_times: list[torch.Tensor]
    x_new: torch.Tensor | None = None
    k1: torch.Tensor | None = None  # the k1 torchdyn passed, kept only where the replay must reuse it
    stage_rng: list[RngState | None] = field(default_factory=list)  # per stage: the generator state it drew from


@dataclass
class _TorchdynStepRecorder:
    """Runs one torchdyn solve on a private shallow copy of ``solver`` (``self.solver``, to pass to ``odeint``)
    whose ``step`` it shadows; forwards every call unchanged. The problem's own solver is never touched, so
    concurrent solves with one model do not see each other, and an error leaves nothing to restore.

    A step is accepted iff torchdyn starts its next step from the state it returned (``x = x_new`` in both
    ``_fixed_odeint`` and ``_adaptive_odeint``); the last step of a solve is always accepted.
    """

    solver: Any
    f: Callable | None = None
    steps: list[_Step] = field(default_factory=list)
    final_state: torch.Tensor | None = None
    _pending: _Step | None = None
    _real_step: Callable | None = None
    randomness: RandomnessWatch | None = None
    start_rng: RngState | None = None  # generators at the solve's start: where an adaptive first k1 drew
    drew_random_numbers: bool = False

    def __enter__(self) -> _TorchdynStepRecorder:
        # torchdyn's odeint writes the synchronised tableau onto the copy (sync_device_dtype): the replay reads it
        # there, as torchdyn's step did.
        self.solver = copy.copy(self.solver)
        self._real_step = self.solver.step
        self.solver.step = self
        return self

    def __exit__(self, *exc) -> None:
        del self.solver.step  # the copy's step is its class's again (e.g. for the coefficient probes)
        self._real_step = None

    def __call__(self, f, x, t, dt, k1=None, args=None):
        if self.f is None:
            self.f = f
        elif f is not self.f:
            raise _internals_error("odeint called solver.step with different vector fields within one solve")
        if self._pending is not None:
            if x is self._pending.x_new:
                self._accept(self._pending)
            self._pending = None

        times: list[torch.Tensor] = []
        stage_rng: list[RngState | None] = []
        inner = f
        if self.randomness is None:
            self.randomness = RandomnessWatch(x.device)

        def recording_f(t_, x_, *extra, **kwargs):
            if extra or kwargs:
                raise _internals_error(f"{type(self.solver).__name__}.step called f with extra arguments")
            times.append(t_)
            out, rng = self.randomness.call(inner, t_, x_)
            stage_rng.append(rng)
            self.drew_random_numbers |= rng is not None
            return out

        out = self._real_step(recording_f, x, t, dt, k1=k1, args=args)
        self._pending = _Step(t, dt, x, k1 is not None, times, out[1], k1, stage_rng)
        return out

    def _accept(self, step: _Step) -> None:
        # torchdyn carries k1 = f(t, Y_s) from the previous step's last stage (FSAL). The replay re-evaluates
        # f(t, x) instead, which is the same up to rounding unless the previous step rounded its coefficients
        # (then Y_s and x differ by more): only then is k1 kept, for the core to reuse (``Trajectory.carried``).
        previous = self.steps[-1] if self.steps else None
        if step.k1_given:  # k1 was the previous accepted step's last stage, or f(t_0, x_0), the solve's first call
            step.stage_rng.insert(0, previous.stage_rng[-1] if previous is not None else self.start_rng)
        if previous is None or not _rounds_coefficients(previous.dt, step.x.dtype):
            step.k1 = None
        self.final_state = step.x_new
        step.x_new = None
        self.steps.append(step)

    def finish(self) -> None:
        if self._pending is None:
            raise _internals_error("odeint returned without calling solver.step")
        self._accept(self._pending)
        self._pending = None


# --------------------------------------------------------------------------------------------------------
# One solve, as the core's HostSolver.

@dataclass
class _TorchdynSteps:
    """The torchdyn adapter's record of a solve, beside the core's :class:`Trajectory`.

    Attributes:
        stage_times: ``(N, s, *time_shape)`` times of each stage's ``f`` call, in the widest dtype among them.
        stage_dtypes: per step, per stage, the dtype torchdyn computed that time in (the replay uses it).
        step_times: per step, ``(t, t + dt, dt)`` as torchdyn computed them.
        rounded_coefficients: ``{n: (h·A, h·b)}`` for the steps whose coefficients torchdyn rounded.
    """

    stage_times: torch.Tensor
    stage_dtypes: tuple[tuple[torch.dtype, ...], ...]
    step_times: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rounded_coefficients: dict[int, tuple[torch.Tensor, torch.Tensor]]


class _TorchdynHost(HostSolver):
    """One torchdyn solve (``ODEProblem`` + ``x`` + ``t_span``) as the core's
    :class:`~symadj_plugins.core.adjoint.HostSolver`.

    Core coordinates: the state is ``x`` itself, or with an ``integral_loss`` the flat vector ``[x.flatten(), q]``
    whose last entry accumulates the loss. Output slot ``j`` has time ``t_core[j]`` (torchdyn's normalised,
    increasing ``t_span``); for fixed-step solvers slot ``j`` is the state after step ``j``, of which torchdyn
    returns the rows ``self.user_slots``; for adaptive ones the slots are exactly torchdyn's returned rows. When
    torchdyn returns only some slots, the core returns only those (``returned_slots``), so that the backward pass
    gets no cotangent of the others (one state per step more if it did).
    """

    def __init__(self, problem: Any, x: torch.Tensor, t_span: torch.Tensor, save_at: Any, args: Any,
                 interpolator: Any):
        self.problem = problem
        self.solver = problem.solver
        self.adaptive = self.solver.stepping_class == "adaptive"
        self.interpolator = interpolator  # the one torchdyn's _adaptive_odeint uses (None if it uses none)
        self.integral_loss = problem.integral_loss
        if self.integral_loss is not None:  # the accumulator's stored values are placeholders: not replay-checked
            self.checked_entries = slice(0, -1)
        self.t_span, self.save_at, self.args = t_span, save_at, args
        self.x_shape, self.state_dtype = x.shape, x.dtype
        self.reversed = bool(t_span[1] < t_span[0])
        t_norm = (-t_span if self.reversed else t_span).detach().to(x.device)
        if self.integral_loss is not None and self.adaptive:
            t_norm = torch.cat([t_norm, t_norm[-1:]])  # one extra slot: the final state, for the accumulator
        self.t_core = t_norm
        self.module_state = _module_state(problem.vf)
        self.x = x
        self.tableau: ButcherTableau | None = None
        self.f: Callable | None = None
        self.t_eval: torch.Tensor | None = None
        self.user_slots: list[int] = []  # the slots torchdyn returns, in order
        self.returned_slots: list[int] | None = None  # slots the core's Function returns (None: all)
        self.final_slot = -1
        self.time_shape = torch.Size()

    # -- forward ----------------------------------------------------------------------------------------
    def solve(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Trajectory]:
        x, self.x = self.x, None
        problem = self.problem
        with _TorchdynStepRecorder(self.solver, start_rng=RngState.capture(x.device)) as recorder:
            t_eval, sol = _problems.odeint(problem.vf, x, self.t_span, recorder.solver, problem.atol, problem.rtol,
                                           interpolator=problem.interpolator, save_at=self.save_at, args=self.args)
        recorder.finish()
        self.solver = recorder.solver  # this solve's copy, with the tableau torchdyn synchronised to x
        self.f, self.t_eval = recorder.f, t_eval
        self.tableau = _tableau_of(self.solver)
        steps, final_state = recorder.steps, recorder.final_state
        _check_states(x, [*(step.x for step in steps), final_state])

        num_stages = self.tableau.num_stages
        flat_times: list[torch.Tensor] = []
        for step in steps:
            times = [step.t, *step.stage_times] if step.k1_given else step.stage_times
            if len(times) != num_stages:
                given = "given" if step.k1_given else "not given"
                raise _internals_error(f"{type(self.solver).__name__}.step evaluated {len(step.stage_times)} stages "
                                       f"(k1 {given}); its tableau has {num_stages}")
            flat_times += times
        self.time_shape = flat_times[0].shape
        if any(ti.shape != self.time_shape for ti in flat_times):
            raise _internals_error("stage times of different shapes within one solve")
        # Stored in the widest dtype (exact), replayed in the dtype torchdyn computed each one in.
        wide = functools.reduce(torch.promote_types, {ti.dtype for ti in flat_times})
        stage_times = torch.stack([ti.to(wide) for ti in flat_times]).reshape(len(steps), num_stages)
        dtypes = [ti.dtype for ti in flat_times]
        stage_dtypes = tuple(tuple(dtypes[n * num_stages:(n + 1) * num_stages]) for n in range(len(steps)))
        # Each step's (t, t + dt, dt) as torchdyn computed them (their dtypes can differ from step to step).
        step_times = [(step.t, step.t + step.dt, step.dt) for step in steps]
        t0, t1, dt = (torch.stack([times[i].reshape(()) for times in step_times]) for i in range(3))

        if self.adaptive:
            solution, states, outputs_in_step = self._adaptive_outputs(sol, steps, final_state, t1)
        else:
            solution, states, outputs_in_step = self._fixed_outputs(t_eval, sol, steps, final_state)
        if self.returned_slots is None:  # torchdyn returns every slot (before the integral-loss slot is added)
            self.user_slots = list(range(solution.shape[0]))

        carried = [step.k1 for step in steps]
        if self.integral_loss is not None:
            solution, states = self._augment(solution, states, outputs_in_step)
            carried = [None if k is None else _with_accumulator(k) for k in carried]
        host_data = _TorchdynSteps(stage_times, stage_dtypes, step_times, self._rounded_coefficients(steps, x))
        stage_rng = [step.stage_rng for step in steps] if recorder.drew_random_numbers else None
        trajectory = Trajectory(states, t0, t1, dt, carried, outputs_in_step, host_data, stage_rng=stage_rng)
        return solution, trajectory

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.problem.vf, self.integral_loss) if isinstance(m, torch.nn.Module)]

    def _rounded_coefficients(self, steps: list[_Step], x: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
        """``{n: (h·A, h·b)}`` for the steps whose products ``dt·a_ij`` torchdyn did not compute in the state dtype.

        torchdyn's ``adapt_step`` returns a float32 ``(1,)`` ``dt`` for a float64 state (its ``safety``,
        ``min_factor`` and ``max_factor`` are float32), and ``DormandPrince45.step`` / ``Tsitouras45.step`` then
        compute ``dt * a[i][j]`` (a 0-dim coefficient) in float32. For those steps we run the solver's own ``step``
        on unit vectors (``x = 0``, ``k_j = e_j``): stage ``i``'s input *is* row ``i`` of the coefficients it used,
        and the new state is its weights. One batched call per kind of ``dt``. Other steps use ``dt·A``.
        """
        groups: dict[tuple[torch.dtype, torch.Size, bool], list[int]] = {}
        for n, step in enumerate(steps):
            if _rounds_coefficients(step.dt, x.dtype):
                groups.setdefault((step.dt.dtype, step.dt.shape, step.k1_given), []).append(n)
        rounded: dict[int, tuple[torch.Tensor, ...]] = {}
        for (_, _, k1_given), members in groups.items():
            ha, hb = self._probe_coefficients(torch.stack([steps[n].dt for n in members]), k1_given, x)
            rounded.update((n, (ha[i], hb[i])) for i, n in enumerate(members))
        return rounded

    def _probe_coefficients(self, dt: torch.Tensor, k1_given: bool, x: torch.Tensor):
        num, s = dt.shape[0], self.tableau.num_stages
        basis = torch.eye(s, dtype=x.dtype, device=x.device)
        inputs: list[torch.Tensor] = []

        def unit_stages(t_, x_):
            inputs.append(x_)
            return basis[len(inputs) - 1 + k1_given].expand(num, s)

        zeros = torch.zeros(num, s, dtype=x.dtype, device=x.device)
        k1 = basis[0].expand(num, s) if k1_given else None
        new_state = self.solver.step(unit_stages, zeros, torch.zeros_like(dt), dt, k1=k1)[1]
        rows = [zeros, *inputs] if k1_given else inputs
        if len(rows) != s:
            raise _internals_error(f"{type(self.solver).__name__}.step evaluated {len(inputs)} stages on a probe")
        return torch.stack(rows, dim=1), new_state

    def step_coefficients(self, trajectory: Trajectory, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h·A, h·b)`` of step ``n`` exactly as torchdyn's step used them (see :meth:`_rounded_coefficients`),
        in the state dtype."""
        rounded = trajectory.host_data.rounded_coefficients.get(n)
        if rounded is not None:
            return rounded
        return super().step_coefficients(trajectory, n)

    def _fixed_outputs(self, save_at, sol, steps, final_state):
        # _fixed_odeint: save the state at step end t iff torch.isclose(t, save_at).sum(); it returns save_at.
        ends = [steps[0].t, *(step.t + step.dt for step in steps)]
        rows = [n for n, end in enumerate(ends) if torch.isclose(end, save_at).sum()]
        all_states = [*(step.x for step in steps), final_state]
        if len(rows) != len(sol) or any(not torch.equal(sol[i], all_states[n]) for i, n in enumerate(rows)):
            raise _internals_error("the rows _fixed_odeint returned are not the step ends matching save_at")
        outputs_in_step = {n - 1: [n] for n in rows if n > 0}
        # The trajectory keeps every state as recorded, not views of torchdyn's solution: the caller may write into
        # the solution before backward(), as with backprop.
        if rows != list(range(len(all_states))):  # only some step ends returned: the core returns those rows
            self.user_slots = self.returned_slots = rows
        return sol, all_states, outputs_in_step

    def _adaptive_outputs(self, sol, steps, final_state, t1):
        # _adaptive_odeint, on each accepted step [t, t + dt], for the next unreached t_span point p:
        # with an interpolator, interpolate every p < t + dt; then output x_new if t + dt == p.
        points = self.t_core[1:len(self.t_span)].tolist()
        ends = t1.tolist()
        outputs_in_step: dict[int, list[int]] = {}
        endpoint_rows: list[tuple[int, int]] = []
        c = 0
        for n, end in enumerate(ends):
            if self.interpolator is not None:
                while c < len(points) and end > points[c]:
                    outputs_in_step.setdefault(n, []).append(c + 1)
                    c += 1
            if c < len(points) and end == points[c]:
                outputs_in_step.setdefault(n, []).append(c + 1)
                endpoint_rows.append((c + 1, n))
                c += 1
        states = [*(step.x for step in steps), final_state]
        if len(sol) != c + 1 or any(not torch.equal(sol[j], states[n + 1]) for j, n in endpoint_rows):
            raise _internals_error("the rows _adaptive_odeint returned do not match its accepted steps")
        return sol, states, outputs_in_step

    def _augment(self, solution, states, outputs_in_step):
        """Adds the integral-loss accumulator ``q`` as a last state entry. Its values are never read (nothing
        depends on ``q``), so they are stored as zeros; only its cotangent (one, at the final state) matters."""
        states = [_with_accumulator(v) for v in states]
        num = solution.shape[0]
        solution = torch.cat([solution.reshape(num, -1), solution.new_zeros(num, 1)], dim=1)
        last_step = len(states) - 2
        if self.adaptive:  # torchdyn's rows need not include the final state: add a slot for it
            solution = torch.cat([solution, states[-1][None]])
            self.final_slot = num
        else:  # slot N is the final state
            self.final_slot = len(states) - 1
            if self.returned_slots is not None and self.final_slot not in self.returned_slots:
                # Not among torchdyn's rows: return it too, its cotangent carries the loss.
                solution = torch.cat([solution, states[-1][None]])
                self.returned_slots = [*self.returned_slots, self.final_slot]
        slots = outputs_in_step.setdefault(last_step, [])
        if self.final_slot not in slots:
            slots.append(self.final_slot)
        return solution, states

    def user_solution(self, output: torch.Tensor) -> torch.Tensor:
        """torchdyn's ``sol`` from the rows the core returned (differentiably)."""
        slots = range(output.shape[0]) if self.returned_slots is None else self.returned_slots
        row_of = {slot: row for row, slot in enumerate(slots)}
        if self.integral_loss is not None:
            if output.requires_grad:
                final_row = row_of[self.final_slot]

                def add_integral_cotangent(grad):
                    grad = grad.clone()
                    grad[final_row, -1] += 1
                    return grad

                output.register_hook(add_integral_cotangent)
            output = output[:, :-1]
        picked = [row_of[slot] for slot in self.user_slots]
        if picked != list(range(output.shape[0])):
            output = output[picked]
        return output.reshape(len(picked), *self.x_shape)

    # -- backward -----------------------------------------------------------------------------------------
    def stage_calls(self, trajectory: Trajectory, n: int) -> list[StageCall | None]:
        times, dtypes = trajectory.host_data.stage_times[n], trajectory.host_data.stage_dtypes[n]
        calls: list[StageCall | None] = [StageCall(times[i].reshape(self.time_shape).to(dtype))
                                         for i, dtype in enumerate(dtypes)]
        if trajectory.carried[n] is not None:
            calls[0] = None
        return calls

    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        current = [getattr(module, name) for module, name, _ in self.module_state]
        for module, name, value in self.module_state:
            setattr(module, name, value)
        try:
            if self.integral_loss is None:
                return self.f(t, y)
            x = y[:-1].view(self.x_shape)
            dx = self.f(t, x)
            # torchdyn's f_ = -f(-t, x) for reversed time; the accumulator follows the same rule, like a state
            # column the vector field returns (DEFunc's integral loss under 'autograd').
            dq = self.integral_loss(-t if self.reversed else t, x).sum().reshape(1).to(dx.dtype)
            return torch.cat([dx.reshape(-1), -dq if self.reversed else dq])
        finally:
            for (module, name, _), value in zip(self.module_state, current):
                setattr(module, name, value)

    def dense_output(self, trajectory: Trajectory, n: int, y0: torch.Tensor, y1: torch.Tensor,
                     k: Sequence[torch.Tensor], t_out: torch.Tensor) -> torch.Tensor:
        interpolator = self.interpolator
        if interpolator is None:  # every output is a step end
            return y1
        t0, t1, dt = trajectory.host_data.step_times[n]
        # _adaptive_odeint's interpolation, through torchdyn's own fit/evaluate; linear in (y0, y1, k).
        x_mid = y0 + dt * sum([interpolator.bmid[i] * k[i] for i in range(len(k))])
        coefs = interpolator.fit(dt, k[0], k[-1], y0, y1, x_mid)
        value = interpolator.evaluate(coefs, t0, t1, t_out)
        return torch.where(t1 == t_out, y1, value)  # a t_span point at the step end is the state itself


def _rounds_coefficients(dt: torch.Tensor, state_dtype: torch.dtype) -> bool:
    """Whether torchdyn's step computes some products ``dt * a[i][j]`` in a lower precision than the state: a
    ``dt`` with dimensions wins type promotion against a 0-dim coefficient."""
    return dt.ndim > 0 and _resolution(dt.dtype) > _resolution(state_dtype)


def _with_accumulator(v: torch.Tensor) -> torch.Tensor:
    """``[v.flatten(), 0]``: a state (or stage) of the system augmented with the integral-loss accumulator."""
    return torch.cat([v.reshape(-1), v.new_zeros(1)])


def _module_state(vf: Any) -> tuple[tuple[Any, str, Any], ...]:
    if not isinstance(vf, torch.nn.Module):
        return ()
    state = []
    for module in vf.modules():
        if hasattr(module, "trace_estimator") and hasattr(module, "noise"):
            state.append((module, "noise", module.noise))
        if hasattr(module, "_control"):
            state.append((module, "_control", module._control))
    return tuple(state)


def _check_states(x: torch.Tensor, states: Sequence[torch.Tensor]) -> None:
    for state in states:
        if state.shape != x.shape or state.dtype != x.dtype:
            raise ValueError(
                f"torchdyn's solver turned the state of shape {tuple(x.shape)} and dtype {x.dtype} into shape "
                f"{tuple(state.shape)} and dtype {state.dtype}. sensitivity='{SENSITIVITY}' needs the state to keep "
                "its shape and dtype: give t_span the dtype of x, and make the vector field return dx/dt shaped "
                "and typed like x.")


# --------------------------------------------------------------------------------------------------------
# The entry point torchdyn's dispatch returns.

def _solve_problem(problem: Any, vf_params: Any, x: torch.Tensor, t_span: torch.Tensor, save_at: Any = (),
                       args: Any = None):
    """``ODEProblem.odeint`` for ``sensitivity="symplectic_adjoint"``; returns ``(t_eval, sol)`` like torchdyn."""
    del vf_params  # torchdyn's flat copy of the parameters; we differentiate w.r.t. the parameters themselves
    args = {} if args is None else args
    solver = problem.solver
    _check_solver(solver)
    _check_state_and_t_span(x, t_span)
    interpolator = _replay_interpolator(problem.interpolator, solver, x, t_span)
    params = _parameters(problem)

    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        # Nothing to differentiate: torchdyn's solve as is.
        return _problems.odeint(problem.vf, x, t_span, solver, problem.atol, problem.rtol,
                                interpolator=problem.interpolator, save_at=save_at, args=args)
    if t_span.requires_grad:
        raise ValueError(f"sensitivity='{SENSITIVITY}' does not compute gradients with respect to t_span; pass "
                         "t_span.detach(), or use sensitivity='autograd' to differentiate the integration times.")

    host = _TorchdynHost(problem, x, t_span, save_at, args, interpolator)
    y0 = x if problem.integral_loss is None else torch.cat([x.reshape(-1), x.new_zeros(1)])
    solution = odeint_symplectic(host, y0, host.t_core, params)
    return host.t_eval, host.user_solution(solution)


def _resolution(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _check_solver(solver: Any) -> None:
    if type(solver) in SUPPORTED_SOLVERS.values():
        return
    names = ", ".join(f"'{name}'" for name in SUPPORTED_SOLVERS)
    classes = ", ".join(cls.__name__ for cls in SUPPORTED_SOLVERS.values())
    raise ValueError(
        f"solver {type(solver).__name__} is not supported by sensitivity='{SENSITIVITY}', which replays the steps "
        f"of an explicit Runge-Kutta solver. Supported: {names} (torchdyn's {classes}, by name or as instances of "
        "exactly those classes). Implicit, symplectic (alf), hypersolver and multiple-shooting solvers are not; use "
        "sensitivity='autograd' or 'adjoint' with them.")


def _check_state_and_t_span(x: Any, t_span: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sensitivity='{SENSITIVITY}' needs the state x to be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
    check_times(t_span, "t_span", min_points=2)


def _replay_interpolator(spec: Any, solver: Any, x: torch.Tensor, t_span: torch.Tensor) -> Any:
    """The interpolator ``_adaptive_odeint`` will use (``None`` where torchdyn ignores it), built as torchdyn
    builds it."""
    if spec is None or solver.stepping_class != "adaptive" or isinstance(solver, _ode.Tsitouras45):
        return None
    if isinstance(spec, str):
        if spec not in _interpolators.INTERP_DICT:
            raise ValueError(f"interpolator={spec!r} is unknown to torchdyn; it offers "
                             f"{sorted(_interpolators.INTERP_DICT)} or None")
        interpolator = _interpolators.str_to_interp(spec, x.dtype)
        interpolator.sync_device_dtype(x, t_span)
        spec = interpolator
    if type(spec) is not _interpolators.FourthOrder:
        raise ValueError(f"interpolator {type(spec).__name__} is not supported by sensitivity='{SENSITIVITY}'; use "
                         "None or '4th' (torchdyn's FourthOrder), whose dense output is linear in the stages.")
    return spec


def _parameters(problem: Any) -> tuple[torch.Tensor, ...]:
    """The vector field's parameters (with torchdyn's ``optimizable_params``) and an ``integral_loss`` module's."""
    return parameters_requiring_grad(*(m for m in (problem.vf, problem.integral_loss)
                                       if isinstance(m, torch.nn.Module)))


# --------------------------------------------------------------------------------------------------------
# Registration: wrap the sensitivity dispatch, nothing else.

def _wrap_dispatch(original: Callable) -> Callable:
    @functools.wraps(original)
    def _autograd_func(self):
        if self.sensalg == SENSITIVITY:
            return functools.partial(_solve_problem, self)
        if self.sensalg not in _TORCHDYN_SENSITIVITIES:
            raise ValueError(_unknown_sensitivity(self.sensalg, VALID_SENSITIVITIES))
        return original(self)

    return _autograd_func


def _wrap_multiple_shooting_dispatch(original: Callable) -> Callable:
    @functools.wraps(original)
    def _autograd_func(self):
        if self.sensalg == SENSITIVITY:
            names = ", ".join(f"'{name}'" for name in SUPPORTED_SOLVERS)
            raise ValueError(
                f"sensitivity='{SENSITIVITY}' does not support multiple shooting ({type(self).__name__}): it replays "
                f"the steps of one explicit Runge-Kutta solve. Use NeuralODE / ODEProblem with one of {names}, or "
                "sensitivity='autograd' / 'adjoint' / 'interpolated_adjoint' with multiple shooting.")
        if self.sensalg not in _TORCHDYN_SENSITIVITIES:
            raise ValueError(_unknown_sensitivity(self.sensalg, _TORCHDYN_SENSITIVITIES))
        return original(self)

    return _autograd_func


def _unknown_sensitivity(value: Any, valid: Sequence[str]) -> str:
    return (f"sensitivity={value!r} is not a sensitivity torchdyn knows; valid values: "
            f"{', '.join(repr(v) for v in valid)}.")


_DISPATCHES = (("ODEProblem", _wrap_dispatch), ("MultipleShootingProblem", _wrap_multiple_shooting_dispatch))


def install() -> list[tuple[object, str, object]]:
    """Wraps torchdyn's sensitivity dispatch (``ODEProblem._autograd_func`` and its multiple-shooting override).
    Use ``symadj_plugins.register()``, which calls this once.

    Returns the ``(owner, attribute, original)`` triples that ``symadj_plugins.unregister()`` restores. Raises
    ``RuntimeError`` naming the installed torchdyn version, before patching anything, if its internals are not
    what this module expects.
    """
    check_internals("torchdyn", TESTED_VERSION, _check_torchdyn(), _INTERNALS_ADVICE)
    changes = []
    for class_name, wrap in _DISPATCHES:
        cls = getattr(_problems, class_name)
        original = cls.__dict__["_autograd_func"]
        changes.append((cls, "_autograd_func", original))
        cls._autograd_func = wrap(original)
    return changes


def register() -> None:
    """Same as ``symadj_plugins.register()`` (which registers every installed host library; it is idempotent and
    ``symadj_plugins.unregister()`` undoes it)."""
    from . import register as _register

    _register()


# --------------------------------------------------------------------------------------------------------
# Checking torchdyn's internals (at register()).

def _parameter_names(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _check_torchdyn() -> list[str]:
    """What differs from the torchdyn this adapter was written for (empty if nothing)."""
    found: list[str] = []
    for class_name, _ in _DISPATCHES:
        cls = getattr(_problems, class_name, None)
        if cls is None or "_autograd_func" not in cls.__dict__:
            found.append(f"torchdyn.core.problems.{class_name}._autograd_func is missing")
    problem_cls = getattr(_problems, "ODEProblem", None)
    if problem_cls is not None and _parameter_names(problem_cls.odeint) != ["self", "x", "t_span", "save_at", "args"]:
        found.append(f"ODEProblem.odeint has parameters {_parameter_names(problem_cls.odeint)}")
    odeint = getattr(_problems, "odeint", None)
    if odeint is None or not {"f", "x", "t_span", "solver", "atol", "rtol", "interpolator", "save_at",
                              "args"} <= set(_parameter_names(odeint)):
        found.append("torchdyn.core.problems.odeint is missing or has a different signature")
    if "4th" not in getattr(_interpolators, "INTERP_DICT", {}) or not all(
            hasattr(getattr(_interpolators, "FourthOrder", None), name) for name in ("fit", "evaluate")):
        found.append("torchdyn.numerics.interpolators has no FourthOrder ('4th') interpolator with fit/evaluate")
    for name, cls in SUPPORTED_SOLVERS.items():
        if _ode.SOLVER_DICT.get(name) is not cls:
            found.append(f"torchdyn's solver name {name!r} no longer means {cls.__name__}")
        problem = _probe_solver(cls)
        if problem:
            found.append(problem)
    return found


def _probe_solver(cls: type) -> str | None:
    """One step of ``cls`` on a time-dependent problem, compared with the tableau and stage times we replay."""
    try:
        solver = cls(torch.float64)
        adaptive = solver.stepping_class == "adaptive"
        x = torch.tensor([[0.3, -0.7], [1.1, 0.4]], dtype=torch.float64)
        t = torch.tensor([0.2] if adaptive else 0.2, dtype=torch.float64)  # _adaptive_odeint: t_span[:1]
        dt = torch.tensor(0.1, dtype=torch.float64)
        x, t = solver.sync_device_dtype(x, t)
        calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def f(t_, x_):
            value = torch.sin(3 * x_) * (1 + t_) + t_ * x_.flip(-1)
            calls.append((t_, x_, value))
            return value

        k1 = f(t, x) if adaptive else None
        out = solver.step(f, x, t, dt, k1=k1)
        tableau = _tableau_of(solver)
    except Exception as exc:  # any failure here means the internals changed
        return f"{cls.__name__} cannot be stepped as expected ({type(exc).__name__}: {exc})"
    s = tableau.num_stages
    if len(calls) != s:
        return f"{cls.__name__}.step evaluated {len(calls) - adaptive} stages, expected {s - adaptive}"
    a, b = tableau.tensors(torch.float64, x.device)
    k = torch.stack([value for _, _, value in calls])
    for i, (t_i, x_i, _) in enumerate(calls):
        expected_x = x + dt * torch.einsum("j,j...->...", a[i, :i], k[:i])
        if not torch.allclose(x_i, expected_x, rtol=1e-12, atol=1e-12):
            return f"{cls.__name__}.step's stage {i + 1} input is not given by its tableau"
        if not torch.allclose(t_i, t + tableau.c[i] * dt, rtol=1e-12, atol=1e-12):
            node = ((t_i - t) / dt).flatten()[0].item()
            return (f"{cls.__name__}.step evaluates stage {i + 1} at t + {node:.4g} dt, "
                    f"expected t + {tableau.c[i]:.4g} dt")
    if not isinstance(out, tuple) or len(out) < 2 or not torch.allclose(
            out[1], x + dt * torch.einsum("j,j...->...", b, k), rtol=1e-12, atol=1e-12):
        return f"{cls.__name__}.step's new state (second returned value) is not given by its tableau's weights"
    return None
