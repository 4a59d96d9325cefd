"""Input checks shared by the adapters and ``compat``: the output times, and the tensors to differentiate.

Each adapter decides *where* its parameters come from (torchdiffeq: ``adjoint_params`` or ``func``'s parameters;
torchdyn: the vector field's and the integral loss's); these functions decide, in one place, what a valid time
grid is and which of those tensors the gradient is taken with respect to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["check_times", "parameters_requiring_grad"]


def check_times(t: Any, name: str = "t", min_points: int = 1) -> None:
    """Raises unless ``t`` is a 1-D floating-point tensor of at least ``min_points`` strictly monotonic times.

    Args:
        t: the output times, shape ``(T,)``, increasing or decreasing.
        name: the argument's name in the caller's API (``"t"``, ``"t_span"``), for the messages.
        min_points: the fewest times the caller accepts (torchdiffeq: 1, torchdyn: 2, start and end).
    Raises:
        TypeError: ``t`` is not a floating-point tensor.
        ValueError: ``t`` is not 1-D, too short, or not strictly increasing or strictly decreasing.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D floating point torch.Tensor of times, got {type(t).__name__}")
    if not torch.is_floating_point(t):
        raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}; e.g. torch.linspace(0, 1, 10)")
    if t.ndim != 1 or len(t) < min_points:
        least = {1: "one time", 2: "two times (start and end)"}.get(min_points, f"{min_points} times")
        raise ValueError(f"{name} must be a 1-D tensor of at least {least}, got shape {tuple(t.shape)}, e.g. "
                         "torch.linspace(0, 1, 2)")
    if len(t) > 1:
        diff = t[1:] - t[:-1]
        if not (bool((diff > 0).all()) or bool((diff < 0).all())):
            raise ValueError(f"{name} must be strictly increasing or strictly decreasing (no repeated or "
                             f"out-of-order times), got {t.detach().cpu().tolist()}")


def parameters_requiring_grad(*sources: torch.nn.Module | Iterable[torch.Tensor] | None,
                              argument: str = "adjoint_params") -> tuple[torch.Tensor, ...]:
    """The tensors to differentiate with respect to: those of ``sources`` that require grad, each once, in order.

    A module contributes its ``parameters()``, an iterable its items, ``None`` nothing. A tensor listed twice
    is kept once: passed twice to an ``autograd.Function``, its gradient would be added twice.

    Raises:
        TypeError: an item is not a tensor (named by ``argument`` in the message).
    """
    seen: set[int] = set()
    params = []
    for source in sources:
        if source is None:
            continue
        items = source.parameters() if isinstance(source, torch.nn.Module) else source
        for p in items:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{argument} must be tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return tuple(params)
