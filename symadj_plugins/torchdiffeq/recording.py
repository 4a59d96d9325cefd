"""The step recorder: it stands between a torchdiffeq solver and its ``func``, forwards every call and callback,
and keeps each accepted step's start, step size, state and (for solvers that carry a stage that is not ``f`` at
the new state) that carried stage; the stage evaluations go through the core's memory-budgeted ``StageKeeper``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.recording import FirstStage, StageKeeper
from ..core.replay import RngState
from ..errors import check_field_output
from ._internals import Perturb

__all__ = ["_TorchdiffeqStepRecorder", "_TorchdiffeqSteps", "_check_func_output", "_START_CARRIED", "_START_FSAL",
           "_START_INITIAL", "_START_JUMP"]

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
        self.starts: list[str] = []  # the states (and carried stages) go to the keeper, which thins them
        self._jumped = False
        self._checked = False
        self._first_rng: RngState | None = None  # f(t_0, y_0), an adaptive solve's first call
        self._jump_rng: RngState | None = None  # f(t_n⁺, y_n) after a jump_t
        self._num_calls = 0
        # Where the next adaptive step's first stage was evaluated: (t, perturb) of the solve's first call, of the
        # re-evaluation after a jump_t, or of the last accepted step's last stage (first same as last).
        self._f0_call: tuple[torch.Tensor, Perturb] | None = None
        self._stage_call: tuple[torch.Tensor, Perturb] | None = None

    def __call__(self, t: torch.Tensor, y: torch.Tensor, perturb: Perturb = Perturb.NONE) -> torch.Tensor:
        if self.keeper.expects_stage:
            out = self.keeper.evaluate(self.func, t, y, perturb=perturb)
            self._stage_call = (t, perturb)
        else:  # not a stage: f(t_0, y_0), the initial step's probe, f after a jump, cubic interpolation
            out, rng = self.keeper.randomness.call(self.func, t, y, perturb=perturb)
            if self._num_calls == 0:
                self._first_rng, self._f0_call = rng, (t, perturb)
            if perturb is Perturb.NEXT:
                self._jump_rng, self._f0_call = rng, (t, perturb)
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
        """How an adaptive attempt's k_1 was obtained (see the ``_START_*`` kinds), and where it was evaluated."""
        t, perturb = self._f0_call
        where = dict(t=t, kwargs=(("perturb", perturb),))
        if not self.t0:
            return FirstStage(y0, rng=self._first_rng, **where)
        if self._jumped:
            return FirstStage(y0, rng=self._jump_rng, **where)
        if self.carried_last_stage:
            return FirstStage(y0)  # stored, never evaluated again
        first = self.keeper.first_same_as_last(y0)  # the previous step's last evaluation
        first.t, first.kwargs = where["t"], where["kwargs"]
        return first

    def finish(self) -> None:
        """After the solve: a fixed-grid step in progress is over."""
        self.keeper.finish_attempt(accepted=True)

    def callback_accept_step(self, t0, y0, dt):
        if self.adaptive:
            self.keeper.finish_attempt(accepted=True)
            self._f0_call = self._stage_call  # the next step's first stage, unless a jump_t re-evaluates it
            carried = None
            if not self.t0:
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
        self.starts.append(start)
        self.keeper.add_state(y0, carried)


def _check_func_output(out: Any, y: torch.Tensor) -> None:
    check_field_output(out, y, called="func(t, y)", returns=" (or a tuple matching a tuple y0)",
                       fix=" (flattened if y0 is a tuple); func must return dy/dt with the same shape and dtype as y.")


@dataclass
class _TorchdiffeqSteps:
    """The torchdiffeq adapter's record of a solve, beside the core's :class:`Trajectory`.

    Attributes:
        starts: per accepted step, how its first stage was obtained (``_START_*``).
        stage_times: ``(N, s)`` times at which torchdiffeq evaluated each stage, in the dtype it computed them in.
    """

    starts: list[str]
    stage_times: torch.Tensor
