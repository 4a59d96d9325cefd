"""The method names of ``torch_symplectic_adjoint`` and the torchdiffeq solvers that run them.

``torch_symplectic_adjoint`` (Matsubara et al.'s package, a fork of torchdiffeq 0.1.1/0.2.x) has the
methods ``dopri8, dopri5, bosh3, fehlberg2, adaptive_heun`` (adaptive) and ``rk38, rk4, midpoint, euler``
(fixed-step). Its ``rk4`` is the *classical* fourth-order Runge–Kutta method and its ``rk38`` the 3/8 rule;
torchdiffeq's ``rk4`` is the 3/8 rule and torchdiffeq has no classical RK4 solver. So:

====================  ===========================================  ======================================
name here             solver class                                 tableau
====================  ===========================================  ======================================
``dopri8`` ...        torchdiffeq's class of the same name          identical (checked by the tests)
``rk38``              torchdiffeq ``RK4`` (``rk4_alt_step_func``)   3/8 rule
``rk4``               :class:`ClassicalRK4` below                   classical RK4 (``rk4_step_func``)
``midpoint, euler``   torchdiffeq's                                 identical
====================  ===========================================  ======================================

:class:`ClassicalRK4` is a ``FixedGridODESolver`` whose step is torchdiffeq's own ``rk4_step_func``; it lives
in this package's private ``SOLVERS`` mapping and is never added to torchdiffeq's.

How steps are chosen is made to match the original too (see :func:`prepare`):

- Adaptive methods: the original cut every step that would pass the next requested output time so that it
  lands on it, and returned the state there (it never interpolated). torchdiffeq steps past output times and
  interpolates. We pass the output times to torchdiffeq as ``step_t`` (its "land on these times" option), so
  the accepted steps are the original's, and the returned value at an output time is torchdiffeq's
  interpolant evaluated at the end of the step that lands there (equal to the step's end state up to
  rounding).
- Fixed-step methods: the original took exactly one step per interval of ``t`` and ignored any other option
  (``step_size`` raised an "Unexpected arguments" warning). torchdiffeq does the same when no ``step_size`` /
  ``grid_constructor`` is given. torchdiffeq-only options are honoured here, with a warning that the
  original would have ignored them.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping

import torch
from torchdiffeq._impl.misc import Perturb
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.rk_common import rk4_step_func
from torchdiffeq._impl.solvers import FixedGridODESolver

from symadj_plugins._method_names import TSA_TO_TORCHDIFFEQ as _TORCHDIFFEQ_NAME

__all__ = ["ADAPTIVE_METHODS", "FIXED_METHODS", "METHODS", "SOLVERS", "ClassicalRK4", "prepare", "torchdiffeq_name"]


class ClassicalRK4(FixedGridODESolver):
    """The classical fourth-order Runge–Kutta method (``torch_symplectic_adjoint``'s ``rk4``).

    Stages at ``t0, t0 + dt/2, t0 + dt/2, t1``; weights ``(1, 2, 2, 1) / 6``. The step is torchdiffeq's own
    ``rk4_step_func``, which torchdiffeq itself does not expose as a method.
    """

    order = 4

    def _step_func(self, func, t0, dt, t1, y0):
        f0 = func(t0, y0, perturb=Perturb.NEXT if self.perturb else Perturb.NONE)
        return rk4_step_func(func, t0, dt, t1, y0, f0=f0, perturb=self.perturb), f0


ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("rk38", "rk4", "midpoint", "euler")
METHODS = ADAPTIVE_METHODS + FIXED_METHODS
"""torch_symplectic_adjoint's method names, in the order its README lists them."""

SOLVERS: Mapping[str, type] = {
    name: (ClassicalRK4 if td_name is None else _TORCHDIFFEQ_SOLVERS[td_name])
    for name, td_name in _TORCHDIFFEQ_NAME.items()
}
"""torch_symplectic_adjoint method name -> solver class; passed to torchdiffeq's ``_check_inputs``."""

# Options torchdiffeq's fixed-grid solvers understand that torch_symplectic_adjoint's did not.
_TORCHDIFFEQ_ONLY_FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")

_DIFFERENT_FIRST_STAGE = (
    "torch_symplectic_adjoint evaluated the first stage of every step at (t_n, y_n); torchdiffeq's {name} reuses "
    "the previous step's last stage, which for this tableau is not evaluated at y_n, so the steps after the "
    "first differ beyond rounding")
_METHOD_WARNINGS = {
    "fehlberg2": (
        "method='fehlberg2': results differ from torch_symplectic_adjoint's. Its error estimate used the weights "
        "(1/256, 255/256, 0) of the first-order solution instead of the difference (-1/512, 0, 1/512) of the two "
        "solutions, so its step-size controller took much smaller steps; this shim runs torchdiffeq's Fehlberg2 "
        "(same tableau, textbook error estimate). Also, " + _DIFFERENT_FIRST_STAGE.format(name="fehlberg2") + "."),
    "adaptive_heun": (
        "method='adaptive_heun': results differ from torch_symplectic_adjoint's: "
        + _DIFFERENT_FIRST_STAGE.format(name="adaptive_heun") + "."),
}


def torchdiffeq_name(method: str) -> str | None:
    """torchdiffeq's name for the same method, or ``None`` when torchdiffeq has none (classical ``rk4``)."""
    return _TORCHDIFFEQ_NAME[method]


def check_method(method: str | None) -> str:
    """Normalises ``method`` (``None`` means ``dopri5``, as in the original) and rejects unknown names."""
    if method is None:
        return "dopri5"
    if method not in SOLVERS:
        hint = ""
        if method in _TORCHDIFFEQ_SOLVERS:
            hint = (f" {method!r} is a torchdiffeq method that torch_symplectic_adjoint did not have; call it through "
                    "torchdiffeq or symadj_plugins.torchdiffeq, where method names are torchdiffeq's.")
        raise ValueError(f"Invalid method {method!r}; torch_symplectic_adjoint's methods are {', '.join(METHODS)}."
                         + hint)
    return method


def prepare(method: str | None, options: dict | None, t: torch.Tensor) -> tuple[str, dict]:
    """The method name and torchdiffeq options that reproduce the original's steps; warns where they cannot.

    Args:
        t: the output times as the user passed them (increasing or decreasing).
    Returns:
        ``(method, options)`` to pass, with :data:`SOLVERS`, to torchdiffeq's ``_check_inputs``.
    """
    method = check_method(method)
    options = {} if options is None else dict(options)
    if method in _METHOD_WARNINGS:
        warn_once(f"method:{method}", _METHOD_WARNINGS[method])
    if method in ADAPTIVE_METHODS:
        options["step_t"] = _output_times_as_step_t(t, options.get("step_t"), options.get("jump_t"))
    else:
        extra = [k for k in _TORCHDIFFEQ_ONLY_FIXED_OPTIONS if k in options]
        if extra:
            warn_once(f"fixed-options:{method}", (
                f"options {extra} are honoured here (torchdiffeq's meaning), but torch_symplectic_adjoint ignored "
                f"them: its fixed-step method {method!r} took exactly one step per interval of t, and never "
                "interpolated between steps. Results differ from the original; remove these options to reproduce it."))
    return method, options


def _output_times_as_step_t(t: torch.Tensor, step_t, jump_t) -> torch.Tensor:
    """``t[1:]`` (plus any user ``step_t``) as torchdiffeq's ``step_t``, in float64, without ``jump_t`` points.

    Passed in the user's time coordinates: torchdiffeq's ``_check_inputs`` negates it with ``t`` when time
    decreases. (torchdiffeq only advances to the next ``step_t`` point when a step would *pass* it; a step that
    lands on one exactly by its own choice makes it ignore the rest, and falls back to interpolation there.)
    """
    times = t.detach().reshape(-1)[1:].to(torch.float64)
    if step_t is not None:
        times = torch.cat([torch.as_tensor(step_t).detach().to(times).reshape(-1), times])
    if jump_t is not None:  # torchdiffeq refuses a time in both; a jump already lands a step there
        jumps = torch.as_tensor(jump_t).detach().to(times).reshape(-1)
        times = times[~torch.isin(times, jumps)]
    return torch.unique(times)


# --------------------------------------------------------------------------------------------------------
# Warnings, once per call site of the user's code.

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_warned: set[tuple[str, int, str]] = set()


def warn_once(kind: str, message: str) -> None:
    """``UserWarning(message)`` attributed to the first frame outside this package, once per (site, kind)."""
    frame = inspect.currentframe()
    level = 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame = frame.f_back
        level += 1
    site = ("<unknown>", 0) if frame is None else (frame.f_code.co_filename, frame.f_lineno)
    key = (*site, kind)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=level)
