"""Spending memory for speed: what the solve keeps for the backward pass, within one budget in bytes.

Everything the forward pass keeps for the backward pass is counted, in the order it is worth keeping (time saved per
byte):

1. **states** (``|y|`` bytes each, plus what the host needs to restart a step there): down to ``O(log N)`` of them, the
   others recomputed in the backward pass with the host's own step (``core.checkpointing``);
2. **one state per accepted step** (the paper's method): the backward pass recomputes nothing but each step's stages;
3. **the stage inputs** ``Y_i`` of a step (``(s - 1)·|y|`` bytes beyond its state): the backward pass skips
   recomputing them;
4. **the graphs of the step's stage evaluations** (``s·L`` bytes, ``L`` the activations of one evaluation of ``f``),
   built by the forward pass itself (it evaluates ``f`` with grad on a detached copy of the stage input and hands the
   solver the detached value, so the forward values are unchanged): the backward pass then only takes the ``s``
   vector–Jacobian products of the step, exactly what backprop does.

The decisions are online (an adaptive solver does not know how many steps it will take): every accepted step's state is
admitted first, evicting the graphs, then the stage inputs, of the earliest steps that kept some if it must, and
thinning the kept states (``checkpointing.OnlineThinning``) once even the states do not fit; then the step keeps its
stage inputs, then its graphs, if they fit in what is left. A rejected attempt frees what it built. What is counted:
the kept states and restart data, the stage inputs, and for a kept graph the bytes autograd saves for it (measured with
saved-tensor hooks; each storage once, parameters and the stage input excluded). Not counted: the solution returned to
the caller, the parameters, the backward pass's working buffers (a few states) and the one graph it builds at a time.

The default, ``"auto"``, may instead spend its bound in the backward pass: once the states outweigh ``s - 2`` graphs of
``f``, it keeps nothing but the states and the backward pass holds one step's ``s`` graphs at once
(:attr:`BudgetLedger.rebuild_bytes`), which makes every step as fast as one with kept stage inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .checkpointing import OnlineThinning, min_kept, min_snapshots

__all__ = ["BudgetLedger", "KeptGraph", "MemoryBudget", "SavedBytesMeter", "measure_saved_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
LEVELS = ("min", "trajectory", "stages", "max", "auto")
_ACCEPTED = ("'min' (= 0: the fewest bytes, O(log N) states), 'trajectory' (one state per step), 'stages' (and every "
             "step's stage inputs), 'max' (and the stage graphs: backprop's memory and speed), 'auto' (the default: "
             "at most twice what 'trajectory' holds, the fastest within that), a number of bytes >= 0, a string with "
             "a unit ('256MiB', '2GB', '512 KiB') or math.inf")


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes the solve may keep for the backward pass (states included), or a named level.

    Attributes:
        bytes: the budget for ``level == "bytes"`` (``math.inf``: no limit); ``0`` for ``"min"``, ``inf`` for the
            other levels.
        level: ``"bytes"`` or one of ``"min"``, ``"trajectory"``, ``"stages"``, ``"max"``, ``"auto"``.
        allow_graphs: ``False`` for a host whose stage graphs cannot be reused (see :meth:`without_graphs`).
    """

    bytes: float
    level: str = "bytes"
    allow_graphs: bool = True

    def __post_init__(self) -> None:
        if self.level == "bytes" and self.bytes == 0:  # zero bytes is the fewest: "min"
            object.__setattr__(self, "level", "min")

    @classmethod
    def parse(cls, value: int | float | str | MemoryBudget) -> MemoryBudget:
        """Reads a user's ``memory_budget``; raises ``TypeError``/``ValueError`` naming the accepted forms."""
        if isinstance(value, MemoryBudget):
            return value
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise TypeError(f"memory_budget must be {_ACCEPTED}; got {type(value).__name__} {value!r}")
        if isinstance(value, str):
            return cls._parse_string(value)
        value = float(value) if not isinstance(value, numbers.Integral) else int(value)
        if (isinstance(value, float) and math.isnan(value)) or value < 0:
            raise ValueError(f"memory_budget must be {_ACCEPTED}; got {value!r}")
        if value == 0:
            return cls.named("min")
        return cls(math.inf if value >= 2**63 else float(int(value)))  # beyond any memory: no limit

    @classmethod
    def named(cls, level: str) -> MemoryBudget:
        return cls(0.0 if level == "min" else math.inf, level)

    @classmethod
    def _parse_string(cls, text: str) -> MemoryBudget:
        word = text.strip().lower()
        if word in LEVELS:
            return cls.named(word)
        match = re.fullmatch(r"([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", word)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"memory_budget must be {_ACCEPTED}; got {text!r}")
        return cls.parse(float(match.group(1)) * _UNITS[match.group(2)])

    @property
    def keeps_every_state(self) -> bool:
        """Whether every accepted step's state is kept whatever the number of steps."""
        return self.level in ("trajectory", "stages", "max", "auto") or math.isinf(self.bytes)

    @property
    def stage_inputs(self) -> bool:
        """Whether stage inputs may be kept."""
        return self.level in ("stages", "max", "auto", "bytes") and self.bytes != 0

    @property
    def graphs(self) -> bool:
        """Whether graphs of stage evaluations may be kept."""
        return self.allow_graphs and self.level in ("max", "auto", "bytes") and self.bytes != 0

    @property
    def measures_graphs(self) -> bool:
        """Whether the forward pass measures one evaluation's graph even when it keeps none (``"auto"``: its bound is
        twice what ``"trajectory"`` holds, one graph of ``f`` included)."""
        return self.level == "auto"

    def without_graphs(self) -> MemoryBudget:
        """The same budget, keeping no graphs (for a host whose stage graphs cannot be reused)."""
        return dataclasses.replace(self, allow_graphs=False)

    @property
    def is_minimal(self) -> bool:
        return self.level == "min"


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
        """Frees the graph and the stage input it holds (the trajectory keeps its own reference where it keeps the
        stage inputs)."""
        self.output = self.leaf = None


def _weak_callback(callback: Callable[[int], None]) -> Callable[[int], None]:
    """``callback``, held weakly if it is a bound method (calling it after its object died does nothing)."""
    if not hasattr(callback, "__self__"):
        return callback
    method = weakref.WeakMethod(callback)

    def call(step: int) -> None:
        target = method()
        if target is not None:
            target(step)
    return call


def _edge(out: torch.Tensor):
    """Where ``out`` enters the graph, without holding its values (torch >= 2.2); the tensor itself before that."""
    get_gradient_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    return out if get_gradient_edge is None else get_gradient_edge(out)


class BudgetLedger:
    """The online decisions of one forward solve: which states are kept, which steps keep stage inputs, which graphs.

    Args:
        budget: the user's budget.
        restart_bytes: bytes of one kept state with what the host needs to restart a step there.
        stage_input_bytes: bytes of one step's stage inputs beyond its state (``(s - 1)·|y|``).
        evict_inputs: called with a step index when that step's stage inputs are given up.
        evict_graphs: called with a step index when that step's graphs are given up.
    """

    def __init__(self, budget: MemoryBudget, restart_bytes: int, stage_input_bytes: int,
                 evict_inputs: Callable[[int], None] = lambda step: None,
                 evict_graphs: Callable[[int], None] = lambda step: None, num_stages: int = 1):
        self.budget = budget
        self.restart_bytes = max(1, restart_bytes)
        self.stage_input_bytes = stage_input_bytes
        self.num_stages = num_stages
        # Held weakly when they are methods of the object that owns this ledger: a strong reference would make a
        # reference cycle, and everything that object keeps (every kept state) would wait for the garbage collector.
        self._evict_inputs = _weak_callback(evict_inputs)
        self._on_evict_graphs = _weak_callback(evict_graphs)
        self.state_bytes = 0  # kept states and their restart data
        self.input_bytes = 0
        self.graph_bytes = 0
        self.states_seen = 0
        self._input_steps: deque[int] = deque()  # steps that kept stage inputs, oldest first (evicted first)
        self._graph_steps: deque[tuple[int, list[KeptGraph]]] = deque()  # (step, graphs) kept, oldest first
        self.step_graph_bytes: int | None = None  # the last measured cost of one step's graphs
        self.eval_graph_bytes: int | None = None  # the measured cost of one evaluation's graph
        self.thinning = None if budget.keeps_every_state else OnlineThinning(self._state_cap)
        self.fell_back_to_min = False
        # "auto" once the states alone leave room for it: the backward pass rebuilds each step's stage graphs at once
        # from y_n (see :meth:`rebuild_bytes`), and the forward pass keeps nothing but the states.
        self.rebuilds = False

    @property
    def spent(self) -> int:
        return self.state_bytes + self.input_bytes + self.graph_bytes

    @property
    def limit(self) -> float:
        """The bytes that may be kept now. ``"auto"``: twice the states so far plus one evaluation's graph, so that the
        solve never holds more than twice what ``"trajectory"`` holds."""
        if self.budget.level == "auto":
            return 2 * self.states_seen * self.restart_bytes + (self.eval_graph_bytes or 0)
        return self.budget.bytes

    @property
    def rebuild_bytes(self) -> int | None:
        """What the backward pass holds beyond ``"trajectory"``'s when it rebuilds a step's stage graphs at once:
        ``s - 1`` more graphs of ``f`` and their stage inputs (``None`` until one evaluation's graph is measured).

        A step's backward pass then evaluates each stage once with grad and differentiates them, the same work as from
        kept stage inputs, without keeping them: ``(s - 1)(L + |y|)`` bytes once instead of ``(s - 1)·|y|`` per step."""
        if self.eval_graph_bytes is None:
            return None
        return (self.num_stages - 1) * self.eval_graph_bytes + self.stage_input_bytes

    @property
    def thinned(self) -> bool:
        """Whether some state was dropped (then the rest of the budget is the backward pass's, for recomputing)."""
        return self.thinning is not None and self.thinning.stride > 1

    def _state_cap(self, n: int) -> int:
        """How many states may be kept after ``n`` steps: all of them while they fit, then half the budget's worth
        (the other half is for the backward pass's recomputed states), never fewer than ``"min"``'s ``O(log N)``."""
        if self.budget.is_minimal:
            return min_kept(n)
        slots = int(self.budget.bytes // self.restart_bytes)
        if n + 1 <= slots and not self.thinned:
            return slots
        if slots // 2 < min_kept(n):
            if not self.fell_back_to_min:
                self.fell_back_to_min = True
                warnings.warn(f"memory_budget={self.budget.bytes:.0f} bytes is less than the fewest states this solve "
                              f"can keep ({min_kept(n)} states of {self.restart_bytes} bytes after {n} steps): running "
                              "at memory_budget='min' instead", RuntimeWarning, stacklevel=2)
            return min_kept(n)
        return slots // 2

    def backward_snapshots(self, num_steps: int, num_kept: int) -> int:
        """How many restart points one segment's reversal may hold in the backward pass, its start included."""
        if self.budget.is_minimal or self.fell_back_to_min:
            return min_snapshots(num_steps, num_kept)
        if self.thinning is None:  # every state kept: nothing to recompute
            return 1
        return max(int(self.budget.bytes // self.restart_bytes) - num_kept, min_snapshots(num_steps, num_kept))

    # -- states -------------------------------------------------------------------------------------------
    def admit_state(self, n: int, final: bool = False) -> list[int]:
        """The state ``y_n`` arrives (``final``: the end of the solve, always kept). Returns the positions whose states
        are dropped now (``n`` itself when it is not kept)."""
        self.states_seen += 1
        dropped = [] if self.thinning is None or final else self.thinning.admit(n)
        self.state_bytes += self.restart_bytes * (1 - len(dropped))
        if self.budget.level == "auto" and not self.rebuilds and self.rebuild_bytes is not None:
            # Within the bound (limit - rebuild_bytes >= the states) once the states outweigh s - 2 graphs: from then
            # on the stage inputs buy no time, and the bound is spent on the backward pass's graphs instead.
            self.rebuilds = self.state_bytes + self.rebuild_bytes <= self.limit
        if self.thinned or self.rebuilds:  # below one state per step, or rebuilding: nothing else is kept
            self._evict_all()
        while self.spent > self.limit and (self._graph_steps or self._input_steps):
            self._evict_oldest()
        return dropped

    # -- stage inputs and graphs ----------------------------------------------------------------------------
    def may_build_graphs(self) -> bool:
        """Before an attempt: whether to evaluate its stages with graphs (if the last step's graphs and this step's
        stage inputs would fit; a first attempt measures)."""
        if not self.budget.graphs or self.thinned or self.rebuilds:
            return False
        estimate = self.step_graph_bytes or 0
        return self.spent + self.stage_input_bytes + estimate <= self.limit

    def graphs_fit(self, nbytes: int) -> bool:
        """During an attempt: whether graphs of ``nbytes`` (and this step's stage inputs) still fit."""
        return self.spent + self.stage_input_bytes + nbytes <= self.limit

    def keep_stage_inputs(self, step: int) -> bool:
        """At an accepted step: reserve its stage inputs, evicting earlier steps' graphs if needed."""
        if not self.budget.stage_inputs or self.thinned or self.rebuilds:
            return False
        while self.spent + self.stage_input_bytes > self.limit and self._graph_steps:
            self._evict_graphs(self._graph_steps.popleft())
        if self.spent + self.stage_input_bytes > self.limit:
            return False
        self.input_bytes += self.stage_input_bytes
        self._input_steps.append(step)
        return True

    def keep_graphs(self, step: int, graphs: list[KeptGraph], nbytes: int) -> bool:
        """At an accepted step (whose stage inputs are kept): keep its graphs (``nbytes`` of its own; a graph it
        shares with the previous step is counted there) if they fit."""
        self.step_graph_bytes = nbytes
        if not graphs or self.spent + nbytes > self.limit:
            return False
        self.graph_bytes += nbytes
        self._graph_steps.append((step, graphs))
        return True

    def _evict_oldest(self) -> None:
        if self._graph_steps:
            self._evict_graphs(self._graph_steps.popleft())
        else:
            self._evict_inputs(self._input_steps.popleft())
            self.input_bytes -= self.stage_input_bytes

    def _evict_all(self) -> None:
        while self._graph_steps or self._input_steps:
            self._evict_oldest()

    def _evict_graphs(self, kept: tuple[int, list[KeptGraph]]) -> None:
        """Gives up one step's graphs. A graph shared with the next step (first same as last, ``uses == 2``) stays
        alive, counted, for that step: a step keeps all its graphs or none."""
        step, graphs = kept
        self._on_evict_graphs(step)
        for g in graphs:
            g.uses -= 1
            if g.uses <= 0:
                g.drop()
                self.graph_bytes -= g.nbytes


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
