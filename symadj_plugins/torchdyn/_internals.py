"""Every torchdyn name this adapter uses, in one place: the imports of torchdyn's modules, the solver classes and
their tableau layout, and the check (at ``register()``) that the installed torchdyn still behaves as listed in the
package docstring (:mod:`symadj_plugins.torchdyn`). A torchdyn upgrade that changes one of these lands here.

The other modules of the adapter reach torchdyn only through the module objects imported here (``_problems``,
``_interpolators``, ``_ode``), looked up at call time.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import _torchdyn_guard
from ..core import ButcherTableau
from ..core.tableaux import EULER, MIDPOINT
from ..errors import internals_error, parameter_names

try:
    from torchdyn.core import problems as _problems
    from torchdyn.numerics import interpolators as _interpolators
    from torchdyn.numerics.solvers import ode as _ode
except ImportError as exc:  # pragma: no cover - exercised only with a broken torchdyn
    raise ImportError(f"symadj_plugins.torchdyn needs torchdyn (tested with 1.0.6): {exc}") from exc

SENSITIVITY = _torchdyn_guard.SENSITIVITY  # "symplectic_adjoint"
TESTED_VERSION = "1.0.6"
_TORCHDYN_SENSITIVITIES = ("autograd", "adjoint", "interpolated_adjoint")
_DISPATCH_CLASSES = ("ODEProblem", "MultipleShootingProblem")  # in torchdyn.core.problems, with _autograd_func

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

_INTERNALS_ADVICE = (f"sensitivity='{SENSITIVITY}' cannot guarantee exact gradients with it; use "
                     "sensitivity='autograd', or a torchdyn version it supports.")


def _internals_error(what: str) -> RuntimeError:
    return internals_error("torchdyn", TESTED_VERSION, what, _INTERNALS_ADVICE)


# --------------------------------------------------------------------------------------------------------
# Tableaux: torchdyn's own, read off the solver object.

def _tableau_of(solver: Any) -> ButcherTableau:
    """The tableau ``solver.step`` uses (``c``: the nodes, the row sums of ``a``).

    Read from the solver's ``.tableau`` as it is *now* (after ``sync_device_dtype``), so a tableau created in
    float32 and moved to float64 replays with its float32-rounded coefficients, like torchdyn's step does.
    """
    cls = type(solver)
    if cls in _HARD_CODED:
        return _HARD_CODED[cls]
    _, a, b_sol, _ = solver.tableau
    a_rows = tuple(tuple(row.tolist()) for row in a)
    nodes = (0.0, *(math.fsum(row) for row in a_rows))
    return _cached_tableau(cls.__name__, nodes, a_rows, tuple(b_sol.tolist()))


def _stage_offsets(solver: Any) -> tuple[float, ...]:
    """Where ``solver.step`` evaluates each stage, as multiples of ``dt`` after ``t``: stage ``i >= 2`` at
    ``t + c[i - 2] * dt`` with torchdyn's ``c``. For ``RungeKutta4`` that is ``(0, 0, 1/2, 1/2)``, not the nodes
    ``(0, 1/2, 1/2, 1)``; the replay uses the times recorded from the ``f`` calls, so it follows the step."""
    cls = type(solver)
    if cls in _HARD_CODED:
        return _HARD_CODED[cls].c
    c, _, b_sol, _ = solver.tableau
    return (0.0, *(float(v) for v in c.tolist()[: len(b_sol) - 1]))


@functools.lru_cache(maxsize=128)
def _cached_tableau(name: str, c: tuple, a_rows: tuple, b: tuple) -> ButcherTableau:
    return ButcherTableau.from_rows(c, a_rows, b, name=name)


# --------------------------------------------------------------------------------------------------------
# Checking torchdyn's internals (at register()).

def _check_torchdyn() -> list[str]:
    """What differs from the torchdyn this adapter was written for (empty if nothing)."""
    found: list[str] = []
    for class_name in _DISPATCH_CLASSES:
        cls = getattr(_problems, class_name, None)
        if cls is None or "_autograd_func" not in cls.__dict__:
            found.append(f"torchdyn.core.problems.{class_name}._autograd_func is missing")
    problem_cls = getattr(_problems, "ODEProblem", None)
    if problem_cls is not None and parameter_names(problem_cls.odeint) != ["self", "x", "t_span", "save_at", "args"]:
        found.append(f"ODEProblem.odeint has parameters {parameter_names(problem_cls.odeint)}")
    odeint = getattr(_problems, "odeint", None)
    if odeint is None or not {"f", "x", "t_span", "solver", "atol", "rtol", "interpolator", "save_at",
                              "args"} <= set(parameter_names(odeint)):
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
        tableau, offsets = _tableau_of(solver), _stage_offsets(solver)
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
        if not torch.allclose(t_i, t + offsets[i] * dt, rtol=1e-12, atol=1e-12):
            node = ((t_i - t) / dt).flatten()[0].item()
            return (f"{cls.__name__}.step evaluates stage {i + 1} at t + {node:.4g} dt, "
                    f"expected t + {offsets[i]:.4g} dt")
    if not isinstance(out, tuple) or len(out) < 2 or not torch.allclose(
            out[1], x + dt * torch.einsum("j,j...->...", b, k), rtol=1e-12, atol=1e-12):
        return f"{cls.__name__}.step's new state (second returned value) is not given by its tableau's weights"
    return None
