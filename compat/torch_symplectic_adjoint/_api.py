"""The five entry points of ``torch_symplectic_adjoint``, on torchdiffeq's solvers and symadj-plugins' adjoint.

=============================  ==============================================================================
function                       what runs
=============================  ==============================================================================
``odeint``                     the torchdiffeq solver; gradients by backprop through it
``odeint_adjoint``             ``torchdiffeq.odeint_adjoint`` (the continuous adjoint)
``odeint_symplectic_adjoint``  ``symadj_plugins.torchdiffeq.odeint_symplectic_adjoint`` (exact, low memory)
``odeint_checkpoint``          one no-grad solve keeping each accepted step's state; backward recomputes one
                               step at a time with a graph and backpropagates through it (ACA-style)
``odeint_onecheckpoint``       one no-grad solve keeping ``y0``; backward solves again with a graph and
                               backpropagates through the whole solve
=============================  ==============================================================================

Method names are the original's (``rk4`` classical, ``rk38`` the 3/8 rule): see ``_methods``. Gradients of
``odeint_symplectic_adjoint`` and ``odeint_checkpoint`` equal backprop through the same accepted steps with the
step sizes held constant (up to rounding), like the original's; ``odeint_onecheckpoint``'s equal ``odeint``'s.
``event_fn`` was never supported by the original (it asserted ``event_fn is None``) and is not here.
"""

from __future__ import annotations

import torch

from symadj_plugins import torchdiffeq as _adapter
from symadj_plugins.core import Trajectory, odeint_symplectic
from symadj_plugins.inputs import check_times

from . import _host
from ._methods import SOLVERS, ClassicalRK4, check_method, prepare, torchdiffeq_name

__all__ = ["odeint", "odeint_adjoint", "odeint_symplectic_adjoint", "odeint_checkpoint", "odeint_onecheckpoint"]


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Solves ``dy/dt = func(t, y)``, ``y(t[0]) = y0``; returns ``y`` at every time of ``t``.

    Gradients by backpropagation through the solver (memory grows with the number of steps × network size).
    """
    _no_events(event_fn)
    method, options = prepare(method, options, t)
    shapes, func, y0, t_norm, rtol, atol, options = _host.normalise(func, y0, t, rtol, atol, method, options)
    solution = SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options).integrate(t_norm)
    return _unflatten(solution, t, shapes)


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """``odeint`` with gradients by the continuous adjoint method (``torchdiffeq.odeint_adjoint``).

    The backward pass solves the adjoint ODE with ``adjoint_method`` (default: ``method``) at ``adjoint_rtol``
    / ``adjoint_atol`` (default: ``rtol`` / ``atol``): the gradient is approximate. For the exact gradient at
    similar memory use :func:`odeint_symplectic_adjoint`.
    """
    _no_events(event_fn)
    method, options = prepare(method, options, t)
    td_method = _torchdiffeq_method_for_adjoint(method, "method")
    td_adjoint_method = None
    if adjoint_method is not None:
        adjoint_method = check_method(adjoint_method)
        td_adjoint_method = _torchdiffeq_method_for_adjoint(adjoint_method, "adjoint_method")
    if adjoint_options is None and adjoint_method is not None and adjoint_method != method:
        # torchdiffeq copies options into adjoint_options; options of another kind of solver would be rejected.
        adjoint_options = {}
    return _adapter.odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=td_method, options=options,
                                   adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                   adjoint_method=td_adjoint_method, adjoint_options=adjoint_options,
                                   adjoint_params=adjoint_params)


def odeint_symplectic_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                              adjoint_params=None):
    """``odeint`` with the exact gradient by the symplectic adjoint method (Matsubara et al., NeurIPS 2021).

    Memory held for backward: one state per accepted step plus one evaluation of ``func``'s graph at a time, as the
    original's (``memory_budget="trajectory"`` of symadj-plugins, whose own default may keep more).
    ``adjoint_params`` defaults to the parameters of ``func`` when it is an ``nn.Module`` (otherwise none).
    """
    _no_events(event_fn)
    method, options = prepare(method, options, t)
    params = _host.default_params(func, adjoint_params)
    if SOLVERS[method] is not ClassicalRK4:
        return _adapter.odeint_symplectic_adjoint(func, y0, t, rtol=rtol, atol=atol, method=torchdiffeq_name(method),
                                                  options=options, adjoint_params=params,
                                                  memory_budget="trajectory")
    check_times(t)
    shapes, func, y0, t_norm, rtol, atol, options = _host.normalise(func, y0, t, rtol, atol, method, options)
    host = _host.make_host(func, method, rtol, atol, options)
    return _unflatten(odeint_symplectic(host, y0, t_norm, params), t, shapes)


def odeint_checkpoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                      adjoint_params=None):
    """``odeint`` with gradients by per-step checkpointing (ACA, Zhuang et al. 2020).

    The forward pass keeps the state at each accepted step; backward recomputes one step at a time with a
    graph (memory of one step's ``s`` network evaluations) and backpropagates through it. Exact: equals
    backprop through the same steps with step sizes held constant. No gradient w.r.t. ``t`` (as the original).
    """
    _no_events(event_fn)
    method, options = prepare(method, options, t)
    params = _host.default_params(func, adjoint_params)
    check_times(t)
    shapes, func, y0, t_norm, rtol, atol, options = _host.normalise(func, y0, t, rtol, atol, method, options)
    host = _host.make_host(func, method, rtol, atol, options)
    return _unflatten(_PerStepCheckpoint.apply(host, y0, t_norm, *params), t, shapes)


def odeint_onecheckpoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                         adjoint_params=None):
    """``odeint`` whose forward pass keeps only ``y0``; backward solves again with a graph and backpropagates.

    Gradients equal :func:`odeint`'s; memory for backward is the whole graph, but only during backward.
    No gradient w.r.t. ``t`` (as the original).
    """
    _no_events(event_fn)
    method, options = prepare(method, options, t)
    params = _host.default_params(func, adjoint_params)
    shapes, func, y0, t_norm, rtol, atol, options = _host.normalise(func, y0, t, rtol, atol, method, options)
    solver_cls = SOLVERS[method]

    def solve(y):
        return solver_cls(func=func, y0=y, rtol=rtol, atol=atol, **options).integrate(t_norm)

    return _unflatten(_OneCheckpoint.apply(solve, y0, *params), t, shapes)


# --------------------------------------------------------------------------------------------------------

def _no_events(event_fn) -> None:
    if event_fn is not None:
        raise NotImplementedError("torch_symplectic_adjoint does not support event_fn (the original asserted "
                                  "event_fn is None); use torchdiffeq.odeint_event for event handling.")


def _torchdiffeq_method_for_adjoint(method: str, argument: str) -> str:
    name = torchdiffeq_name(method)
    if name is None:
        raise ValueError(
            f"{argument}='rk4' (the classical Runge-Kutta method) is not available to odeint_adjoint here: the "
            "continuous adjoint runs inside torchdiffeq, which has no classical RK4 (torchdiffeq's 'rk4' is the 3/8 "
            "rule, 'rk38' here). Use method='rk38', or odeint_symplectic_adjoint(..., method='rk4') for the exact "
            "gradient of the classical RK4 solution.")
    return name


def _unflatten(solution, t, shapes):
    return solution if shapes is None else _host._flat_to_shape(solution, (len(t),), shapes)


class _PerStepCheckpoint(torch.autograd.Function):
    """Per-step checkpointing. ``forward`` is the adapter's recorded no-grad solve; ``backward`` replays each
    accepted step with a graph, last to first, and backpropagates through it."""

    @staticmethod
    def forward(ctx, host, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor):
        solution, trajectory = host.solve(y0, t)  # raises if torchdiffeq reported no steps (before 0.2.4)
        tensors, meta = trajectory.pack()
        ctx.host, ctx.meta, ctx.num_params = host, meta, len(params)
        ctx.save_for_backward(t, *params, *tensors)
        return solution

    @staticmethod
    def backward(ctx, grad_solution: torch.Tensor):
        if torch.is_grad_enabled():
            raise NotImplementedError("odeint_checkpoint does not support double backward (create_graph=True).")
        t, *rest = ctx.saved_tensors
        params, tensors = tuple(rest[:ctx.num_params]), rest[ctx.num_params:]
        trajectory = Trajectory.unpack(tensors, ctx.meta)
        host = ctx.host

        grad_params = [torch.zeros_like(p) for p in params]
        lam = torch.zeros_like(trajectory.states[-1])  # ∂L/∂y_{n+1}
        carried_cotangent = None  # ∂L/∂(stage value carried from step n into step n+1)
        for n in reversed(range(trajectory.num_steps)):
            carried = trajectory.carried[n]
            with torch.enable_grad():
                y0 = trajectory.states[n].detach().requires_grad_(True)
                first = None if carried is None else carried.detach().requires_grad_(True)
                y1, stages, last = _host.replay_step(host, trajectory, n, y0, first)
                outputs, cotangents = [y1], [lam]
                inside = list(trajectory.outputs_in_step.get(n, ()))
                if inside:  # all of the step's outputs at once: values and cotangents stacked
                    outputs.append(host.dense_output(trajectory, n, y0, y1, stages, t[inside]))
                    cotangents.append(grad_solution[inside])
                if carried_cotangent is not None:
                    outputs.append(last)
                    cotangents.append(carried_cotangent)
                keep = [i for i, out in enumerate(outputs) if out.requires_grad]
                inputs = (y0, *(() if first is None else (first,)), *params)
                grads = torch.autograd.grad([outputs[i] for i in keep], inputs, [cotangents[i] for i in keep],
                                            allow_unused=True)
            lam = torch.zeros_like(y0) if grads[0] is None else grads[0]
            carried_cotangent = None
            if first is not None:
                carried_cotangent = torch.zeros_like(first) if grads[1] is None else grads[1]
            for total, g in zip(grad_params, grads[len(inputs) - len(params):]):
                if g is not None:
                    total.add_(g)
        return (None, lam + grad_solution[0], None, *grad_params)


class _OneCheckpoint(torch.autograd.Function):
    """One checkpoint at ``y0``: ``backward`` solves again with a graph and backpropagates through all of it."""

    @staticmethod
    def forward(ctx, solve, y0: torch.Tensor, *params: torch.Tensor):
        ctx.solve = solve
        ctx.save_for_backward(y0, *params)
        return solve(y0)

    @staticmethod
    def backward(ctx, grad_solution: torch.Tensor):
        if torch.is_grad_enabled():
            raise NotImplementedError("odeint_onecheckpoint does not support double backward (create_graph=True).")
        y0, *params = ctx.saved_tensors
        with torch.enable_grad():
            y = y0.detach().requires_grad_(True)
            solution = ctx.solve(y)
            grads = torch.autograd.grad(solution, (y, *params), grad_solution, allow_unused=True)
        grad_y0 = torch.zeros_like(y0) if grads[0] is None else grads[0]
        return (None, grad_y0, *grads[1:])
