"""The entry point torchdyn's sensitivity dispatch returns for ``sensitivity="symplectic_adjoint"``, its input
checks, and :func:`install`, which wraps that dispatch (the adapter's only hook into torchdyn)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core import odeint_symplectic
from ..errors import check_internals
from ..inputs import check_times, parameters_requiring_grad
from ..options import current_options
from ._internals import (
    _DISPATCH_CLASSES,
    _INTERNALS_ADVICE,
    _TORCHDYN_SENSITIVITIES,
    SENSITIVITY,
    SUPPORTED_SOLVERS,
    TESTED_VERSION,
    _check_torchdyn,
    _interpolators,
    _ode,
    _problems,
)
from .host import _TorchdynHost

VALID_SENSITIVITIES = (*_TORCHDYN_SENSITIVITIES, SENSITIVITY)


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

    host = _TorchdynHost(problem, x, t_span, save_at, args, interpolator, current_options().budget, params)
    y0 = x if problem.integral_loss is None else torch.cat([x.reshape(-1), x.new_zeros(1)])
    solution = odeint_symplectic(host, y0, host.t_core, params)
    return host.t_eval, host.user_solution(solution)


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


# One wrapper per class of _DISPATCH_CLASSES ("ODEProblem", "MultipleShootingProblem"), in that order.
_DISPATCHES = tuple(zip(_DISPATCH_CLASSES, (_wrap_dispatch, _wrap_multiple_shooting_dispatch), strict=True))


def install() -> list[tuple[object, str, object]]:
    """Wraps torchdyn's sensitivity dispatch (``ODEProblem._autograd_func`` and its multiple-shooting override).
    Use ``symadj_plugins.register()``, which calls this once.

    Returns the ``(owner, attribute, original)`` triples that ``symadj_plugins.unregister()`` restores. Raises
    ``RuntimeError`` naming the installed torchdyn version, before patching anything, if its internals are not
    what this adapter expects.
    """
    check_internals("torchdyn", TESTED_VERSION, _check_torchdyn(), _INTERNALS_ADVICE)
    changes = []
    for class_name, wrap in _DISPATCHES:
        cls = getattr(_problems, class_name)
        original = cls.__dict__["_autograd_func"]
        changes.append((cls, "_autograd_func", original))
        cls._autograd_func = wrap(original)
    return changes
