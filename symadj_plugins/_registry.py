"""``register()`` / ``unregister()``: hook the symplectic adjoint into the host libraries' public entry points.

Both are idempotent. Only attributes listed here are touched, and ``unregister()`` puts back exactly the
objects that were there before.
"""

from __future__ import annotations

import importlib.util

_installed: dict[str, list[tuple[object, str, object]]] = {}  # host -> [(owner, attribute, original)]
_MISSING = object()


def register() -> None:
    """Makes ``adjoint_method="symplectic"`` work in ``torchdiffeq.odeint_adjoint`` (and, when torchdyn is
    installed, ``sensitivity="symplectic_adjoint"`` in torchdyn). A missing host library is not an error.

    Code that did ``from torchdiffeq import odeint_adjoint`` *before* ``register()`` holds torchdiffeq's own
    function; calling it with ``adjoint_method="symplectic"`` raises an error that says so. Call
    ``register()`` first, or import ``symadj_plugins.torchdiffeq.odeint_adjoint`` directly.
    """
    if "torchdiffeq" not in _installed and importlib.util.find_spec("torchdiffeq") is not None:
        _installed["torchdiffeq"] = _register_torchdiffeq()
    if "torchdyn" not in _installed and importlib.util.find_spec("torchdyn") is not None:
        from . import torchdyn as _torchdyn_adapter
        _installed["torchdyn"] = _torchdyn_adapter.register()


def unregister() -> None:
    """Restores every attribute ``register()`` replaced. Safe to call when nothing is registered."""
    for host in list(_installed):
        for owner, name, original in reversed(_installed.pop(host)):
            if original is _MISSING:
                delattr(owner, name) if not isinstance(owner, dict) else owner.pop(name, None)
            elif isinstance(owner, dict):
                owner[name] = original
            else:
                setattr(owner, name, original)


def is_registered(host: str = "torchdiffeq") -> bool:
    """Whether ``register()`` is in effect for ``host`` (``"torchdiffeq"`` or ``"torchdyn"``)."""
    return host in _installed


def _register_torchdiffeq() -> list[tuple[object, str, object]]:
    import torchdiffeq
    from torchdiffeq._impl.odeint import SOLVERS

    from . import torchdiffeq as adapter

    changes = [(torchdiffeq, "odeint_adjoint", torchdiffeq.odeint_adjoint),
               (SOLVERS, adapter.SYMPLECTIC, SOLVERS.get(adapter.SYMPLECTIC, _MISSING))]
    torchdiffeq.odeint_adjoint = adapter.odeint_adjoint
    # A name bound before register() still reaches torchdiffeq's own odeint_adjoint, which looks
    # adjoint_method up in SOLVERS: this entry turns its "Invalid method" into an explanation.
    SOLVERS[adapter.SYMPLECTIC] = _StaleOdeintAdjoint
    return changes


class _StaleOdeintAdjoint:
    @classmethod
    def valid_callbacks(cls):  # torchdiffeq >= 0.2.4 asks the solver class for its callbacks before building it
        cls()

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "adjoint_method='symplectic' reached torchdiffeq's own odeint_adjoint, which solves the continuous "
            "adjoint. The name odeint_adjoint was probably imported (`from torchdiffeq import odeint_adjoint`) "
            "before symadj_plugins.register(). Call register() before that import, call "
            "torchdiffeq.odeint_adjoint(...), or use symadj_plugins.torchdiffeq.odeint_adjoint.")
