"""``register()`` / ``unregister()``: hook the symplectic adjoint into the host libraries' public entry points.

What is patched lives with each adapter: ``symadj_plugins.<host>.install()`` replaces what it needs and returns
the ``(owner, attribute, original)`` triples; this module only keeps those undo lists and names no host internals.
Both functions are idempotent and atomic (one lock around both), and ``unregister()`` puts back exactly the
objects that were there before ``import symadj_plugins`` (the torchdyn guard of :mod:`._torchdyn_guard` included).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

from ._torchdyn_guard import remove_guard

_HOSTS = ("torchdiffeq", "torchdyn")  # host library; its adapter is symadj_plugins.<host>
_lock = threading.Lock()
_installed: dict[str, list[tuple[object, str, object]]] = {}  # host -> [(owner, attribute, original)]


def register() -> None:
    """Makes ``adjoint_method="symplectic"`` work in ``torchdiffeq.odeint_adjoint`` (and, when torchdyn is
    installed, ``sensitivity="symplectic_adjoint"`` in torchdyn). A missing host library is not an error; one
    whose internals differ from what its adapter expects raises ``RuntimeError`` naming its version.

    Code that did ``from torchdiffeq import odeint_adjoint`` *before* ``register()`` holds torchdiffeq's own
    function; calling it with ``adjoint_method="symplectic"`` raises an error that says so. Call
    ``register()`` first, or import ``symadj_plugins.torchdiffeq.odeint_adjoint`` directly.
    """
    with _lock:
        for host in _HOSTS:
            if host not in _installed and importlib.util.find_spec(host) is not None:
                adapter = importlib.import_module(f"{__package__}.{host}")
                _installed[host] = adapter.install()


def unregister() -> None:
    """Restores every attribute ``register()`` replaced, and removes the guard ``import symadj_plugins`` put on
    torchdyn's dispatch: the host libraries hold the very objects they held before the import. Safe to call when
    nothing is registered."""
    with _lock:
        for host in reversed(list(_installed)):
            for owner, name, original in reversed(_installed.pop(host)):
                setattr(owner, name, original)
        remove_guard()


def is_registered(host: str = "torchdiffeq") -> bool:
    """Whether ``register()`` is in effect for ``host`` (``"torchdiffeq"`` or ``"torchdyn"``)."""
    return host in _installed
