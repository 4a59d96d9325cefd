"""The public functions of the torchdiffeq adapter (:func:`odeint_symplectic_adjoint`, the drop-in
:func:`odeint_adjoint`, :func:`torchdiffeq_host`, :func:`supported_methods`) and the resolution of their
arguments (method, parameters, memory budget)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torchdiffeq

from ..core import HostSolver, odeint_symplectic
from ..core.budget import MemoryBudget
from ..inputs import check_times, parameters_requiring_grad
from ..options import SymplecticAdjoint, current_options
from ._internals import (
    SOLVERS,
    RKAdaptiveStepsizeODESolver,
    _check_inputs,
    _flat_to_shape,
    check_torchdiffeq_once,
    continuous_adjoint_options,
    find_parameters,
    selected_initial_step,
)
from .events import _check_event_inputs, _odeint_until_event
from .fixed_grid import _FIXED_GRID, FixedGridRule
from .host import _TorchdiffeqHost

__all__ = ["SYMPLECTIC", "initial_step", "odeint_adjoint", "odeint_symplectic_adjoint", "supported_methods",
           "torchdiffeq_host"]

SYMPLECTIC = "symplectic"
"""The ``adjoint_method`` value that selects the symplectic adjoint in :func:`odeint_adjoint`."""

_original_odeint_adjoint = torchdiffeq.odeint_adjoint  # torchdiffeq's own, bound before install() replaces it

_SYMPLECTIC_IS_NOT_A_METHOD = (
    f"method={SYMPLECTIC!r} is not an ODE solver: the symplectic adjoint is a way to compute the gradient of a "
    "solve, selected with adjoint_method. Use odeint_adjoint(func, y0, t, method='dopri5', "
    f"adjoint_method={SYMPLECTIC!r}) (torchdiffeq's, after symadj_plugins.register(), or "
    "symadj_plugins.torchdiffeq.odeint_adjoint), or symadj_plugins.torchdiffeq.odeint_symplectic_adjoint(func, y0, "
    "t, method='dopri5').")


def supported_methods() -> list[str]:
    """Names in torchdiffeq's ``SOLVERS`` that the symplectic adjoint supports (explicit RK methods)."""
    return [name for name, cls in SOLVERS.items()
            if isinstance(cls, type) and (issubclass(cls, RKAdaptiveStepsizeODESolver) or cls in _FIXED_GRID)]


def odeint_symplectic_adjoint(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *,
                              rtol: float | torch.Tensor = 1e-7, atol: float | torch.Tensor = 1e-9,
                              method: str | None = None, options: dict | None = None,
                              event_fn: Callable | None = None,
                              adjoint_params: Iterable[torch.Tensor] | None = None,
                              memory_budget: int | float | str | None = None,
                              adjoint: SymplecticAdjoint | None = None,
                              store_stages: bool | None = None):
    """``torchdiffeq.odeint`` with gradients by the symplectic adjoint method.

    Same arguments and same returned values as ``torchdiffeq.odeint`` (the forward solve *is*
    torchdiffeq's, bit for bit); ``adjoint_params`` as in ``torchdiffeq.odeint_adjoint`` (default: the
    parameters of ``func``, which must then be an ``nn.Module``, that require grad).

    Gradients w.r.t. ``y0`` and ``adjoint_params`` are exact for the discrete solution: they equal
    backpropagation through the same accepted steps with the step sizes held constant, up to rounding.
    Memory held between forward and backward is one state per accepted step; the backward pass holds one
    graph of ``func`` at a time. If ``t.requires_grad``, ``∂L/∂t_k = g_kᵀ f(t_k, y(t_k))`` for ``k ≥ 1`` and
    ``∂L/∂t_0 = -λ_0ᵀ f(t_0, y_0)`` (``g_k`` the cotangent of output ``k``, ``λ_0`` that of ``y0`` from later
    outputs), the formula ``torchdiffeq.odeint_adjoint`` uses.

    ``memory_budget`` (or ``adjoint=SymplecticAdjoint(memory_budget=...)``, or a ``symadj_plugins.options(...)``
    block) bounds the bytes the solve keeps for the backward pass; the gradient is the same at every budget, to
    rounding. ``store_stages=True``/``False`` is the older spelling of ``"stages"``/``"trajectory"``. The levels and
    what each keeps: :class:`symadj_plugins.SymplecticAdjoint`.

    torchdiffeq's backward-pass hooks ``func.callback_step_adjoint``, ``callback_accept_step_adjoint`` and
    ``callback_reject_step_adjoint`` are never called here: they belong to the continuous adjoint's backward ODE
    solve, and the symplectic adjoint solves no backward ODE (it replays the forward pass's accepted steps). Nothing
    raises; the forward hooks ``callback_step``, ``callback_accept_step`` and ``callback_reject_step`` are called
    exactly as by ``torchdiffeq.odeint``. To observe the backward pass, use PyTorch hooks, e.g.
    ``nn.Module.register_full_backward_hook`` on ``func``, which runs once per stage evaluation of each step in the
    backward pass.

    Events: with ``event_fn``, the solve runs from ``t[0]`` (in the direction of ``t[1]``) until
    ``event_fn(t, y)`` changes sign and returns ``(event_t, solution)`` exactly as ``torchdiffeq.odeint`` does
    (adaptive methods, and fixed grids with ``options=dict(step_size=...)``), so it serves as the
    ``odeint_interface`` of ``torchdiffeq.odeint_event``. ``event_t`` is a constant (no gradient, as in
    torchdiffeq: ``odeint_event`` reroutes its gradient through the event state); ``solution[1]``, the last
    step's dense output at ``event_t``, is differentiable w.r.t. ``y0``, ``adjoint_params`` and ``t[0]``, with
    the gradient of backprop through the same steps (for ``t[0]`` too, unlike the formula above).

    Supported methods: every explicit Runge–Kutta method of the installed torchdiffeq (see
    :func:`supported_methods`). Not supported: double backward (``create_graph=True``).

    Args:
        func: ``f(t, y)``; ``t`` a scalar tensor, ``y`` shaped like ``y0`` (or a tuple like it).
        y0: initial state, a tensor or a tuple of tensors.
        t: 1-D tensor of output times, strictly increasing or strictly decreasing; ``t[0]`` is the start.
            With ``event_fn``: two times, the start and any time that gives the direction.
        event_fn: optional ``event_fn(t, y) -> Tensor``; the solve stops where it crosses zero.
    Returns:
        ``(len(t), *y0.shape)`` tensor, or a tuple of such tensors for a tuple ``y0``. With ``event_fn``:
        ``(event_t, solution)``, ``event_t`` a scalar tensor and ``solution`` of shape ``(2, *y0.shape)``
        (``y0`` and the state at ``event_t``), or a tuple of such for a tuple ``y0``.
    """
    check_torchdiffeq_once()
    check_times(t)
    method = _check_method(method)
    params = _adjoint_params(func, adjoint_params)
    budget = _memory_budget(memory_budget, adjoint, store_stages)
    if event_fn is not None:
        _check_event_inputs(event_fn, t, method, options)

    shapes, nfunc, y0_flat, t_norm, rtol, atol, method, options, event_fn, t_is_reversed = _check_inputs(
        func, y0, t, rtol, atol, method, options, event_fn, SOLVERS)
    # params_inferred: func's parameters(), so anything else f uses would be missed (core.replay refuses it).
    host_args = dict(func=nfunc, method=method, rtol=rtol, atol=atol, options=options, memory_budget=budget,
                     params=params, user_func=func, params_inferred=adjoint_params is None)
    if event_fn is None:
        solution = odeint_symplectic(_TorchdiffeqHost(**host_args), y0_flat, t_norm, params)
    else:
        event_t, solution = _odeint_until_event(host_args, event_fn, y0_flat, t_norm, params, t_is_reversed)
    if shapes is not None:
        solution = _flat_to_shape(solution, (len(t),), shapes)
    return solution if event_fn is None else (event_t, solution)


def odeint_adjoint(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *,
                   rtol: float | torch.Tensor = 1e-7, atol: float | torch.Tensor = 1e-9,
                   method: str | None = None, options: dict | None = None, event_fn: Callable | None = None,
                   adjoint_rtol: float | None = None, adjoint_atol: float | None = None,
                   adjoint_method: str | None = None, adjoint_options: dict | None = None,
                   adjoint_params: Iterable[torch.Tensor] | None = None):
    """Drop-in for ``torchdiffeq.odeint_adjoint`` that also accepts ``adjoint_method="symplectic"``.

    Any other ``adjoint_method`` keeps torchdiffeq's meaning (the solver of the continuous adjoint ODE) and
    the call goes to torchdiffeq unchanged. With ``"symplectic"`` the call goes to
    :func:`odeint_symplectic_adjoint`; ``adjoint_options`` then holds the symplectic adjoint's options
    (``dict(memory_budget=...)``: the fields of :class:`symadj_plugins.SymplecticAdjoint`). ``adjoint_rtol`` and
    ``adjoint_atol`` are accepted and ignored, and so are the ``adjoint_options`` keys of torchdiffeq's continuous
    adjoint (``norm``, ``step_size``, ``first_step``, ...: any option of torchdiffeq's solvers), with one
    ``UserWarning`` naming those keys, because the symplectic adjoint solves no second ODE: it replays the forward
    pass's own accepted steps exactly, so there is no backward tolerance, norm or step to choose. So
    torchdiffeq's recommended ``adjoint_options=dict(norm="seminorm")`` keeps working. Any other key is a
    ``ValueError`` naming the valid ones.
    """
    if method == SYMPLECTIC:
        raise ValueError(_SYMPLECTIC_IS_NOT_A_METHOD)
    if adjoint_method == SYMPLECTIC:
        ours, ignored = _split_adjoint_options(adjoint_options)
        adjoint = SymplecticAdjoint.from_options(ours)  # unknown keys: a ValueError before any warning
        if ignored:
            warnings.warn(f"adjoint_options {', '.join(map(repr, ignored))} ignored: they configure torchdiffeq's "
                          f"continuous adjoint (its backward ODE solve), and adjoint_method={SYMPLECTIC!r} solves no "
                          "backward ODE (it replays the forward pass's accepted steps exactly)", UserWarning,
                          stacklevel=2)
        return odeint_symplectic_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                         event_fn=event_fn, adjoint_params=adjoint_params, adjoint=adjoint)
    return _original_odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                    event_fn=event_fn, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                    adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                                    adjoint_params=adjoint_params)


def _split_adjoint_options(adjoint_options: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """``(the rest, the keys only torchdiffeq's continuous adjoint uses)`` of ``adjoint_options``."""
    given = dict(adjoint_options or {})
    ours = {field.name for field in dataclasses.fields(SymplecticAdjoint)}
    ignored = sorted(key for key in given if key in continuous_adjoint_options() and key not in ours)
    return {key: value for key, value in given.items() if key not in ignored}, ignored


def initial_step(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *,
                 method: str | None = None, rtol: float | torch.Tensor = 1e-7, atol: float | torch.Tensor = 1e-9,
                 options: dict | None = None) -> float:
    """The first step ``torchdiffeq.odeint(func, y0, t, method=..., rtol=..., atol=..., options=...)`` would take
    with an adaptive method, as a constant: pass it as ``options=dict(first_step=...)`` to both backprop
    (``torchdiffeq.odeint``) and the symplectic adjoint to compare their gradients exactly.

    Why: backprop through ``torchdiffeq.odeint`` also differentiates torchdiffeq's choice of the initial step
    (``_select_initial_step`` depends on ``y0`` and ``f``), while every adjoint method, this one included, holds
    step sizes constant; with ``first_step`` fixed both take the same steps and agree to rounding.

    Computed by torchdiffeq's own ``_select_initial_step`` on its normalised inputs (tuple states, decreasing
    times), under ``no_grad``: one evaluation of ``func`` at ``t[0]`` and one a small step later. Arguments as in
    ``torchdiffeq.odeint`` (same defaults); a ``first_step`` already in ``options`` is returned as it is.

    Returns:
        The step size, a Python float (exact: torchdiffeq's time dtype is float64 unless ``options`` sets it).
    Raises:
        ValueError: for a fixed-grid method (its steps are ``step_size`` or the grid of ``t``, no first step).
    """
    check_torchdiffeq_once()
    method = "dopri5" if method is None else method
    solver = SOLVERS.get(method)
    if not (isinstance(solver, type) and issubclass(solver, RKAdaptiveStepsizeODESolver)):
        adaptive = [name for name, cls in SOLVERS.items()
                    if isinstance(cls, type) and issubclass(cls, RKAdaptiveStepsizeODESolver)]
        raise ValueError(f"initial_step needs an adaptive Runge-Kutta method ({', '.join(adaptive)}), got "
                         f"method={method!r}: other methods choose no first step (fixed grids step by step_size or "
                         "the times t).")
    with torch.no_grad():
        return float(selected_initial_step(func, y0, t, rtol, atol, method, options))


def torchdiffeq_host(func: Callable, method: str | type, rtol: float | torch.Tensor, atol: float | torch.Tensor,
                     options: dict, *, rule: FixedGridRule | None = None, store_stages: bool = False) -> HostSolver:
    """The core's :class:`~symadj_plugins.core.adjoint.HostSolver` for one torchdiffeq solve, for code that drives
    the core itself (``compat``): ``host.solve(y0, t)`` runs torchdiffeq's solver and records its accepted steps.

    Args:
        func, rtol, atol, options: as torchdiffeq's ``_check_inputs`` returns them (flat state, increasing time,
            ``func`` taking ``perturb=``).
        method: a name in torchdiffeq's ``SOLVERS`` or a solver class.
        rule: for a ``FixedGridODESolver`` subclass torchdiffeq does not ship, how it steps.
        store_stages: as in :func:`odeint_symplectic_adjoint`.

    Besides the ``HostSolver`` methods, the host's ``func``, ``adaptive``, ``tableau`` and, after ``solve``,
    ``solver`` (torchdiffeq's solver object that took the steps) are part of this contract.
    """
    check_torchdiffeq_once()
    return _TorchdiffeqHost(func, method, rtol, atol, options, memory_budget=_memory_budget(None, None, store_stages),
                            rule=rule)


def _check_method(method: str | None) -> str:
    """The method's name (torchdiffeq's default ``"dopri5"`` for ``None``), refusing ``"symplectic"`` and the
    methods of torchdiffeq's ``SOLVERS`` that are not explicit Runge–Kutta methods."""
    method = "dopri5" if method is None else method
    if method == SYMPLECTIC:
        raise ValueError(_SYMPLECTIC_IS_NOT_A_METHOD)
    if method in SOLVERS and method not in supported_methods():
        raise ValueError(f"method={method!r} is not supported by the symplectic adjoint, which needs an explicit "
                         f"Runge-Kutta method; supported: {', '.join(supported_methods())}.")
    # A name torchdiffeq does not know (a typo, a method of a newer torchdiffeq) gets torchdiffeq's own
    # "Invalid method" from _check_inputs.
    return method


def _memory_budget(memory_budget: Any, adjoint: SymplecticAdjoint | None, store_stages: bool | None) -> MemoryBudget:
    """The budget from the arguments of :func:`odeint_symplectic_adjoint`, else the options in effect."""
    given = [name for name, value in (("memory_budget", memory_budget), ("adjoint", adjoint),
                                      ("store_stages", store_stages)) if value is not None]
    if len(given) > 1:
        raise TypeError(f"pass one of memory_budget, adjoint and store_stages, not {' and '.join(given)}")
    if adjoint is not None:
        if not isinstance(adjoint, SymplecticAdjoint):
            raise TypeError(f"adjoint must be a symadj_plugins.SymplecticAdjoint, got {type(adjoint).__name__}")
        return adjoint.budget
    if store_stages is not None:
        return MemoryBudget.parse("stages" if store_stages else "trajectory")
    if memory_budget is not None:
        return MemoryBudget.parse(memory_budget)
    return current_options().budget


def _adjoint_params(func: Callable, adjoint_params: Iterable[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise ValueError("func must be an instance of nn.Module to find its parameters; alternatively pass "
                             "them explicitly as `adjoint_params` (use adjoint_params=() if there are none).")
        adjoint_params = find_parameters(func)
    return parameters_requiring_grad(adjoint_params)
