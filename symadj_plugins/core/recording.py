"""What the forward pass keeps of each accepted step for the backward pass, whichever host library runs the solve.

An adapter listens to its host's solver and tells a :class:`StageKeeper` when a step is attempted, routes the
attempt's stage evaluations of ``f`` through :meth:`StageKeeper.evaluate`, and says whether the attempt was accepted.
The adapter also hands it each accepted step's state (:meth:`StageKeeper.add_state`). The keeper notes, per accepted
step, within the memory budget (``core.budget``):

- the random-number state each stage evaluation started from, where it drew random numbers (``core.replay``);
- the state and what the host needs to restart the step from it, unless the budget thins the states
  (``core.checkpointing``);
- the stage inputs ``Y_i``;
- the graphs of the stage evaluations, built by evaluating ``f`` with grad on a detached copy of the stage input.
  The solver gets the detached value: the same numbers as an evaluation without grad.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .budget import BudgetLedger, KeptGraph, MemoryBudget, measure_saved_bytes
from .replay import RandomnessWatch, RngState

__all__ = ["StageKeeper", "FirstStage"]


@dataclass
class FirstStage:
    """How an attempt's first stage was obtained when the host carries it in (first same as last, or an evaluation
    before the step): the stage input, its graph if the forward pass kept one, the random state it drew from, and
    where the host evaluated it (``t``, ``kwargs``; ``t`` is ``None`` for a value carried in that is not ``f`` at
    ``input``). A step that keeps graphs builds the first stage's own graph there when it has none, so that the
    backward pass evaluates nothing in a step with graphs (as backprop)."""

    input: torch.Tensor
    graph: KeptGraph | None = None
    rng: RngState | None = None
    t: torch.Tensor | None = None
    kwargs: tuple = ()


class StageKeeper:
    """Collects, for each accepted step, what the budget lets the backward pass reuse.

    Args:
        budget: the memory budget.
        state: the initial state (its size, dtype and device).
        num_stages: ``s``.
        params: the parameters differentiated (excluded from graph byte counts: they are alive anyway).
        restart_states: how many state-sized tensors the host needs to restart a step (the state, and a carried
            first stage or torchdyn's ``k1`` where the host needs them to recompute a state bit for bit).

    After the solve, per state ``n`` (``N + 1`` of them): ``states[n]``, ``carried[n]``, ``extra[n]`` (``None`` where
    not kept); per accepted step ``n``: ``stage_rng[n]`` (``s`` entries), ``stage_inputs[n]`` (``s`` tensors or
    ``None``), ``stage_graphs[n]`` (``s`` entries, each a :class:`KeptGraph` or ``None``, or ``None`` for the step).
    """

    def __init__(self, budget: MemoryBudget, state: torch.Tensor, num_stages: int, params: Sequence[torch.Tensor],
                 restart_states: int = 1):
        self.num_stages = num_stages
        self.params = tuple(params)
        self.randomness = RandomnessWatch(state.device)
        state_bytes = state.numel() * state.element_size()
        self.ledger = BudgetLedger(budget, restart_states * state_bytes, (num_stages - 1) * state_bytes,
                                   self._evict_inputs, self._evict_graphs, num_stages)
        self.states: list[torch.Tensor | None] = []
        self.carried: list[torch.Tensor | None] = []
        self.extra: list[torch.Tensor | None] = []
        self.stage_rng: list[list[RngState | None]] = []
        self.stage_inputs: list[list[torch.Tensor] | None] = []
        self.stage_graphs: list[list[KeptGraph | None] | None] = []
        self._in_attempt = False
        self._first: FirstStage | None = None
        self._calls_left = 0
        self._inputs: list[torch.Tensor] = []
        self._rng: list[RngState | None] = []
        self._graphs: list[KeptGraph] = []
        self._building = False
        self._measured_count = 0  # evaluations whose graph bytes were measured
        self._largest_measured = 0  # the largest of them
        self._largest_stage_bytes: int | None = None  # set once a full step's worth has been measured

    # -- states -----------------------------------------------------------------------------------------------
    @property
    def may_thin(self) -> bool:
        """Whether the budget may drop states (then the host's restart data must be handed in with each state)."""
        return self.ledger.thinning is not None

    def add_state(self, state: torch.Tensor, carried: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                  final: bool = False) -> None:
        """The next state ``y_n`` of the solve (``final``: ``y_N``, always kept), with the host's restart data there:
        ``carried``, the first stage it carries into step ``n`` (see ``Trajectory.carried``), and ``extra``, what else
        its step needs to be recomputed bit for bit (kept only where states may be dropped)."""
        self.states.append(state)
        self.carried.append(carried)
        self.extra.append(extra if self.may_thin else None)
        for m in self.ledger.admit_state(len(self.states) - 1, final):
            self.states[m] = self.carried[m] = self.extra[m] = None

    def kept_states(self) -> tuple[list, list, list | None, int]:
        """After the solve (every state added, the final one last): ``(states, carried, extra, snapshots)`` for the
        :class:`~symadj_plugins.core.trajectory.Trajectory` (``carried`` and ``extra`` per step)."""
        num_steps = len(self.states) - 1
        extra = self.extra[:num_steps] if any(e is not None for e in self.extra[:num_steps]) else None
        num_kept = sum(state is not None for state in self.states)
        return self.states, self.carried[:num_steps], extra, self.ledger.backward_snapshots(num_steps, num_kept)

    @property
    def rebuilds_step_graphs(self) -> bool:
        """Whether the backward pass may rebuild each step's stage graphs at once (see ``Trajectory``)."""
        return self.ledger.rebuilds

    def _evict_inputs(self, step: int) -> None:
        self.stage_inputs[step] = None
        self.stage_graphs[step] = None

    def _evict_graphs(self, step: int) -> None:
        self.stage_graphs[step] = None

    @property
    def drew_random_numbers(self) -> bool:
        """Whether any evaluation watched so far (stage or not) drew random numbers."""
        return self.randomness.drew

    # -- an attempt -------------------------------------------------------------------------------------------
    def begin_attempt(self, first: FirstStage | None) -> None:
        """A step is attempted. ``first``: its first stage when carried in (then ``s - 1`` evaluations follow)."""
        self._in_attempt = True
        self._first = first
        self._calls_left = self.num_stages - (first is not None)
        self._inputs, self._rng, self._graphs = [], [], []
        self._building = self.ledger.may_build_graphs()
        # Its first stage, evaluated before the attempt, has no graph to share (the solve's first evaluation, one
        # after a jump_t, the last stage of a step that kept none): the attempt builds one, if it builds graphs.
        self._first_needs_graph = first is not None and first.t is not None and not (
            first.graph is not None and first.graph.alive)

    @property
    def expects_stage(self) -> bool:
        """Whether the next evaluation of ``f`` is a stage of the attempt under way."""
        return self._in_attempt and self._calls_left > 0

    def evaluate(self, fn: Callable[..., torch.Tensor], t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Evaluates one stage, ``fn(t, y, **kwargs)``, as the forward pass: returns the value the solver uses."""
        self._calls_left -= 1
        if self._building and self._first_needs_graph:
            self._first_needs_graph = False
            self._build_graph(fn, self._first.t, self._first.input, self._first.rng, **dict(self._first.kwargs))
        self._inputs.append(y)
        if not self._building:
            if self.ledger.budget.measures_graphs and self.ledger.eval_graph_bytes is None:
                leaf = y.detach().requires_grad_(True)
                out, rng, _ = self._evaluate_measured(fn, t, leaf, **kwargs)  # the graph is dropped with out
                value = out.detach()
            else:
                value, rng = self.randomness.call(fn, t, y, **kwargs)
        else:
            value, rng = self._build_graph(fn, t, y, None, **kwargs)
        self._rng.append(rng)
        return value

    def _build_graph(self, fn, t, y, rng_from: RngState | None, **kwargs) -> tuple[torch.Tensor, RngState | None]:
        """``fn(t, y)`` with a graph, kept for this attempt while the attempt's graphs fit; ``rng_from``: the random
        state to evaluate from (an evaluation made again), put back afterwards. Returns ``(value, rng)``."""
        leaf = y.detach().requires_grad_(True)
        with rng_from.restored() if rng_from is not None else contextlib.nullcontext():
            if math.isinf(self.ledger.limit):  # no limit: nothing to measure
                with torch.enable_grad():
                    out, rng = self.randomness.call(fn, t, leaf, **kwargs)
                nbytes = 0
            else:
                out, rng, nbytes = self._evaluate_measured(fn, t, leaf, **kwargs)
        self._graphs.append(KeptGraph(leaf, out, nbytes))
        built = sum(g.nbytes for g in self._graphs)
        if not (out.requires_grad and self.ledger.graphs_fit(built)):
            # Does not fit (or f depends on neither y nor θ): estimate the step's graphs for the next attempts.
            self.ledger.step_graph_bytes = built * self.num_stages // len(self._graphs)
            self._stop_building()
        return out.detach(), rng

    def _evaluate_measured(self, fn, t, leaf, **kwargs) -> tuple[torch.Tensor, RngState | None, int]:
        """``fn(t, leaf)`` with grad, and the bytes its graph saves. Measuring costs a Python call per saved tensor, so
        after the first full step only each attempt's first evaluation is measured; the others, evaluations of the same
        network on inputs of the same shape, are counted at the largest size measured so far."""
        if self._largest_stage_bytes is not None and self._graphs:
            with torch.enable_grad():
                out, rng = self.randomness.call(fn, t, leaf, **kwargs)
            return out, rng, self._largest_stage_bytes
        with torch.enable_grad(), measure_saved_bytes([*self.params, leaf]) as meter:
            out, rng = self.randomness.call(fn, t, leaf, **kwargs)
        self._measured_count += 1
        self._largest_measured = max(self._largest_measured, meter.bytes)
        if self.ledger.eval_graph_bytes is None:
            self.ledger.eval_graph_bytes = meter.bytes
        if self._measured_count >= self.num_stages:  # a full step measured: from now on one evaluation per attempt
            self._largest_stage_bytes = self._largest_measured
        return out, rng, self._largest_measured

    def finish_attempt(self, accepted: bool) -> None:
        """The attempt ended: an accepted step keeps what fits in the budget; a rejected one frees what it built."""
        if not self._in_attempt:
            return
        self._in_attempt = False
        if not accepted:
            self._stop_building()
            self._release_attempt()
            return
        first = self._first
        inputs = ([first.input] if first is not None else []) + self._inputs
        rng = ([first.rng] if first is not None else []) + self._rng
        self.stage_rng.append(rng)
        self.randomness.settle()  # a whole step evaluated: stop watching each evaluation if none drew
        kept_inputs = len(inputs) == self.num_stages and self.ledger.keep_stage_inputs(len(self.stage_inputs))
        self.stage_inputs.append(inputs if kept_inputs else None)
        graphs = None
        # Kept only when every stage has a graph (the first one shared with the previous step, built here, or
        # carried in as a value, which the backward pass does not differentiate here): a step with graphs then
        # evaluates nothing in the backward pass, so nothing in it needs the replay check.
        shared = first.graph if first is not None and first.graph is not None and first.graph.alive else None
        carried_value = first is not None and first.t is None
        complete = len(self._graphs) + (shared is not None or carried_value) == self.num_stages
        if kept_inputs and self._building and complete:
            if shared is not None:
                shared.uses += 1
            graphs = ([shared] if shared is not None else [None] if carried_value else []) + list(self._graphs)
            if not self.ledger.keep_graphs(len(self.stage_graphs), [g for g in graphs if g is not None],
                                           nbytes=sum(g.nbytes for g in self._graphs)):
                if shared is not None:
                    shared.uses -= 1
                graphs = None
                self._stop_building()
        else:
            self._stop_building()
        self.stage_graphs.append(graphs)
        self._graphs = []
        self._release_attempt()

    def _release_attempt(self) -> None:
        """The attempt's stage inputs are the trajectory's now, or not kept at all: hold none of them past it."""
        self._inputs, self._rng, self._first = [], [], None

    def first_same_as_last(self, state: torch.Tensor) -> FirstStage | None:
        """The next step's first stage for a first-same-as-last method, from ``state``: the last accepted step's last
        evaluation (its graph if kept, its random state); ``None`` before the first step."""
        if not self.stage_rng:
            return None
        graphs = self.stage_graphs[-1]
        return FirstStage(state, graphs[-1] if graphs is not None else None, self.stage_rng[-1][-1])

    def _stop_building(self) -> None:
        for g in self._graphs:
            g.drop()
        self._graphs = []
        self._building = False

    # -- after the solve --------------------------------------------------------------------------------------
    def results(self) -> tuple[list | None, list | None, list | None]:
        """``(stage_inputs, stage_graphs, stage_rng)`` for the :class:`~symadj_plugins.core.trajectory.Trajectory`,
        each ``None`` where no step kept anything of that kind (the states: :attr:`states` and the like)."""
        self.randomness.verify()
        inputs = self.stage_inputs if any(x is not None for x in self.stage_inputs) else None
        graphs = self.stage_graphs if any(g is not None for g in self.stage_graphs) else None
        rng = self.stage_rng if self.drew_random_numbers else None
        return inputs, graphs, rng
