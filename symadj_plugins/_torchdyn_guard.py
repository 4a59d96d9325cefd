"""Before ``register()``: torchdyn's ``sensitivity="symplectic_adjoint"`` fails with a message naming the fix.

torchdyn's sensitivity dispatch (``ODEProblem._autograd_func``) returns ``None`` for a value it does not know, so a
model built with ``sensitivity="symplectic_adjoint"`` (or unpickled in a fresh process) and solved without
``symadj_plugins.register()`` fails with "'NoneType' object is not callable". Once ``symadj_plugins`` is imported,
this guard wraps that dispatch, as soon as ``torchdyn.core.problems`` is imported (or at once if it already is),
to raise a ``RuntimeError`` saying to call ``register()``; every other sensitivity goes to torchdyn unchanged.
``register()`` wraps on top of the guard, and ``unregister()`` removes both (:func:`remove_guard`): torchdyn's own
``_autograd_func`` objects are back, and ``sys.meta_path`` is as it was before ``import symadj_plugins``. Without
``import symadj_plugins`` nothing of ours runs, and torchdyn's own error stands. This is the only effect importing
the package has on a host library (stated in the package docstring).

This module imports nothing from torchdyn itself, so that ``import symadj_plugins`` stays cheap.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any

_TARGET = "torchdyn.core.problems"
_CLASSES = ("ODEProblem", "MultipleShootingProblem")
SENSITIVITY = "symplectic_adjoint"  # symadj_plugins.torchdyn.SENSITIVITY, without importing torchdyn

NOT_REGISTERED = (
    f"sensitivity='{SENSITIVITY}' is provided by symadj-plugins, which is installed but not registered with "
    "torchdyn: call symadj_plugins.register() once before solving (a model built or unpickled before that call "
    "works once it is made).")


def install_guard() -> None:
    """Guards torchdyn's dispatch now if torchdyn is imported, otherwise when it is. Idempotent."""
    module = sys.modules.get(_TARGET)
    if module is not None:
        _guard(module)
    elif not any(isinstance(finder, _GuardOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())


def remove_guard() -> None:
    """Undoes :func:`install_guard`: torchdyn's own dispatch functions back (the very objects), the import hook gone."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _GuardOnImport)]
    problems = sys.modules.get(_TARGET)
    for name in _CLASSES if problems is not None else ():
        cls = getattr(problems, name, None)
        current = getattr(cls, "__dict__", {}).get("_autograd_func")
        if getattr(current, "_symadj_guard", False):
            cls._autograd_func = current.__wrapped__


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the standard path finder find ``torchdyn.core.problems`` and guards it once
    executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _TARGET:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:  # pragma: no cover - already removed
            pass
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # not a plain file: let the other finders import it, unguarded
        exec_module = spec.loader.exec_module

        def exec_and_guard(module):
            exec_module(module)
            _guard(module)

        spec.loader.exec_module = exec_and_guard
        return spec


def _guard(problems: Any) -> None:
    for name in _CLASSES:
        cls = getattr(problems, name, None)
        original = getattr(cls, "__dict__", {}).get("_autograd_func")
        if original is None or getattr(original, "_symadj_guard", False):
            continue  # a torchdyn without this dispatch: the adapter's install() reports it
        cls._autograd_func = _guarded(original)


def _guarded(original: Callable) -> Callable:
    @functools.wraps(original)
    def _autograd_func(self):
        if getattr(self, "sensalg", None) == SENSITIVITY:
            raise RuntimeError(NOT_REGISTERED)
        return original(self)

    _autograd_func._symadj_guard = True
    return _autograd_func
