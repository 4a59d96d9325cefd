"""How an adapter reports a host library whose internals are not what it was written against: the one error
message (:func:`internals_error`, :func:`check_internals`) and :func:`parameter_names` for the signature checks.

A leaf module: the adapters import it, and it imports nothing of the package.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["check_internals", "internals_error", "parameter_names"]


def internals_error(library: str, tested: str, what: str, advice: str) -> RuntimeError:
    """The error every adapter raises when its host library's internals are not what it was written against.

    Args:
        library: the host's distribution name (``"torchdyn"``), whose installed version the message names.
        tested: the version(s) the adapter was written against, as text.
        what: what differs, a clause.
        advice: what the user can do instead, a sentence.
    """
    try:
        installed = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout of the host
        installed = "(unknown version)"
    return RuntimeError(f"symadj_plugins' {library} adapter was written against {library} {tested}, and the "
                        f"installed {library} {installed} does not match what it expects: {what}. {advice}")


def check_internals(library: str, tested: str, problems: list[str], advice: str) -> None:
    """Raises :func:`internals_error` listing ``problems`` (an adapter's ``_check_<host>()`` result), if any."""
    if problems:
        raise internals_error(library, tested, "; ".join(problems), advice)


def parameter_names(fn: Callable) -> list[str]:
    """The names of ``fn``'s parameters, in order (what the adapters' checks compare with the expected ones)."""
    return list(inspect.signature(fn).parameters)



def check_field_output(out: Any, state: torch.Tensor, *, called: str, returns: str = "", state_name: str = "",
                       fix: str = "") -> None:
    """Raises ``TypeError``/``ValueError`` unless the vector field's output ``out`` is a tensor shaped and typed like
    ``state`` (an adapter's first evaluation). ``called`` names the call, ``returns`` adds to what it must return,
    ``state_name`` names the state, ``fix`` ends the message with what to do."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{called} must return a Tensor{returns}, got {type(out).__name__}")
    if out.shape != state.shape or out.dtype != state.dtype:
        raise ValueError(f"{called} returned shape {tuple(out.shape)} and dtype {out.dtype}, but the state{state_name} "
                         f"has shape {tuple(state.shape)} and dtype {state.dtype}{fix}")
