"""One vector–Jacobian product through PyTorch's autograd engine, for the backward sweep's thousands of them.

``torch.autograd.grad`` normalises its arguments, looks for ``__torch_function__`` overrides and checks every
cotangent's shape in Python on each call: 8–15 µs per call within the sweep on a CPU (the benchmark's ``steps``
field), up to 40 µs on a tiny graph, paid once per stage (4 000 times for 1 000 rk4 steps). The sweep's arguments
are already in the engine's form (tuples of plain tensors whose cotangents have the outputs' shapes), so it calls
``torch.autograd.graph._engine_run_backward`` (the function ``torch.autograd.grad`` itself ends in) directly. The
engine still checks and casts the cotangents (shape, dtype, device) as it does for ``grad``.

That name is private to PyTorch: it is used only where it exists, and only for plain tensors (a tensor subclass may
override ``grad`` through ``__torch_function__``); otherwise the sweep calls ``torch.autograd.grad``.
``tests/test_core.py`` checks that the installed torch has it and that both paths give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["vjp", "ENGINE_ENTRY_POINT"]

_engine_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)
ENGINE_ENTRY_POINT = _engine_run_backward is not None  # tested: True on the supported torch versions
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_EDGE = getattr(torch.autograd.graph, "GradientEdge", ())


def vjp(outputs: Sequence, cotangents: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
        retain_graph: bool = False) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain_graph, allow_unused=True)``.

    Args:
        outputs: tensors (or ``GradientEdge``s) that require grad.
        cotangents: one per output, of its shape.
        inputs: the tensors to differentiate with respect to.
    Returns:
        one gradient per input, ``None`` where the outputs do not depend on it.
    """
    if _engine_run_backward is None or not _all_plain(outputs, inputs):
        return torch.autograd.grad(tuple(outputs), tuple(inputs), tuple(cotangents), retain_graph=retain_graph,
                                   allow_unused=True)
    # (outputs, grad_outputs, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad)
    return _engine_run_backward(tuple(outputs), tuple(cotangents), retain_graph, False, tuple(inputs), True, False)


def _all_plain(outputs: Sequence, inputs: Sequence[torch.Tensor]) -> bool:
    return all(type(x) in _PLAIN or (_EDGE and isinstance(x, _EDGE)) for x in outputs) and \
        all(type(x) in _PLAIN for x in inputs)
