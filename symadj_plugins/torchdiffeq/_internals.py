"""Every private torchdiffeq name this adapter uses, in one place: the imports from ``torchdiffeq._impl``, the
adaptive solvers' tableau layout (``_adaptive_tableau``), the list of private names (:func:`private_names`) and
the check, once at the first use, that the installed torchdiffeq still has them (:func:`check_torchdiffeq_once`).
A torchdiffeq upgrade that changes one of these lands here.

The other modules of the adapter import torchdiffeq's private names from here, never from ``torchdiffeq._impl``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable

import torch
from torchdiffeq._impl import fixed_grid as _fixed_grid
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.interp import _interp_evaluate
from torchdiffeq._impl.misc import Perturb, _check_inputs, _flat_to_shape, _PerturbFunc, _select_initial_step
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _runge_kutta_step

from ..core import ButcherTableau
from ..errors import check_internals, parameter_names

__all__ = ["INTERNALS_ADVICE", "SOLVERS", "Perturb", "RKAdaptiveStepsizeODESolver", "TESTED_VERSIONS",
           "_adaptive_tableau", "_check_inputs", "_check_torchdiffeq", "_fixed_grid", "_flat_to_shape",
           "_interp_evaluate", "_modules", "_runge_kutta_step", "check_torchdiffeq_once", "continuous_adjoint_options",
           "find_parameters", "perturb_base", "perturbed_time", "private_names", "selected_initial_step"]

TESTED_VERSIONS = "0.2.4 and 0.2.5"


@functools.cache
def _adaptive_tableau(solver_cls: type) -> ButcherTableau:
    """The tableau of a torchdiffeq adaptive RK solver class: ``c = (0, *alpha)``, ``A`` from ``beta``,
    ``b = c_sol``."""
    tab = solver_cls.tableau
    return ButcherTableau.from_rows([0.0, *tab.alpha.tolist()], [row.tolist() for row in tab.beta],
                                    tab.c_sol.tolist(), name=solver_cls.__name__)


def perturb_base(func: Callable) -> Callable | None:
    """The function torchdiffeq's ``_PerturbFunc`` (the outermost wrapper of its normalised ``func``) calls, or
    ``None`` if ``func`` is not one.

    The backward pass calls it directly, with :func:`perturbed_time`: ``_PerturbFunc.forward`` computes
    ``y.abs()`` only for its dtype and is a module call of its own, 10–15 µs per evaluation on a CPU (the
    benchmark's ``steps`` field), paid again on each of the thousands of replayed evaluations
    (``tests/test_torchdiffeq_internals.py`` checks that the replay sees the forward pass's times, bit for bit).
    """
    return func.base_func if type(func) is _PerturbFunc else None


_REAL_DTYPES = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def perturbed_time(t: torch.Tensor, y: torch.Tensor, perturb: Perturb) -> torch.Tensor:
    """The time ``_PerturbFunc.forward(t, y, perturb=perturb)`` passes on to its base function (its own steps:
    the real part, the state's real dtype, one ulp towards ``t ± 1``), as a constant: without the straight-through
    derivative with respect to ``t`` that torchdiffeq attaches, which the replay's VJPs (in ``y`` and θ) do not
    read."""
    if t.is_complex():
        t = t.real
    dtype = _REAL_DTYPES.get(y.dtype, y.dtype)
    if t.dtype != dtype:
        t = t.to(dtype)
    if perturb is Perturb.NEXT:
        return torch.nextafter(t, t + 1)
    if perturb is Perturb.PREV:
        return torch.nextafter(t, t - 1)
    return t


def selected_initial_step(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor,
                          rtol: float | torch.Tensor, atol: float | torch.Tensor, method: str,
                          options: dict | None) -> torch.Tensor:
    """The first step ``torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)``
    takes with the adaptive ``method`` (a 0-d tensor of its time dtype, in its normalised time, which is what the
    ``first_step`` option means): as its ``RKAdaptiveStepsizeODESolver._before_integrate`` computes it, through
    ``_check_inputs``, the solver's own attributes and ``_select_initial_step``. Call under ``no_grad``."""
    _, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(func, y0, t, rtol, atol, method, options,
                                                                      None, SOLVERS)
    solver = SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)
    if solver.first_step is not None:
        return solver.first_step
    t0 = t.to(solver.dtype)[0]  # as AdaptiveStepsizeODESolver.integrate passes t on
    return _select_initial_step(solver.func, t0, solver.y0, solver.order - 1, solver.rtol, solver.atol, solver.norm,
                                f0=solver.func(t0, solver.y0))


@functools.cache
def continuous_adjoint_options() -> frozenset[str]:
    """The keys ``torchdiffeq.odeint_adjoint``'s ``adjoint_options`` may hold: the options of the adjoint ODE's solve,
    i.e. the keyword parameters of torchdiffeq's solvers (``step_size``, ``first_step``, ``max_num_steps``, ...) and
    ``norm`` (which ``_check_inputs`` handles)."""
    names = {"norm"}
    for solver in SOLVERS.values():
        for cls in inspect.getmro(solver):
            if "__init__" in vars(cls) and cls is not object:
                names.update(name for name, p in inspect.signature(cls.__init__).parameters.items()
                             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return frozenset(names - {"self", "func", "y0", "rtol", "atol"})


def _modules():
    """``(torchdiffeq._impl.odeint, torchdiffeq._impl.adjoint)``, the modules whose names :func:`install` patches."""
    # sys.modules: torchdiffeq._impl re-exports the *function* odeint under the submodule's name.
    return sys.modules["torchdiffeq._impl.odeint"], sys.modules["torchdiffeq._impl.adjoint"]


# --------------------------------------------------------------------------------------------------------
# Checking torchdiffeq's internals (once, at the first use: a solve, initial_step, torchdiffeq_host or register()).

INTERNALS_ADVICE = ("The symplectic adjoint cannot guarantee exact gradients with it; use torchdiffeq.odeint or "
                    "odeint_adjoint without it, or a torchdiffeq version it supports.")


def private_names() -> list[tuple[str, object, tuple[str, ...]]]:
    """Every private torchdiffeq name this adapter uses, in one list: ``(where, owner, attribute names)``. The owner
    is a module, a class, or a probe instance, for the attributes torchdiffeq sets in ``__init__`` and the fields
    of its ``_RungeKuttaState``."""
    from torchdiffeq._impl import interp as interp_module
    from torchdiffeq._impl import misc, rk_common

    odeint_module, adjoint_module = _modules()
    probe_t = torch.tensor([0.0, 1.0])
    _, func, y0, _, rtol, atol, _, options, _, _ = _check_inputs(lambda t, y: -y, torch.ones(1), probe_t, 1e-7, 1e-9,
                                                                 "dopri5", None, None, SOLVERS)
    adaptive = SOLVERS["dopri5"](func=func, y0=y0, rtol=rtol, atol=atol, **options)
    fixed = _fixed_grid.Euler(func=func, y0=y0, rtol=rtol, atol=atol, step_size=0.5)
    return [
        ("torchdiffeq._impl.odeint", odeint_module, ("SOLVERS", "_check_inputs")),
        ("torchdiffeq._impl.adjoint", adjoint_module, ("_check_inputs", "odeint", "find_parameters")),
        ("torchdiffeq._impl.misc", misc, ("_check_inputs", "_flat_to_shape", "Perturb", "_PerturbFunc",
                                          "_select_initial_step", "_all_callback_names")),
        ("torchdiffeq._impl.interp", interp_module, ("_interp_evaluate",)),
        ("torchdiffeq._impl.rk_common", rk_common, ("_runge_kutta_step",)),
        ("RKAdaptiveStepsizeODESolver", RKAdaptiveStepsizeODESolver,
         ("_interp_fit", "_adaptive_step", "_before_integrate", "integrate", "integrate_until_event")),
        ("an adaptive solver", adaptive,
         ("tableau", "order", "func", "y0", "rtol", "atol", "norm", "dtype", "first_step")),
        ("_RungeKuttaState (solver.rk_state)", rk_common._RungeKuttaState, ("y1", "f1", "t0", "t1", "interp_coeff")),
        ("FixedGridODESolver", _fixed_grid.FixedGridODESolver,
         ("_linear_interp", "_cubic_hermite_interp", "_step_func", "integrate", "integrate_until_event")),
        ("a fixed-grid solver", fixed, ("perturb", "interp")),
        ("_PerturbFunc", func, ("base_func",)),
    ]


def _check_torchdiffeq() -> list[str]:
    """What differs from the torchdiffeq this adapter was written for (empty if nothing): the names of
    :func:`private_names`, and, for the ones :func:`install` wraps and the solvers' tableaux, their shape."""
    return [*_check_names(), *_check_wrapped(), *_check_solvers()]


@functools.cache
def _check_result() -> tuple[str, ...]:
    return tuple(_check_torchdiffeq())


def check_torchdiffeq_once() -> None:
    """Raises ``RuntimeError`` naming the installed torchdiffeq if :func:`_check_torchdiffeq` finds a difference;
    the check runs once per process (at the first solve, ``initial_step``, ``torchdiffeq_host`` or ``register()``),
    its result is kept."""
    check_internals("torchdiffeq", TESTED_VERSIONS, list(_check_result()), INTERNALS_ADVICE)


def _check_names() -> list[str]:
    try:
        names = private_names()
    except Exception as e:  # a probe solver torchdiffeq no longer builds this way
        return [f"building its probe solvers failed ({type(e).__name__}: {e})"]
    return [f"{where}.{name} is missing" for where, owner, attributes in names for name in attributes
            if not hasattr(owner, name)]


def _check_wrapped() -> list[str]:
    """The names :func:`install` wraps take the parameters the wrappers pass on."""
    found: list[str] = []
    odeint_module, adjoint_module = _modules()
    for module in (odeint_module, adjoint_module):
        fn = getattr(module, "_check_inputs", None)
        if fn is not None and parameter_names(fn)[:6] != ["func", "y0", "t", "rtol", "atol", "method"]:
            found.append(f"{module.__name__}._check_inputs does not take (func, y0, t, rtol, atol, method, ...)")
    if callable(getattr(adjoint_module, "odeint", None)) and "method" not in parameter_names(adjoint_module.odeint):
        found.append(f"{adjoint_module.__name__}.odeint has no method parameter")
    return found


def _check_solvers() -> list[str]:
    """The accepted-step callback, the adaptive solvers' tableau layout, the fixed-grid solvers' names."""
    from torchdiffeq._impl import misc

    from .fixed_grid import _FIXED_GRID  # here, not at the top: fixed_grid imports this module

    found = []
    if "callback_accept_step" not in getattr(misc, "_all_callback_names", ()):
        found.append("func.callback_accept_step is not a torchdiffeq callback (added in torchdiffeq 0.2.4)")
    if not {"alpha", "beta", "c_sol"} <= set(getattr(getattr(SOLVERS.get("dopri5"), "tableau", None), "_fields", ())):
        found.append("the dopri5 solver's tableau has no alpha, beta, c_sol")
    found += [f"torchdiffeq's solver name {cls.__name__.lower()!r} no longer means {cls.__name__}"
              for cls in _FIXED_GRID if SOLVERS.get(cls.__name__.lower(), cls) is not cls]
    return found
