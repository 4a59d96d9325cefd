"""Spending memory for speed: what the forward pass keeps for the backward pass, within a budget in bytes.

The minimal path keeps one state per accepted step and replays each step in the backward pass: its stage inputs are
recomputed without a graph (up to ``s - 1`` evaluations of ``f``), then each stage is evaluated again with a graph and
differentiated. Two things bought with memory shorten that, in order of time saved per byte:

1. **the stage inputs** ``Y_i`` of a step (``s·|y|`` bytes): the backward pass skips the recomputation;
2. **the graphs of the step's stage evaluations** (``s·L`` bytes, ``L`` the activations of one evaluation of ``f``),
   built by the forward pass itself (it evaluates ``f`` with grad on a detached copy of the stage input and hands the
   solver the detached value, so the forward values are unchanged): the backward pass then only takes the ``s``
   vector–Jacobian products of the step, exactly what backprop does.

The decision is online (an adaptive solver does not know how many steps it will take): every accepted step keeps its
stage inputs while they fit, evicting the graphs of earlier steps if they must; then it keeps its graphs if they fit in
what is left. A rejected attempt frees what it built. What is counted, against :attr:`MemoryBudget.bytes`: the stage
inputs (``s`` states per step), and for a kept graph the bytes autograd saves for it (measured with saved-tensor hooks;
each storage once, parameters and the stage input excluded). The mandatory
trajectory (states, step sizes, carried stages) is not counted: it is what the minimal path holds.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["BudgetLedger", "KeptGraph", "MemoryBudget", "SavedBytesMeter", "measure_saved_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ACCEPTED = ("an int number of bytes >= 0, a string with a unit ('256MiB', '2GB', '512 KiB'), 'min' (= 0: one state "
             "per step, the least memory), 'stages' (the stage inputs of every step, no graphs), 'max' (everything: "
             "backprop's memory and speed), or math.inf")


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes the forward pass may keep for the backward pass beyond the trajectory.

    Attributes:
        bytes: the budget (``math.inf``: no limit).
        graphs: whether graphs of stage evaluations may be kept (``False`` for ``'stages'``: stage inputs only).
    """

    bytes: float
    graphs: bool = True

    @classmethod
    def parse(cls, value: int | float | str | MemoryBudget) -> MemoryBudget:
        """Reads a user's ``memory_budget``; raises ``TypeError``/``ValueError`` naming the accepted forms."""
        if isinstance(value, MemoryBudget):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"memory_budget must be {_ACCEPTED}; got {type(value).__name__} {value!r}")
        if isinstance(value, str):
            return cls._parse_string(value)
        if math.isnan(value) or value < 0:
            raise ValueError(f"memory_budget must be {_ACCEPTED}; got {value!r}")
        return cls(float(value) if math.isinf(value) else float(int(value)))

    @classmethod
    def _parse_string(cls, text: str) -> MemoryBudget:
        word = text.strip().lower()
        if word == "min":
            return cls(0.0)
        if word == "stages":
            return cls(math.inf, graphs=False)
        if word == "max":
            return cls(math.inf)
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", word)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"memory_budget must be {_ACCEPTED}; got {text!r}")
        return cls(float(int(float(match.group(1)) * _UNITS[match.group(2)])))

    @property
    def is_minimal(self) -> bool:
        return self.bytes == 0


class KeptGraph:
    """One evaluation of ``f`` made by the forward pass with a graph: ``out = f(t, leaf)``.

    ``leaf`` is the stage input (a detached, grad-requiring alias of the value the solver computed). Of ``out`` only
    its place in the graph is kept (a ``GradientEdge``, so that its values are not held twice: the solver has them),
    until the backward pass consumes it (or the budget evicts it): then only ``leaf`` is left, which still serves as
    the stage input. ``uses`` counts the stages that refer to this evaluation (two for a first-same-as-last stage,
    which is the next step's first stage too).
    """

    __slots__ = ("leaf", "output", "shape", "nbytes", "uses")

    def __init__(self, leaf: torch.Tensor, out: torch.Tensor, nbytes: int):
        self.leaf, self.output, self.shape, self.nbytes, self.uses = leaf, _edge(out), out.shape, nbytes, 1

    @property
    def alive(self) -> bool:
        return self.output is not None

    def drop(self) -> None:
        self.output = None


def _edge(out: torch.Tensor):
    """Where ``out`` enters the graph, without holding its values (torch >= 2.2); the tensor itself before that."""
    get_gradient_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    return out if get_gradient_edge is None else get_gradient_edge(out)


class BudgetLedger:
    """The online decisions of one forward solve: which accepted steps keep stage inputs, which keep graphs.

    Args:
        budget: the user's budget.
        stage_input_bytes: bytes of one step's stage inputs (``s·|y|``).
    """

    def __init__(self, budget: MemoryBudget, stage_input_bytes: int):
        self.budget = budget
        self.stage_input_bytes = stage_input_bytes
        self.spent = 0
        self._graph_steps: list[list[KeptGraph]] = []  # graphs kept, oldest first (evicted first)
        self.step_graph_bytes: int | None = None  # the last measured cost of one step's graphs

    @property
    def remaining(self) -> float:
        return self.budget.bytes - self.spent

    def may_build_graphs(self) -> bool:
        """Before an attempt: whether to evaluate its stages with graphs (if the last step's graphs and this step's
        stage inputs would fit; a first attempt measures)."""
        if not self.budget.graphs or self.budget.is_minimal:
            return False
        estimate = self.step_graph_bytes or 0
        return self.spent + self.stage_input_bytes + estimate <= self.budget.bytes

    def graphs_fit(self, nbytes: int) -> bool:
        """During an attempt: whether graphs of ``nbytes`` (and this step's stage inputs) still fit."""
        return self.spent + self.stage_input_bytes + nbytes <= self.budget.bytes

    def keep_stage_inputs(self) -> bool:
        """At an accepted step: reserve its stage inputs, evicting earlier steps' graphs if needed."""
        while self.spent + self.stage_input_bytes > self.budget.bytes and self._graph_steps:
            self._evict(self._graph_steps.pop(0))
        if self.spent + self.stage_input_bytes > self.budget.bytes:
            return False
        self.spent += self.stage_input_bytes
        return True

    def keep_graphs(self, graphs: list[KeptGraph]) -> bool:
        """At an accepted step (whose stage inputs are kept): keep its graphs if they fit."""
        nbytes = sum(g.nbytes for g in graphs)
        self.step_graph_bytes = nbytes
        if not graphs or self.spent + nbytes > self.budget.bytes:
            return False
        self.spent += nbytes
        self._graph_steps.append(graphs)
        return True

    def _evict(self, graphs: list[KeptGraph]) -> None:
        for g in graphs:
            g.drop()
        self.spent -= sum(g.nbytes for g in graphs)


class SavedBytesMeter:
    """The count kept by :func:`measure_saved_bytes`: bytes of distinct storages, ``exclude``'s not counted."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self._seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = 0

    def count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()


@contextlib.contextmanager
def measure_saved_bytes(exclude: Iterable[torch.Tensor]) -> Iterator[SavedBytesMeter]:
    """Counts the bytes autograd saves inside the block (each storage once, ``exclude``'s storages not at all).

    Saved-tensor hooks already active (a caller's memory meter, ``save_on_cpu``) still see every tensor: this hook
    hands each one on to them.
    """
    meter = SavedBytesMeter(exclude)
    outer = _active_saved_tensors_hooks()
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(tensor: torch.Tensor):
        meter.count(tensor)
        # Detached: an output saved by its own node (tanh, exp) would otherwise hold that node through its grad_fn, a
        # reference cycle through autograd that Python cannot collect (a graph the budget evicts would stay alive).
        return outer_pack(tensor) if outer_pack is not None else tensor.detach()

    def unpack(packed):
        return outer_unpack(packed) if outer_unpack is not None else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield meter


def _active_saved_tensors_hooks():
    """The ``(pack, unpack)`` saved-tensor hooks active here, or ``None`` (also where torch cannot say)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)
    except TypeError:  # older signature, without the tracing flag
        return top()
