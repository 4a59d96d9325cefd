"""Registration: :func:`install` hooks ``adjoint_method="symplectic"`` into torchdiffeq (``symadj_plugins.register()``
calls it; ``unregister()`` undoes what it returns)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torchdiffeq

from ._internals import _modules, check_torchdiffeq_once
from .api import _SYMPLECTIC_IS_NOT_A_METHOD, SYMPLECTIC, odeint_adjoint

__all__ = ["install"]

_STALE_ODEINT_ADJOINT = (
    f"adjoint_method={SYMPLECTIC!r} reached torchdiffeq's own odeint_adjoint, which solves the continuous "
    "adjoint. The name odeint_adjoint was probably imported (`from torchdiffeq import odeint_adjoint`) "
    "before symadj_plugins.register(). Call register() before that import, call "
    "torchdiffeq.odeint_adjoint(...), or use symadj_plugins.torchdiffeq.odeint_adjoint.")


def install() -> list[tuple[object, str, object]]:
    """Hooks ``adjoint_method="symplectic"`` into torchdiffeq; returns the ``(owner, attribute, original)`` triples
    it replaced (the undo list ``symadj_plugins.unregister()`` applies). Use ``symadj_plugins.register()``.

    Raises ``RuntimeError`` naming the installed torchdiffeq version, before patching anything, if its internals
    are not what this adapter expects. torchdiffeq's ``SOLVERS`` is not touched: ``"symplectic"`` never appears
    among its methods.
    """
    check_torchdiffeq_once()
    odeint_module, adjoint_module = _modules()
    changes = [(torchdiffeq, "odeint_adjoint", torchdiffeq.odeint_adjoint),
               (odeint_module, "_check_inputs", odeint_module._check_inputs),
               (adjoint_module, "_check_inputs", adjoint_module._check_inputs),
               (adjoint_module, "odeint", adjoint_module.odeint)]
    torchdiffeq.odeint_adjoint = odeint_adjoint
    odeint_module._check_inputs = _refusing_symplectic_method(odeint_module._check_inputs)
    adjoint_module._check_inputs = _refusing_symplectic_method(adjoint_module._check_inputs)
    # A name bound before register() still reaches torchdiffeq's own odeint_adjoint, whose backward pass solves
    # the adjoint ODE with odeint(..., method=adjoint_method): there, "symplectic" gets an explanation.
    adjoint_module.odeint = _explaining_stale_adjoint(adjoint_module.odeint)
    return changes


def _refusing_symplectic_method(check_inputs: Callable) -> Callable:
    @functools.wraps(check_inputs)
    def _check_inputs(func, y0, t, rtol, atol, method, *args, **kwargs):
        if method == SYMPLECTIC:
            raise ValueError(_SYMPLECTIC_IS_NOT_A_METHOD)
        return check_inputs(func, y0, t, rtol, atol, method, *args, **kwargs)

    return _check_inputs


def _explaining_stale_adjoint(odeint: Callable) -> Callable:
    @functools.wraps(odeint)
    def _odeint(*args, method=None, **kwargs):
        if method == SYMPLECTIC:
            raise RuntimeError(_STALE_ODEINT_ADJOINT)
        return odeint(*args, method=method, **kwargs)

    return _odeint
