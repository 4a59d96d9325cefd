"""Recording torchdyn's accepted steps: the ``(t, dt, x)`` of each, and when each stage's ``f`` call happened.

torchdyn's ``odeint`` runs on a shallow copy of the problem's solver whose ``step`` is shadowed by
:class:`_TorchdynStepRecorder`, which forwards every call unchanged; nothing shared is patched per call.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.recording import FirstStage, StageKeeper
from ..core.replay import RngState
from ..errors import check_field_output
from ._internals import SENSITIVITY, _internals_error
from .coefficients import _rounds_coefficients


@dataclass
class _Step:
    """One call of torchdyn's ``solver.step``: from ``x`` at time ``t`` (shape ``()`` or ``(1,)``) over ``dt``."""

    t: torch.Tensor
    dt: torch.Tensor
    x: torch.Tensor | None  # until the step is accepted: then the keeper holds it
    k1_given: bool
    stage_times: list[torch.Tensor]
    x_new: torch.Tensor | None = None
    k1: torch.Tensor | None = None  # the k1 torchdyn passed, until the step is accepted


@dataclass
class _TorchdynStepRecorder:
    """Runs one torchdyn solve on a private shallow copy of ``solver`` (``self.solver``, to pass to ``odeint``)
    whose ``step`` it shadows; forwards every call unchanged. The problem's own solver is never touched, so
    concurrent solves with one model do not see each other, and an error leaves nothing to restore.

    A step is accepted iff torchdyn starts its next step from the state it returned (``x = x_new`` in both
    ``_fixed_odeint`` and ``_adaptive_odeint``); the last step of a solve is always accepted. Each step's stage
    evaluations go through the core's :class:`~symadj_plugins.core.recording.StageKeeper` (random states, and what
    the memory budget keeps).
    """

    solver: Any
    keeper: StageKeeper
    f: Callable | None = None
    steps: list[_Step] = field(default_factory=list)
    final_state: torch.Tensor | None = None
    _pending: _Step | None = None
    _real_step: Callable | None = None
    start_rng: RngState | None = None  # what an adaptive solve's first k1 = f(t_0, x_0) drew (`watched_field`)
    _calls_outside_steps: int = 0
    _in_step: bool = False
    _recording: list = field(default_factory=list)  # [self] while the solve is recorded
    _checked: bool = False  # the field's first output was checked

    def __enter__(self) -> _TorchdynStepRecorder:
        # torchdyn's odeint writes the synchronised tableau onto the copy (sync_device_dtype): the replay reads it
        # there, as torchdyn's step did.
        self.solver = copy.copy(self.solver)
        self._real_step = self.solver.step
        self.solver.step = self
        self._recording.append(self)
        return self

    def __exit__(self, *exc) -> None:
        del self.solver.step  # the copy's step is its class's again (e.g. for the coefficient probes)
        self._real_step = None
        self._recording.clear()

    def watched_field(self, vf: Callable) -> Callable:
        """``vf`` as torchdyn's ``odeint`` is to call it during the recorded solve: its calls outside the steps
        (an adaptive solve's ``k1 = f(t_0, x_0)`` and its initial step's probe) go through the keeper's random-number
        watch like the stage evaluations (so that they draw per thread, and the first one's draws are replayed: it is
        the first step's first stage). After the solve it is ``vf`` itself: the replay calls it through torchdyn's
        ``f``."""
        recording = self._recording  # emptied when the solve ends: the replay's f holds no recorder

        def watched(t, x, *rest, **kwargs):
            if not recording or recording[0]._in_step:
                return vf(t, x, *rest, **kwargs)
            recorder = recording[0]
            out, rng = recorder.keeper.randomness.call(vf, t, x, *rest, **kwargs)
            if recorder._calls_outside_steps == 0:
                recorder.start_rng = rng
            recorder._calls_outside_steps += 1
            return out

        return watched

    def __call__(self, f, x, t, dt, k1=None, args=None):
        if self.f is None:
            self.f = f
        elif f is not self.f:
            raise _internals_error("odeint called solver.step with different vector fields within one solve")
        if self._pending is not None:
            accepted = x is self._pending.x_new
            self.keeper.finish_attempt(accepted)
            if accepted:
                self._accept(self._pending)
            self._pending = None
        self.keeper.begin_attempt(self._first_stage(x, t) if k1 is not None else None)

        times: list[torch.Tensor] = []
        inner = f

        def recording_f(t_, x_, *extra, **kwargs):
            if extra or kwargs:
                raise _internals_error(f"{type(self.solver).__name__}.step called f with extra arguments")
            times.append(t_)
            out = self.keeper.evaluate(inner, t_, x_)
            if not self._checked:
                _check_field_output(out, x_)
                self._checked = True
            return out

        self._in_step = True
        try:
            out = self._real_step(recording_f, x, t, dt, k1=k1, args=args)
        finally:
            self._in_step = False
        self._pending = _Step(t, dt, x, k1 is not None, times, out[1], k1)
        return out

    def _first_stage(self, x: torch.Tensor, t: torch.Tensor) -> FirstStage:
        """The k1 torchdyn carries in: the previous accepted step's last stage (first same as last), or for the first
        step ``f(t_0, x_0)``, the solve's first call. Where it has no graph to share, a step that keeps graphs builds
        one at ``(t, x)``, where the backward pass would evaluate it."""
        first = self.keeper.first_same_as_last(x) or FirstStage(x, rng=self.start_rng)
        first.t = t
        return first

    def _accept(self, step: _Step) -> None:
        # torchdyn carries k1 = f(t, Y_s) from the previous step's last stage (FSAL). The replay re-evaluates
        # f(t, x) instead, which is the same up to rounding unless the previous step rounded its coefficients
        # (then Y_s and x differ by more): only then is k1 kept, for the core to reuse (``Trajectory.carried``).
        # The state goes to the keeper (which may thin the states), with the k1 torchdyn passed: recomputing the step
        # from there needs it bit for bit.
        previous = self.steps[-1] if self.steps else None
        given_k1 = step.k1
        if previous is None or not _rounds_coefficients(previous.dt, step.x.dtype):
            step.k1 = None
        self.keeper.add_state(step.x, carried=step.k1, extra=given_k1)
        self.final_state = step.x_new
        step.x_new = step.x = step.k1 = None
        self.steps.append(step)

    def finish(self) -> None:
        if self._pending is None:
            raise _internals_error("odeint returned without calling solver.step")
        self.keeper.finish_attempt(accepted=True)
        self._accept(self._pending)
        self._pending = None
        self.keeper.add_state(self.final_state, final=True)


@dataclass
class _TorchdynSteps:
    """The torchdyn adapter's record of a solve, beside the core's :class:`Trajectory`.

    Attributes:
        stage_times: ``(N, s)`` times of each stage's ``f`` call (reshaped to ``time_shape`` when replayed), in
            the widest dtype among them.
        stage_dtypes: per step, per stage, the dtype torchdyn computed that time in (the replay uses it).
        step_times: per step, ``(t, t + dt, dt)`` as torchdyn computed them.
        rounded_coefficients: ``{n: (h·A, h·b)}`` for the steps whose coefficients torchdyn rounded.
    """

    stage_times: torch.Tensor
    stage_dtypes: tuple[tuple[torch.dtype, ...], ...]
    step_times: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rounded_coefficients: dict[int, tuple[torch.Tensor, torch.Tensor]]


def _stage_times(steps: Sequence[_Step], num_stages: int,
                 solver_name: str) -> tuple[torch.Tensor, tuple[tuple[torch.dtype, ...], ...], torch.Size]:
    """The times of every stage of every step (a carried ``k1`` was evaluated at the step's ``t``): returns
    ``(stage_times, stage_dtypes, time_shape)`` as :class:`_TorchdynSteps` holds them, ``time_shape`` being the
    shape of one time (``()`` or ``(1,)``)."""
    flat_times: list[torch.Tensor] = []
    for step in steps:
        times = [step.t, *step.stage_times] if step.k1_given else step.stage_times
        if len(times) != num_stages:
            given = "given" if step.k1_given else "not given"
            raise _internals_error(f"{solver_name}.step evaluated {len(step.stage_times)} stages "
                                   f"(k1 {given}); its tableau has {num_stages}")
        flat_times += times
    time_shape = flat_times[0].shape
    if any(ti.shape != time_shape for ti in flat_times):
        raise _internals_error("stage times of different shapes within one solve")
    # Stored in the widest dtype (exact), replayed in the dtype torchdyn computed each one in.
    wide = functools.reduce(torch.promote_types, {ti.dtype for ti in flat_times})
    stage_times = torch.stack([ti.to(wide) for ti in flat_times]).reshape(len(steps), num_stages)
    dtypes = [ti.dtype for ti in flat_times]
    stage_dtypes = tuple(tuple(dtypes[n * num_stages:(n + 1) * num_stages]) for n in range(len(steps)))
    return stage_times, stage_dtypes, time_shape


def _check_field_output(out: Any, x: torch.Tensor) -> None:
    """The field returned dx/dt shaped and typed like ``x``: torchdyn's solvers would promote a lower-precision output
    (a field under autocast returning bfloat16) into the state, and the replay of its stages could not be checked."""
    check_field_output(out, x, called="the vector field", state_name=" x",
                       fix=f". sensitivity='{SENSITIVITY}' needs dx/dt with the shape and dtype of x; under autocast, "
                           "cast the field's output back (return out.to(x.dtype)).")


def _check_states(x: torch.Tensor, states: Sequence[torch.Tensor]) -> None:
    """Raises ``ValueError`` unless every recorded state has the shape and dtype of ``x``."""
    for state in states:
        if state.shape != x.shape or state.dtype != x.dtype:
            raise ValueError(
                f"torchdyn's solver turned the state of shape {tuple(x.shape)} and dtype {x.dtype} into shape "
                f"{tuple(state.shape)} and dtype {state.dtype}. sensitivity='{SENSITIVITY}' needs the state to keep "
                "its shape and dtype: give t_span the dtype of x, and make the vector field return dx/dt shaped "
                "and typed like x.")
