"""The record of one forward solve that the backward sweep replays.

Memory held between forward and backward is this object: one state per accepted step (``O(N·|y|)``), a
few scalars per step, and for hosts that carry a stage value from one step into the next without it being
``f(t_{n+1}, y_{n+1})`` (torchdiffeq's ``fehlberg2`` and ``adaptive_heun``), that value too.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StageCall:
    """Where a host library evaluates one stage: the time and the extra keyword arguments of its call.

    ``kwargs`` is a tuple of ``(name, value)`` pairs (hashable, host-side only, never a tensor value that
    would need synchronising).
    """

    t: torch.Tensor
    kwargs: tuple[tuple[str, Hashable], ...] = ()


@dataclass
class Trajectory:
    """Accepted steps of a solve, in the host library's normalised (increasing-time) coordinates.

    Attributes:
        states: ``N + 1`` tensors ``y_0 ... y_N``, each shaped like the state.
        t0, t1, dt: ``(N,)`` tensors: start, end and size of each accepted step, in the host's time dtype
            (``dt`` is the size the host used, which need not equal ``t1 - t0`` to the last bit).
        carried: per step, the first-stage value ``k_1`` when the host carried it over from the previous
            step's last stage instead of evaluating ``f`` at ``(t_n, y_n)``; ``None`` otherwise.
        outputs_in_step: step index -> indices of the requested output times the host produced inside
            that step (by dense output). Output 0 is ``y_0`` itself and belongs to no step.
        host_data: anything else the adapter wants back in the backward pass (host-side, no tensors
            that must be freed with the graph).
        stage_inputs: optionally, per step, the ``(s, *state_shape)`` stage inputs ``Y_i`` the host's forward
            pass evaluated ``f`` at. Holding them costs ``N·s·|y|`` instead of ``N·|y|`` and spares the
            backward pass the recomputation of every step (backprop + 1 forward instead of + 2).
    """

    states: list[torch.Tensor]
    t0: torch.Tensor
    t1: torch.Tensor
    dt: torch.Tensor
    carried: list[torch.Tensor | None]
    outputs_in_step: dict[int, list[int]]
    host_data: dict = field(default_factory=dict)
    stage_inputs: list[torch.Tensor] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.states) - 1

    def state_bytes(self) -> int:
        """Bytes of state-sized tensors held (states and carried stages)."""
        tensors = [*self.states, *(c for c in self.carried if c is not None), *(self.stage_inputs or ())]
        return sum(x.numel() * x.element_size() for x in tensors)

    # The autograd Function keeps the tensors in ``ctx.save_for_backward`` so that PyTorch frees them
    # after backward (unless ``retain_graph=True``), exactly like the graph of backprop would be.
    def pack(self) -> tuple[list[torch.Tensor], tuple]:
        carried_at = [i for i, c in enumerate(self.carried) if c is not None]
        stage_inputs = self.stage_inputs or []
        tensors = [self.t0, self.t1, self.dt, *self.states, *(self.carried[i] for i in carried_at), *stage_inputs]
        meta = (len(self.states), carried_at, self.outputs_in_step, self.host_data, self.stage_inputs is not None)
        return tensors, meta

    @classmethod
    def unpack(cls, tensors: Sequence[torch.Tensor], meta: tuple) -> Trajectory:
        num_states, carried_at, outputs_in_step, host_data, has_stage_inputs = meta
        t0, t1, dt = tensors[:3]
        states = list(tensors[3:3 + num_states])
        rest = tensors[3 + num_states:]
        carried: list[torch.Tensor | None] = [None] * (num_states - 1)
        for i, value in zip(carried_at, rest):
            carried[i] = value
        stage_inputs = list(rest[len(carried_at):]) if has_stage_inputs else None
        return cls(states, t0, t1, dt, carried, outputs_in_step, host_data, stage_inputs)
