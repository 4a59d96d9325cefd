"""Rewrite existing neural-ODE code to the symplectic adjoint: ``python -m symadj_plugins.migrate PATH... [--write]``.

Built on libcst, so formatting and comments survive. Three starting points are understood:

torchdiffeq
    ``from torchdiffeq import odeint_adjoint`` becomes ``from symadj_plugins.torchdiffeq import odeint_adjoint``
    (a drop-in for torchdiffeq's) and its calls get ``adjoint_method="symplectic"``; ``torchdiffeq.odeint_adjoint(...)``
    becomes ``symadj_plugins.torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic")`` with
    ``import symadj_plugins.torchdiffeq`` added. ``adjoint_rtol``, ``adjoint_atol`` and ``adjoint_options`` are
    removed (a comment above the statement records them): the symplectic adjoint solves no second ODE.
    ``odeint_adjoint`` used as a value (assigned, returned, passed as an argument) becomes
    ``functools.partial(odeint_adjoint, adjoint_method="symplectic")``, which takes the same arguments;
    ``functools.partial(odeint_adjoint, ...)`` gets the keyword itself; passed as ``odeint_interface`` to
    ``torchdiffeq.odeint_event`` it is wrapped the same way (the symplectic adjoint supports ``event_fn``).
torchdyn
    ``NeuralODE(..., sensitivity="adjoint" | "interpolated_adjoint")`` (and ``ODEProblem``) get
    ``sensitivity="symplectic_adjoint"``; ``solver_adjoint``, ``atol_adjoint``, ``rtol_adjoint`` and ``seminorm``
    are removed with a comment; ``integral_loss`` and everything else stay.
torch_symplectic_adjoint (the paper's package)
    ``odeint_symplectic_adjoint`` moves to ``symadj_plugins.torchdiffeq`` and ``odeint`` to ``torchdiffeq``, with
    method names translated (the paper's ``rk38`` is torchdiffeq's ``rk4``). Where that cannot be done exactly
    (the classical ``rk4``, which torchdiffeq lacks; a method that is not a string literal; ``**kwargs``; the
    function used other than by calling it) the code is left on the ``torch_symplectic_adjoint`` compat package
    that symadj-plugins installs. ``odeint_adjoint``, ``odeint_checkpoint`` and ``odeint_onecheckpoint`` have no
    symadj-plugins counterpart and stay there too.

Jupyter notebooks (``.ipynb``) are migrated too: their code cells together, IPython magics and shell lines kept
as they are (one that mentions an adjoint is reported), outputs and metadata kept; a cell that does not parse
(``%%bash``) is skipped and reported. A method ``callback_*_adjoint`` defined in a file is
reported: torchdiffeq calls it only during the continuous adjoint's backward solve.

Conservative by design: only names that resolve (through imports and aliases, scope by scope) to those functions
are touched; anything it cannot follow is left alone and reported (a call through a name whose import it cannot
see, with ``sensitivity="adjoint"`` or named ``odeint_adjoint``, too). Without ``--write`` it prints a unified diff
and changes nothing. A file that cannot be parsed is reported and left untouched, and a file is written only
whole (a temporary file renamed over it), never partially. Exit status: 0 when every file was processed and
every continuous adjoint switched; 1 when a file could not be processed (unparsable, unreadable, missing) or a
place was left on a continuous adjoint (each reported as ``not migrated`` with its line); 2 for a usage error or
when libcst is not installed.

Layout: :mod:`.planner` decides every change on the original tree (:mod:`.plans` holds the per-library rules),
:mod:`.applier` makes them, :mod:`.source` ties the two for one source text, :mod:`.files` (``.py`` files and
directories) and :mod:`.notebook` migrate files, sharing :mod:`.result` (the outcome, reading and writing),
:mod:`.cli` is the command line. Imports run one way: cli → files → notebook → source → planner → plans.
"""

from __future__ import annotations

import importlib

__all__ = ["migrate_source", "migrate_file", "migrate_notebook", "main", "Result", "Note"]

# Imported on first use, so that without libcst ``python -m symadj_plugins.migrate`` can still say what is missing.
_LAZY = {"migrate_source": "source", "migrate_file": "files", "migrate_notebook": "notebook", "main": "cli",
         "Result": "result", "Note": "notes", "_Applier": "applier", "_Planner": "planner"}

INSTALL_HINT = ("pip install 'symadj-plugins[migrate]' (from a checkout: pip install -e '.[migrate]'), "
                "or pip install libcst")


def missing_libcst_message() -> str | None:
    """Why the codemod cannot run (libcst is not importable), or ``None`` if it can."""
    try:
        importlib.import_module("libcst")
    except ImportError:
        return f"the codemod needs libcst, which is not installed: {INSTALL_HINT}"
    return None


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    message = missing_libcst_message() if module != "notes" else None
    if message is not None:
        raise ModuleNotFoundError(f"symadj_plugins.migrate: {message}", name="libcst")
    return getattr(importlib.import_module(f".{module}", __name__), name)
