"""The record of one forward solve that the backward sweep replays.

Memory held between forward and backward is this object: one state per accepted step (``O(N·|y|)``), a
few scalars per step, and for hosts that carry a stage value from one step into the next without it being
``f(t_{n+1}, y_{n+1})`` (torchdiffeq's ``fehlberg2`` and ``adaptive_heun``), that value too. When the field
draws random numbers, also the generator state each replayed evaluation must start from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import KeptGraph
from .replay import RngState


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
        states: ``N + 1`` entries ``y_0 ... y_N``, each shaped like the state, or ``None`` for a state the memory
            budget did not keep (recomputed in the backward pass: ``core.checkpointing``); ``y_0`` and ``y_N`` are
            always kept.
        t0, t1, dt: ``(N,)`` tensors: start, end and size of each accepted step, in the host's time dtype
            (``dt`` is the size the host used, which need not equal ``t1 - t0`` to the last bit).
        carried: per step, the first-stage value ``k_1`` when the host carried it over from the previous
            step's last stage instead of evaluating ``f`` at ``(t_n, y_n)``; ``None`` otherwise (and where the
            state was not kept: then the recomputation gives it back).
        outputs_in_step: step index -> indices of the requested output times the host produced inside
            that step (by dense output). Output 0 is ``y_0`` itself and belongs to no step.
        host_data: the adapter's own record of the solve (a dataclass the adapter defines, or ``None``);
            the tensors in it are packed with the rest, so they are freed with the graph.
        stage_inputs: optionally, per step, the ``s`` stage inputs ``Y_i`` (each shaped like the state) the host's
            forward pass evaluated ``f`` at, or ``None`` for a step whose inputs were not kept (see ``core.budget``).
            A kept step is not recomputed in the backward pass.
        stage_graphs: optionally, per step, per stage, the graph of the forward pass's evaluation of ``f`` there
            (:class:`~symadj_plugins.core.budget.KeptGraph`), or ``None``. Not packed into ``save_for_backward``:
            the graphs are consumed (freed) as the backward pass uses them.
        stage_rng: optionally, per step, per stage, the random-number state the forward evaluation of that
            stage started from, where it drew random numbers (``None`` where it drew none).
        restart_extra: optionally, per step, what else the host needs to recompute the step from its kept state
            (``Restart.extra``: torchdyn's ``k1``), ``None`` where not kept.
        snapshots: how many restart points the backward pass may hold while it reverses the steps between two kept
            states (``core.checkpointing.reversed_states``).
        rebuild_step_graphs: whether the backward pass may hold a step's stage graphs at once: for a step that kept
            no stage inputs it then replays the step with a graph at each stage, instead of replaying it without graphs
            and evaluating each stage again with one (the memory budget planned for it: ``core.budget``).
    """

    states: list[torch.Tensor]
    t0: torch.Tensor
    t1: torch.Tensor
    dt: torch.Tensor
    carried: list[torch.Tensor | None]
    outputs_in_step: dict[int, list[int]]
    host_data: Any = None
    stage_inputs: list[list[torch.Tensor] | None] | None = None
    stage_rng: list[list[RngState | None]] | None = None
    restart_extra: list[torch.Tensor | None] | None = None
    snapshots: int = 1
    rebuild_step_graphs: bool = False
    stage_graphs: list[list[KeptGraph | None] | None] | None = field(default=None, metadata={"packed": False})

    @property
    def num_steps(self) -> int:
        return len(self.states) - 1

    def inputs_of(self, n: int) -> list[torch.Tensor] | None:
        """The stage inputs step ``n`` kept, if it kept them."""
        return self.stage_inputs[n] if self.stage_inputs is not None else None

    def graphs_of(self, n: int) -> list[KeptGraph | None] | None:
        """The graphs step ``n`` kept, if it kept any."""
        return self.stage_graphs[n] if self.stage_graphs is not None else None

    def rng_state(self, n: int, i: int) -> RngState | None:
        """The random-number state stage ``i`` of step ``n`` started from, if it drew random numbers."""
        if self.stage_rng is None:
            return None
        per_stage = self.stage_rng[n]
        return per_stage[i] if i < len(per_stage) else None

    # The autograd Function keeps every tensor of the trajectory in ``ctx.save_for_backward`` so that PyTorch frees
    # them after backward (unless ``retain_graph=True``), exactly like the graph of backprop would be, and so that
    # saved-tensor hooks see all that this method holds.
    def pack(self) -> tuple[list[torch.Tensor], Any]:
        """``(tensors, structure)``: every tensor this trajectory holds, and the rest of it with placeholders."""
        tensors: list[torch.Tensor] = []
        return tensors, _strip(self, tensors)

    @classmethod
    def unpack(cls, tensors: Sequence[torch.Tensor], structure: Any) -> Trajectory:
        return _fill(structure, tensors)


@dataclass(frozen=True)
class _Slot:
    index: int


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with each tensor replaced by a :class:`_Slot` into ``tensors`` (appended)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _strip(getattr(value, f.name), tensors) if f.metadata.get("packed", True)
                  else _Opaque(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return (type(value), fields)
    if isinstance(value, list):
        return [_strip(v, tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(_strip(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _strip(v, tensors) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class _Opaque:
    value: Any


def _fill(structure: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if isinstance(structure, _Slot):
        return tensors[structure.index]
    if isinstance(structure, _Opaque):
        return structure.value
    if isinstance(structure, tuple) and len(structure) == 2 and isinstance(structure[0], type) \
            and dataclasses.is_dataclass(structure[0]):
        cls, fields = structure
        return cls(**{name: _fill(v, tensors) for name, v in fields.items()})
    if isinstance(structure, list):
        return [_fill(v, tensors) for v in structure]
    if isinstance(structure, tuple):
        return tuple(_fill(v, tensors) for v in structure)
    if isinstance(structure, dict):
        return {k: _fill(v, tensors) for k, v in structure.items()}
    return structure
