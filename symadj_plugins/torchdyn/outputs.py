"""Which rows torchdyn returns, as the core's output slots, and the integral-loss accumulator.

Output slot ``j`` has time ``t_core[j]`` (torchdyn's normalised, increasing ``t_span``). For fixed-step solvers slot
``j`` is the state after step ``j``, of which torchdyn returns those at ``save_at``; for adaptive ones the slots are
exactly torchdyn's returned rows. When torchdyn returns only some slots, the core returns only those
(``returned_slots``), so that the backward pass gets no cotangent of the others (one state per step more if it did).

With an ``integral_loss``, the core's state is the flat vector ``[x.flatten(), q]`` whose last entry ``q``
accumulates the loss; its cotangent (one, at the final state) is added by :func:`_user_solution`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._internals import _internals_error
from .recording import _Step


@dataclass
class _Slots:
    """The output slots of one solve.

    Attributes:
        user: the slots torchdyn returns, in order.
        returned: the slots the core's Function returns, in order (``None``: all).
        final: with an integral loss, the slot of the final state, whose cotangent carries the loss (else ``-1``).
    """

    user: list[int]
    returned: list[int] | None = None
    final: int = -1


def _fixed_outputs(save_at: torch.Tensor, sol: torch.Tensor, steps: Sequence[_Step],
                   all_states: list[torch.Tensor | None]) -> tuple[dict[int, list[int]], _Slots]:
    """``(outputs_in_step, slots)`` of a fixed-step solve that returned ``sol`` (``(rows, *x.shape)``) and whose
    ``N + 1`` states are ``all_states`` (``None`` where not kept): the slots each step outputs, and which slots
    torchdyn returns."""
    # _fixed_odeint: save the state at step end t iff torch.isclose(t, save_at).sum(); it returns save_at.
    ends = [steps[0].t, *(step.t + step.dt for step in steps)]
    rows = [n for n, end in enumerate(ends) if torch.isclose(end, save_at).sum()]
    if len(rows) != len(sol) or any(all_states[n] is not None and not torch.equal(sol[i], all_states[n])
                                    for i, n in enumerate(rows)):
        raise _internals_error("the rows _fixed_odeint returned are not the step ends matching save_at")
    outputs_in_step = {n - 1: [n] for n in rows if n > 0}
    # The trajectory keeps every state as recorded, not views of torchdyn's solution: the caller may write into
    # the solution before backward(), as with backprop.
    if rows != list(range(len(all_states))):  # only some step ends returned: the core returns those rows
        return outputs_in_step, _Slots(user=rows, returned=rows)
    return outputs_in_step, _Slots(user=rows)


def _adaptive_outputs(sol: torch.Tensor, states: list[torch.Tensor | None], t1: torch.Tensor,
                      points: Sequence[float], interpolates: bool) -> tuple[dict[int, list[int]], _Slots]:
    """``(outputs_in_step, slots)`` of an adaptive solve that returned ``sol`` (``(len(points) + 1, *x.shape)``),
    given its ``N + 1`` states (``None`` where not kept), the step ends ``t1`` (``(N,)``) and the ``t_span`` points
    after the first, normalised (``points``); ``interpolates``: whether torchdyn used an interpolator."""
    # _adaptive_odeint, on each accepted step [t, t + dt], for the next unreached t_span point p:
    # with an interpolator, interpolate every p < t + dt; then output x_new if t + dt == p.
    ends = t1.tolist()
    outputs_in_step: dict[int, list[int]] = {}
    endpoint_rows: list[tuple[int, int]] = []
    c = 0
    for n, end in enumerate(ends):
        if interpolates:
            while c < len(points) and end > points[c]:
                outputs_in_step.setdefault(n, []).append(c + 1)
                c += 1
        if c < len(points) and end == points[c]:
            outputs_in_step.setdefault(n, []).append(c + 1)
            endpoint_rows.append((c + 1, n))
            c += 1
    if len(sol) != c + 1 or any(states[n + 1] is not None and not torch.equal(sol[j], states[n + 1])
                                for j, n in endpoint_rows):
        raise _internals_error("the rows _adaptive_odeint returned do not match its accepted steps")
    return outputs_in_step, _Slots(user=list(range(len(sol))))


def _with_accumulator(v: torch.Tensor) -> torch.Tensor:
    """``[v.flatten(), 0]``: a state (or stage) of the system augmented with the integral-loss accumulator."""
    return torch.cat([v.reshape(-1), v.new_zeros(1)])


def _augment(solution: torch.Tensor, states: list[torch.Tensor], outputs_in_step: dict[int, list[int]],
             slots: _Slots, adaptive: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Adds the integral-loss accumulator ``q`` as a last state entry: returns the solution (``(rows, D + 1)``, with
    the final state's row added where torchdyn's rows lack it) and the states (``(D + 1,)`` each); sets
    ``slots.final`` (and ``slots.returned``) and adds the final slot to the last step's outputs. The accumulator's
    values are never read (nothing depends on ``q``), so they are stored as zeros; only its cotangent matters."""
    states = [None if v is None else _with_accumulator(v) for v in states]
    num = solution.shape[0]
    solution = torch.cat([solution.reshape(num, -1), solution.new_zeros(num, 1)], dim=1)
    last_step = len(states) - 2
    if adaptive:  # torchdyn's rows need not include the final state: add a slot for it
        solution = torch.cat([solution, states[-1][None]])
        slots.final = num
    else:  # slot N is the final state
        slots.final = len(states) - 1
        if slots.returned is not None and slots.final not in slots.returned:
            # Not among torchdyn's rows: return it too, its cotangent carries the loss.
            solution = torch.cat([solution, states[-1][None]])
            slots.returned = [*slots.returned, slots.final]
    step_slots = outputs_in_step.setdefault(last_step, [])
    if slots.final not in step_slots:
        step_slots.append(slots.final)
    return solution, states


def _user_solution(output: torch.Tensor, slots: _Slots, integral_loss: bool, x_shape: torch.Size) -> torch.Tensor:
    """torchdyn's ``sol`` (``(len(slots.user), *x_shape)``) from the rows the core returned (differentiably)."""
    returned = range(output.shape[0]) if slots.returned is None else slots.returned
    row_of = {slot: row for row, slot in enumerate(returned)}
    if integral_loss:
        if output.requires_grad:
            final_row = row_of[slots.final]

            def add_integral_cotangent(grad):
                grad = grad.clone()
                grad[final_row, -1] += 1
                return grad

            output.register_hook(add_integral_cotangent)
        output = output[:, :-1]
    picked = [row_of[slot] for slot in slots.user]
    if picked != list(range(output.shape[0])):
        output = output[picked]
    return output.reshape(len(picked), *x_shape)
