"""The symplectic adjoint: the exact reverse sweep of an explicit Runge–Kutta solve (docs/design.md, section 1).

This is the only module that holds the mathematics. It knows nothing of any host library: an adapter
supplies a :class:`HostSolver` that runs the host's own forward solve, says where each stage is evaluated
and how outputs between steps are produced. Everything here runs on whatever device the state lives on.

For one accepted step ``n`` (tableau ``(A, b)``, step ``h``) and ``λ_{n+1} = ∂L/∂y_{n+1}``::

    for i = s, ..., 1:
        κ_i = h (b_i λ_{n+1} + Σ_{j>i} a_ji μ_j) + (cotangent of k_i from dense output / the next step)
        μ_i, g_i = VJP of f at (T_i, Y_i) with cotangent κ_i;   ∂L/∂θ += g_i
    λ_n = λ_{n+1} + Σ_i μ_i (+ cotangent of y_n from dense output)

Only one graph of ``f`` is alive at a time; the stage inputs ``Y_i`` are recomputed without a graph from
the stored ``y_n``. The step sizes are constants (not differentiated), as in the paper and diffrax. Where the memory
budget planned for one step's ``s`` graphs at once (the default, when the states outweigh them), a step is instead
replayed with one graph through it and differentiated by autograd's engine: the same adjoint step, to rounding
(:meth:`_Sweep._reverse_through_step_graph`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._engine import vjp
from .budget import KeptGraph
from .checkpointing import Restart, reversed_states
from .replay import AutocastState, BufferGuard, ReplayCheck, generators_kept, hooks_suspended
from .tableau import ButcherTableau, StagePlan
from .trajectory import StageCall, Trajectory


class HostSolver(abc.ABC):
    """What an adapter provides for one solve. All tensors are in the host's normalised coordinates.

    Attributes:
        tableau: the ``s``-stage tableau of the host's solver (set by ``solve`` at the latest).
        returned_slots: set by ``solve``: the output slots its solution holds, in order, when not all of them
            (``None``: all). The others' cotangent is zero, so the backward pass allocates none for them.
        checked_entries: the entries of the flattened state that are stored as the forward pass computed them,
            which the replay check compares (all by default; a host that stores a placeholder for part of the
            state, like torchdyn's integral-loss accumulator, narrows it).
        params_inferred: whether the adapter found the parameters itself (the field module's ``parameters()``)
            rather than the caller listing them; then a module the field calls with other parameters that require
            grad is refused (see ``core.replay.BufferGuard``).
    """

    tableau: ButcherTableau
    returned_slots: Sequence[int] | None = None
    checked_entries: slice = slice(None)
    params_inferred: bool = False

    @abc.abstractmethod
    def solve(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Trajectory]:
        """Runs the host's forward solve (called under ``no_grad``); returns ``(solution, trajectory)``
        with ``solution`` of shape ``(len(t), *y0.shape)``, or ``(len(returned_slots), *y0.shape)``: the state at
        each returned slot, in order, when the host sets ``returned_slots``."""

    @abc.abstractmethod
    def stage_calls(self, trajectory: Trajectory, n: int) -> Sequence[StageCall | None]:
        """Where step ``n`` evaluates each of its ``s`` stages; ``None`` for a first stage whose value the
        host carried over from the previous step (then ``trajectory.carried[n]`` holds it)."""

    @abc.abstractmethod
    def vector_field(self, t: torch.Tensor, y: torch.Tensor, kwargs: tuple) -> torch.Tensor:
        """``f(t, y)`` as the host calls it, with the stage's extra keyword arguments."""

    @abc.abstractmethod
    def dense_output(self, trajectory: Trajectory, n: int, y0: torch.Tensor, y1: torch.Tensor,
                     k: Sequence[torch.Tensor], t_out: torch.Tensor) -> torch.Tensor:
        """The host's values at the times ``t_out`` (shape ``(m,)``) inside step ``n``, stacked: shape
        ``(m, *y0.shape)``, differentiable in ``y0``, ``y1`` and ``k``. The sweep calls it once per step with all of
        the step's output times, so that a step costs one vector–Jacobian product however many outputs it has: fit
        the interpolant once and evaluate it at all the times together.

        It must be linear in ``k``: its vector–Jacobian product may not depend on the values of ``k``, which are
        passed as zeros. It may evaluate ``f`` itself (at ``y0``/``y1``, whose values are the real ones).
        """

    def step_coefficients(self, trajectory: Trajectory, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h·A, h·b)`` of step ``n``, shapes ``(s, s)`` and ``(s,)`` in the state dtype: ``dt[n] * A`` and
        ``dt[n] * b`` unless the host forms the products ``h·a_ij`` differently (torchdyn rounds some of them to
        float32 for float64 states)."""
        y = trajectory.states[0]  # always kept: the dtype and device of every state
        a, b = self.tableau.tensors(y.dtype, y.device)
        h = trajectory.dt[n].to(y.dtype)
        return h * a, h * b

    def modules(self) -> Sequence[torch.nn.Module]:
        """The modules the vector field is made of (their buffers are guarded: see ``core.replay``)."""
        return ()

    def advance(self, trajectory: Trajectory, n: int, restart: Restart,
                replaying: Callable[[int, int], contextlib.AbstractContextManager]) -> Restart:
        """Recomputes the state after step ``n`` (and its restart data) from ``restart``, with the host's own step and
        the recorded times, step size and flags, so that it equals the forward pass's bit for bit. Runs without a
        graph. ``replaying(n, i)`` is the context to evaluate stage ``i`` of step ``n`` in (the forward pass's random
        numbers and autocast state). Needed only by budgets that drop states; a host without it keeps every state."""
        raise NotImplementedError(f"{type(self).__name__} cannot recompute states: use a memory budget that keeps "
                                  "every state ('trajectory' or more)")


def odeint_symplectic(host: HostSolver, y0: torch.Tensor, t: torch.Tensor,
                      params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Solves with the host's solver; gradients w.r.t. ``y0``, ``t`` and ``params`` by the symplectic adjoint."""
    _check_transforms(y0, t, params)
    return _SymplecticAdjointFunction.apply(host, y0, t, *params)


def _check_transforms(*tensors) -> None:
    """torch.func transforms and forward-mode AD need a forward-mode rule, which the method does not have."""
    flat = [x for x in tensors if isinstance(x, torch.Tensor)] + [p for p in tensors[-1]]
    if torch._C._are_functorch_transforms_active() or any(
            torch._C._functorch.is_functorch_wrapped_tensor(x) for x in flat):
        raise NotImplementedError(
            "the symplectic adjoint cannot run under torch.func transforms (vmap, grad, jvp, jacrev, ...): it is a "
            "reverse-mode gradient of its own. Batch the state instead of vmap, use torch.autograd.grad / "
            ".backward() for gradients, or torchdiffeq.odeint (backprop through the solver) inside torch.func.")
    from torch.autograd.forward_ad import unpack_dual
    if any(unpack_dual(x).tangent is not None for x in flat):
        raise NotImplementedError(
            "the symplectic adjoint has no forward-mode derivative (torch.autograd.forward_ad dual tensors): it "
            "computes reverse-mode gradients. Use torchdiffeq.odeint (backprop through the solver) for forward-mode "
            "AD.")


@dataclass
class _Replay:
    """What the backward pass needs to replay ``f`` as the forward pass saw it (see ``core.replay``)."""

    autocast: AutocastState
    buffers: BufferGuard


class _SymplecticAdjointFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, host: HostSolver, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor):
        replay = _Replay(AutocastState.capture(), BufferGuard(host.modules(), params, host.params_inferred))
        with replay.buffers.watching():  # also finds the modules a field that is not a module calls
            solution, trajectory = host.solve(y0, t)
        replay.buffers.after_forward()
        tensors, structure = trajectory.pack()
        ctx.host, ctx.structure, ctx.replay = host, structure, replay
        ctx.slots = host.returned_slots
        ctx.num_params = len(params)
        # Saved through autograd so that the trajectory is freed with the graph (after backward unless
        # retain_graph=True), and so that saved-tensor hooks see exactly what this method holds. The solution
        # itself is saved only for the t-gradient, so that the caller may write into it when t needs none.
        saved_output = (solution,) if ctx.needs_input_grad[2] else ()
        ctx.save_for_backward(t, *params, *tensors, *saved_output)
        return solution

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "The symplectic adjoint does not support double backward (create_graph=True). "
                "Use torchdiffeq.odeint (backprop through the solver) for higher-order derivatives.")
        t, *rest = ctx.saved_tensors
        params, rest = tuple(rest[:ctx.num_params]), rest[ctx.num_params:]
        output = rest.pop() if ctx.needs_input_grad[2] else None
        trajectory = Trajectory.unpack(rest, ctx.structure)
        host: HostSolver = ctx.host
        replay: _Replay = ctx.replay
        cotangents = _per_slot(grad_output, ctx.slots, len(t))

        with replay.buffers.restoring():
            grad_y0, grad_params, lam_without_output0 = backward_sweep(host, trajectory, t, cotangents, params,
                                                                       replay)
            grad_t = None
            if output is not None:
                values = _per_slot(output, ctx.slots, len(t))
                with replay.autocast.entered():
                    grad_t = time_gradient(host, t, trajectory.states[0], values, cotangents, lam_without_output0)
        return (None, grad_y0, grad_t, *grad_params)


def _per_slot(rows: torch.Tensor, slots: Sequence[int] | None, num_slots: int) -> list[torch.Tensor | None]:
    """The rows of a returned tensor, one per output slot (views); ``None`` for a slot that was not returned."""
    if slots is None:
        return list(rows.unbind(0))
    per_slot: list[torch.Tensor | None] = [None] * num_slots
    for row, slot in zip(rows.unbind(0), slots):
        per_slot[slot] = row
    return per_slot


def backward_sweep(host: HostSolver, trajectory: Trajectory, t: torch.Tensor,
                   cotangents: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor],
                   replay: _Replay | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Runs the reverse sweep over all accepted steps.

    Args:
        cotangents: per output slot (``len(t)`` of them), the cotangent of that slot's state (shaped like the
            state), or ``None`` where it is zero.
        replay: what the forward pass saw (autocast state, ...); ``None``: no autocast, no buffers to guard.
    Returns:
        ``(∂L/∂y_0, [∂L/∂θ], λ_0 without the direct cotangent of output 0)``.
    Raises:
        RuntimeError: when a replayed step does not reproduce the forward pass's end state (see ``ReplayCheck``).
    """
    sweep = _Sweep(host, trajectory, t, cotangents, params, replay)
    next_state = trajectory.states[-1]
    for n, restart in _reversed_states(host, trajectory, sweep.evaluate):
        sweep.reverse_step(n, restart, next_state)
        next_state = restart.state
    _drop_graphs(trajectory)
    sweep.check.raise_if_failed(replay.buffers.suspects if replay is not None else ())
    shape = trajectory.states[0].shape
    lam_without_output0 = sweep.lam.clone().view(shape)
    grad_y0 = lam_without_output0 if cotangents[0] is None else lam_without_output0 + cotangents[0]
    return grad_y0, sweep.grad_params, lam_without_output0


def _reversed_states(host: HostSolver, trajectory: Trajectory, evaluate: _Evaluator):
    """``(n, restart_n)`` for ``n = N - 1, ..., 0``: the kept states as they are, the others recomputed from the
    nearest kept one (``core.checkpointing``)."""
    n_steps = trajectory.num_steps
    extra = trajectory.restart_extra or [None] * n_steps
    kept = {n: Restart(trajectory.states[n], trajectory.carried[n], extra[n])
            for n in range(n_steps) if trajectory.states[n] is not None}

    def advance(n: int, restart: Restart) -> Restart:
        with torch.no_grad():
            return host.advance(trajectory, n, restart, evaluate.replaying)

    return reversed_states(n_steps, kept, advance, trajectory.snapshots)


class _Sweep:
    """The reverse sweep's working state: the buffers every step reuses.

    ``rows`` is ``(s, numel)``: row ``i - 1`` belongs to stage ``i ≥ 1``, the last row holds ``λ``. A stage's row holds
    its input ``Y_i`` (when the step is replayed) until the stage is differentiated, then ``μ_i = ∂L/∂Y_i`` (zero for a
    stage not differentiated here): the stages are visited last to first, so when stage ``i`` is reached the rows after
    it are all ``μ`` and the rows up to it all ``Y``, and one buffer does for both. Stage 0 needs no row: its input is
    ``y_n`` itself and its ``μ_0``, read by no other stage, goes straight into ``λ``. With ``weights_n = [h·A; h·b]``
    (``(s + 1, s)``), stage ``i``'s cotangent ``κ_i = h (b_i λ + Σ_{j>i} a_ji μ_j)`` is one matrix–vector product over
    the rows after its own, ``rows[i:].T @ weights_n[i+1:, i]``, and ``λ_n = λ_{n+1} + Σ_i μ_i``.
    """

    def __init__(self, host: HostSolver, trajectory: Trajectory, t: torch.Tensor,
                 cotangents: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor], replay: _Replay | None):
        self.host, self.trajectory, self.t, self.cotangents = host, trajectory, t, cotangents
        self.tableau = host.tableau
        s = self.tableau.num_stages
        y_init = trajectory.states[0]  # always kept
        numel, dtype, device = y_init.numel(), y_init.dtype, y_init.device
        self.params = tuple(params)
        self.evaluate = _Evaluator(host, trajectory, replay, y_init.shape)
        self.rows = torch.zeros(s, numel, dtype=dtype, device=device)
        # Views made once: a sweep takes thousands of steps, and each view made per stage costs as much as a small op.
        self.row_list = self.rows.unbind(0)
        self.shaped_rows = [row.view(y_init.shape) for row in self.row_list]
        self.rows_t = self.rows.T
        self.lam = self.row_list[s - 1]
        self.grad_params = [torch.zeros_like(p) for p in self.params]
        self.carry_cotangent: torch.Tensor | None = None  # of the next step's first stage, carried from this one
        self.checked = host.checked_entries if host.checked_entries != slice(None) else None
        self.check = ReplayCheck(self._checked(y_init.reshape(-1)), s)
        self.coefficients = _step_coefficients(host, trajectory, dtype, device)
        # Only parameters with tensor hooks need them suspended; most have none, and the check is per stage otherwise.
        self.hooked = tuple(p for p in self.params if p._backward_hooks)

    def _checked(self, flat: torch.Tensor) -> torch.Tensor:
        """The entries of a flat state the replay check compares."""
        return flat if self.checked is None else flat[self.checked]

    def reverse_step(self, n: int, restart: Restart, next_state: torch.Tensor) -> None:
        """``λ_{n+1} → λ_n`` over step ``n`` (from ``restart``, to ``next_state`` = ``y_{n+1}``), adding the step's
        parameter gradient into ``grad_params``."""
        calls = self.host.stage_calls(self.trajectory, n)
        extra_kappa, grad_y0_from_outputs = self._outputs_in_step(n, restart.state, next_state)
        plan = self.tableau.backward_plan(tuple(e is not None for e in extra_kappa))
        ha, hb, weights = self.coefficients(n)
        if self.trajectory.rebuild_step_graphs and self.trajectory.inputs_of(n) is None:
            self._reverse_through_step_graph(n, restart, next_state, calls, plan, extra_kappa, ha, hb)
        else:
            self._reverse_stage_by_stage(n, restart, next_state, calls, plan, extra_kappa, ha, hb, weights)
        if grad_y0_from_outputs is not None:
            self.lam += grad_y0_from_outputs

    def _reverse_stage_by_stage(self, n: int, restart: Restart, next_state: torch.Tensor,
                                calls: Sequence[StageCall | None], plan: StagePlan,
                                extra_kappa: list[torch.Tensor | None], ha: torch.Tensor, hb: torch.Tensor,
                                weights: torch.Tensor) -> None:
        """The reverse stage sweep of the module docstring, one graph of ``f`` at a time."""
        s = self.tableau.num_stages
        y0 = restart.state.reshape(-1)
        carried = restart.carried
        # κ_i = rows.T @ weights[1:, i] over all the rows: the rows up to stage i's own hold stage inputs, and their
        # weights h·a_ji (j <= i) are zero in an explicit method.
        columns = weights[1:].T.unbind(0)
        hb_list = hb.unbind(0)
        graphs = self.trajectory.graphs_of(n)
        # A step keeps all its graphs or none (core.recording): one that evaluates f again is checked.
        replayed = graphs is None or not any(g is not None and g.alive for g in graphs)
        if replayed:
            self.check.begin_step(n, self._checked(y0), hb)
        inputs = self.trajectory.inputs_of(n)  # kept by the forward pass (within the memory budget), or recomputed
        if inputs is None:
            inputs = self._recompute_stage_inputs(n, calls, y0, ha, plan, carried)

        # Each stage's row ends holding its μ, or zero; μ_0 goes into λ.
        lam = self.lam
        self.carry_cotangent = None
        for i in reversed(range(s)):
            mu = self.row_list[i - 1] if i > 0 else None
            if not plan.vjp[i]:
                _write(mu, None)
                continue
            kappa = torch.mv(self.rows_t, columns[i])
            if extra_kappa[i] is not None:
                kappa += extra_kappa[i]
            if i == 0 and calls[0] is None:  # carried in from the previous step: its cotangent goes there
                self.carry_cotangent = kappa
                if replayed:
                    self.check.add_stage(0, self._checked(carried.reshape(-1)), hb_list[0])
                continue
            graph = graphs[i] if graphs is not None else None
            if i == 0 and graph is not None and graph.alive and self._shares_previous_last_stage(n, graph):
                # First same as last, both steps with graphs: one evaluation, differentiated once, in step n - 1
                # with both cotangents (its last stage input is y_n there); a graph is never differentiated twice.
                graph.uses -= 1
                self.carry_cotangent = kappa
                continue
            if graph is not None and graph.alive:  # the forward pass's own graph of this stage
                grad = self._graph_vjp(graph, kappa)
            else:
                grad, value = self._stage_vjp(n, i, calls[i], inputs[i], kappa)
                if replayed:  # before the row (Y_i, which the value may be a view of) becomes μ_i
                    self.check.add_stage(i, self._checked(value), hb_list[i])
            if mu is not None:
                _write(mu, self.shaped_rows[i - 1], grad)
            elif grad is not None:
                lam.view(grad.shape).add_(grad)
        if replayed:
            self.check.end_step(n, self._checked(next_state.reshape(-1)))
        for mu in self.row_list[:-1]:  # λ_n = λ_{n+1} + Σ μ_i, in place: no state-sized temporary
            lam += mu

    def _reverse_through_step_graph(self, n: int, restart: Restart, next_state: torch.Tensor,
                                    calls: Sequence[StageCall | None], plan: StagePlan,
                                    extra_kappa: list[torch.Tensor | None], ha: torch.Tensor,
                                    hb: torch.Tensor) -> None:
        """Step ``n`` replayed with one graph through all of it (each stage's evaluation of ``f`` and the stage
        combinations ``Y_i = y_n + Σ_j h a_ij k_j``, ``y_{n+1} = y_n + Σ_i h b_i k_i``), then differentiated by one call
        into autograd's engine with the cotangents ``λ_{n+1}`` of ``y_{n+1}`` and ``extra_kappa`` of the stages.

        Reverse-mode differentiation of an explicit Runge–Kutta step is the adjoint step of the module docstring (the
        symplectic partitioned one; Sanz-Serna 2016): the same ``λ_n`` and ``∂L/∂θ``, to rounding, with the engine doing
        in C++ what the stage-by-stage sweep does in Python, one engine call per step instead of ``s``. All the step's
        ``s`` graphs are alive until that call: the memory budget planned for them (``BudgetLedger.rebuild_bytes``)."""
        s, a, b = self.tableau.num_stages, self.tableau.a, self.tableau.b
        shape, check = self.evaluate.shape, self.check
        check.begin_step(n, self._checked(restart.state.reshape(-1)), hb, sums=False)  # y_{n+1} is formed below
        stages: list[torch.Tensor | None] = [None] * s
        carried = None
        with torch.enable_grad():
            y = restart.state.detach().reshape(shape).requires_grad_(True)
            for i in range(s):
                if not plan.vjp[i]:  # nothing reads it
                    continue
                if i == 0 and calls[0] is None:  # carried in from the previous step: its cotangent goes there
                    carried = restart.carried.detach().reshape(shape).requires_grad_(True)
                    k = carried
                else:
                    y_i = y
                    for j in range(i):
                        if a[i][j] != 0.0:
                            y_i = torch.addcmul(y_i, stages[j], ha[i, j])
                    k = self.evaluate(n, i, calls[i], y_i)
                check.note_stage(i, self._checked(k.detach().reshape(-1)))
                stages[i] = k
            y1 = y
            for i in range(s):
                if b[i] != 0.0:
                    y1 = torch.addcmul(y1, stages[i], hb[i])
        outputs, cotangents = [y1], [self.lam.view(shape)]
        for k, extra in zip(stages, extra_kappa):
            if extra is not None and k is not None and k.requires_grad:
                outputs.append(k)
                cotangents.append(extra.view(shape))
        stages = k = None  # the graph holds what it needs
        grads = self._vjp_of(tuple(outputs), tuple(cotangents), (y,) if carried is None else (y, carried))
        self.lam.view(shape).copy_(grads[0])  # y_{n+1} = y_n + ...: never None
        self.carry_cotangent = None if carried is None or grads[1] is None else grads[1].reshape(-1)
        check.end_step(n, self._checked(next_state.reshape(-1)), replayed=self._checked(y1.detach().reshape(-1)))

    def _shares_previous_last_stage(self, n: int, graph: KeptGraph) -> bool:
        previous = self.trajectory.graphs_of(n - 1) if n > 0 else None
        return previous is not None and previous[-1] is graph

    def _outputs_in_step(self, n: int, y0: torch.Tensor,
                         y1: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        """The outputs produced between ``t_n`` and ``t_{n+1}`` (``y0``, ``y1``: the step's end states, shaped like
        the state): their cotangents enter ``λ`` (through ``y_{n+1}``, added here), and are returned as the extra
        stage cotangents (with the one carried into the next step) and the extra cotangent of ``y_n``. All of the
        step's outputs go through one vector–Jacobian product."""
        s = self.tableau.num_stages
        extra_kappa: list[torch.Tensor | None] = [None] * s
        extra_kappa[-1] = self.carry_cotangent
        outputs = [j for j in self.trajectory.outputs_in_step.get(n, ()) if self.cotangents[j] is not None]
        if not outputs:
            return extra_kappa, None
        cotangents = torch.stack([self.cotangents[j] for j in outputs])
        g_y0, g_y1, g_k = self._dense_output_vjp(n, y0, y1, self.t[outputs], cotangents)
        self.lam += g_y1
        extra_kappa = [_add(e, g) for e, g in zip(extra_kappa, g_k)]
        return extra_kappa, g_y0


    # -- the step's pieces: each takes only what the sweep does not already hold -----------------------------------
    def _recompute_stage_inputs(self, n: int, calls: Sequence[StageCall | None], y0: torch.Tensor, ha: torch.Tensor,
                                plan: StagePlan, carried: torch.Tensor | None) -> list[torch.Tensor]:
        """Replays step ``n`` without a graph: the stage inputs ``Y_i = y_n + Σ_{j<i} (hA)_ij k_j`` (flat; ``Y_0`` is
        ``y0``, the others are written into their rows), evaluating ``k_j`` only where a later differentiated stage
        reads it. Each ``k_j`` is added into the later inputs as soon as it is known, so no stage value is held."""
        later, evaluate = self.rows[:-1], self.evaluate  # Y_1 .. Y_{s-1}
        later.copy_(y0.expand_as(later))
        inputs = [y0, *later.unbind(0)]
        for i in range(len(calls) - 1):
            if not plan.value[i]:
                continue
            if i == 0 and calls[0] is None:
                k = carried.reshape(-1)
            else:
                k = evaluate(n, i, calls[i], inputs[i].view(evaluate.shape)).reshape(-1)
            later[i:].addr_(ha[i + 1:, i], k)
        return inputs

    def _stage_vjp(self, n: int, i: int, call: StageCall, y: torch.Tensor,
                   cotangent: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(μ, k)``: ``μ = κᵀ ∂f/∂y`` at stage ``i`` of step ``n`` (``y``, ``cotangent``: flat; ``μ`` shaped like the
        state, ``None`` for zero) and ``f``'s value there (flat); adds ``κᵀ ∂f/∂θ`` into ``grad_params``. One graph of
        ``f``, freed on return."""
        shape = self.evaluate.shape
        with torch.enable_grad():
            y = y.detach().reshape(shape).requires_grad_(True)
            out = self.evaluate(n, i, call, y)
        value = out.detach().reshape(-1)
        if not out.requires_grad:  # f ignores both y and θ
            return None, value
        return self._vjp_of((out,), (cotangent.view(shape),), (y,))[0], value

    def _graph_vjp(self, graph: KeptGraph, cotangent: torch.Tensor) -> torch.Tensor | None:
        """``μ = κᵀ ∂f/∂y`` (shaped like the state, ``None`` for zero) on the graph the forward pass kept (no evaluation
        of ``f``); adds ``κᵀ ∂f/∂θ`` into ``grad_params``. The graph is freed after its last use."""
        graph.uses -= 1
        (mu,) = self._vjp_of((graph.output,), (cotangent.view(graph.shape),), (graph.leaf,),
                             retain_graph=graph.uses > 0)
        if graph.uses <= 0:
            graph.drop()
        return mu

    def _vjp_of(self, outputs: tuple, cotangents: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...],
                retain_graph: bool = False) -> tuple[torch.Tensor | None, ...]:
        """The gradients w.r.t. ``inputs`` of ``outputs · cotangents`` (each shaped like its input; ``None`` for zero),
        written nowhere yet: copied into its row, a gradient needs no flat copy of its own; the gradient w.r.t. the
        parameters is added into ``grad_params`` (with the parameters' own hooks suspended: they run once, on the
        total)."""
        if self.hooked:
            with hooks_suspended(self.hooked):
                grads = vjp(outputs, cotangents, (*inputs, *self.params), retain_graph=retain_graph)
        else:
            grads = vjp(outputs, cotangents, (*inputs, *self.params), retain_graph=retain_graph)
        _accumulate(self.grad_params, grads[len(inputs):])
        return grads[:len(inputs)]

    def _dense_output_vjp(self, n: int, y0: torch.Tensor, y1: torch.Tensor, t_out: torch.Tensor,
                          cotangents: torch.Tensor):
        """Cotangents of ``(y_n, y_{n+1}, k_1..k_s)`` (flat) from the ``m`` outputs produced inside step ``n`` at the
        times ``t_out`` (``(m,)``), whose cotangents are ``cotangents`` (``(m, *state shape)``): one fit of the
        interpolant, one vector–Jacobian product. ``None`` for a stage the outputs do not depend on. The stages enter
        as zeros: dense output is linear in them."""
        host, evaluate = self.host, self.evaluate
        with torch.enable_grad(), (evaluate.autocast() if evaluate.autocast is not None else contextlib.nullcontext()):
            y0 = y0.detach().requires_grad_(True)
            y1 = y1.detach().requires_grad_(True)
            # Zero stages that take no memory (expanded views of one zero each): the VJP materialises only the stages
            # the outputs read.
            k = [y0.new_zeros(()).requires_grad_(True).expand(y0.shape) for _ in range(self.tableau.num_stages)]
            out = host.dense_output(self.trajectory, n, y0, y1, k, t_out.detach())
        if out.shape != cotangents.shape:
            raise TypeError(f"{type(host).__name__}.dense_output returned shape {tuple(out.shape)} for {len(t_out)} "
                            f"output time(s); it must return the values at all the times stacked, shape "
                            f"{tuple(cotangents.shape)} (len(t_out), *y0.shape)")
        with hooks_suspended(self.hooked):
            grads = vjp((out,), (cotangents,), (y0, y1, *k, *self.params))
        g_y0, g_y1 = (torch.zeros_like(y0) if g is None else g for g in grads[:2])
        g_k = [None if g is None else g.reshape(-1) for g in grads[2:2 + len(k)]]
        _accumulate(self.grad_params, grads[2 + len(k):])
        return g_y0.reshape(-1), g_y1.reshape(-1), g_k


def _write(row: torch.Tensor | None, shaped_row: torch.Tensor | None = None,
           grad: torch.Tensor | None = None) -> None:
    """``row`` (flat) ``= grad`` (any shape of as many elements; ``None``: zero); nothing when ``row`` is ``None``.
    ``shaped_row``: a view of ``row`` shaped like the state, used when ``grad`` has that shape."""
    if row is None:
        return
    if grad is None:
        row.zero_()
    elif shaped_row is not None and grad.shape == shaped_row.shape:
        shaped_row.copy_(grad)
    else:
        row.view(grad.shape).copy_(grad)


def _add(total: torch.Tensor | None, term: torch.Tensor | None) -> torch.Tensor | None:
    """``total + term``, where ``None`` stands for zero."""
    return term if total is None else total if term is None else total + term


def _drop_graphs(trajectory: Trajectory) -> None:
    """Frees the graphs the backward pass left (a shared first-same-as-last stage not differentiated twice)."""
    for graphs in trajectory.stage_graphs or ():
        for graph in graphs or ():
            if graph is not None:
                graph.drop()


class _Evaluator:
    """Evaluates ``f`` in the backward pass as the forward pass did: same autocast state, and for a stage that
    drew random numbers, the same generator state (then the generators are put back)."""

    def __init__(self, host: HostSolver, trajectory: Trajectory, replay: _Replay | None, shape: torch.Size):
        self.host, self.trajectory, self.shape = host, trajectory, shape
        self.autocast = replay.autocast.entered if replay is not None and replay.autocast.needs_entering() else None

    def __call__(self, n: int | None, i: int | None, call: StageCall, y: torch.Tensor) -> torch.Tensor:
        """``f`` at stage ``i`` of step ``n`` (``n = None``: not a stage, e.g. a dense-output evaluation)."""
        rng = self.trajectory.rng_state(n, i) if n is not None else None
        if rng is None and self.autocast is None:
            return self.host.vector_field(call.t, y, call.kwargs)
        with self._entered(rng):
            return self.host.vector_field(call.t, y, call.kwargs)

    def replaying(self, n: int, i: int) -> contextlib.AbstractContextManager:
        """The context in which stage ``i`` of step ``n`` is evaluated again (for a host's own step: see
        ``HostSolver.advance``)."""
        return self._entered(self.trajectory.rng_state(n, i))

    @contextlib.contextmanager
    def _entered(self, rng):
        with contextlib.ExitStack() as stack:
            if self.autocast is not None:
                stack.enter_context(self.autocast())
            if rng is not None:
                stack.enter_context(rng.restored())
            yield


def _accumulate(totals: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``totals[j] += grads[j]`` where ``grads[j]`` is not ``None``, in one fused call."""
    if not any(g is None for g in grads):
        if totals:
            torch._foreach_add_(totals, list(grads))
        return
    pairs = [(total, g) for total, g in zip(totals, grads) if g is not None]
    if pairs:
        torch._foreach_add_([total for total, _ in pairs], [g for _, g in pairs])


def _step_coefficients(host: HostSolver, trajectory: Trajectory, dtype: torch.dtype, device: torch.device):
    """``n -> (h·A, h·b, [h·A; h·b])`` for every step (shapes ``(s, s)``, ``(s,)``, ``(s + 1, s)``): the host's own,
    or (by default) ``dt[n]·[A; b]``."""
    if type(host).step_coefficients is not HostSolver.step_coefficients:
        def per_step(n):
            ha, hb = host.step_coefficients(trajectory, n)
            return ha, hb, torch.cat((ha, hb[None]))
        return per_step
    a, b = host.tableau.tensors(dtype, device)
    ab = torch.cat((a, b[None]))
    h = trajectory.dt.to(dtype)

    def per_step(n):  # formed per step: all steps' at once would be (N, s + 1, s) numbers, growing with N
        weights = h[n] * ab
        return weights[:-1], weights[-1], weights
    return per_step


def time_gradient(host: HostSolver, t: torch.Tensor, y0: torch.Tensor, values: Sequence[torch.Tensor | None],
                  cotangents: Sequence[torch.Tensor | None], lam0: torch.Tensor) -> torch.Tensor:
    """``∂L/∂t``: ``g_kᵀ f(t_k, y(t_k))`` for outputs ``k ≥ 1`` and ``-λ_0ᵀ f(t_0, y_0)`` for the start.

    The same formula as ``torchdiffeq.odeint_adjoint`` (the derivative of the exact flow; the discrete
    solution's step sizes are not differentiated, so this is not the derivative of the discrete map). A field that
    draws random numbers draws afresh here, and the generators are put back (backprop's backward draws nothing).
    """
    with torch.no_grad(), generators_kept(y0.device):
        grad_t = torch.zeros_like(t)
        for k in range(1, len(t)):
            if cotangents[k] is None:  # a slot not returned: zero cotangent, zero gradient
                continue
            f_k = host.vector_field(t[k], values[k], ())
            grad_t[k] = (f_k * cotangents[k]).sum().to(t.dtype)
        f_0 = host.vector_field(t[0], y0, ())
        grad_t[0] = -(f_0 * lam0).sum().to(t.dtype)
    return grad_t
