"""Memory claims, measured with saved-tensor hooks (what autograd holds for backward):

- between forward and backward the symplectic adjoint holds the trajectory, one state per accepted step,
  and nothing that grows with the network;
- during backward, at most one graph of ``func`` is alive at a time;
- what the solve kept is freed when backward is done, without the garbage collector (no reference cycles).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torchdiffeq
from helpers import TimeDependentField

from symadj_plugins.bench.saved import SavedTensorBytes
from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

STEPS = 20  # fixed grid: the same number of steps whatever the network


def held_between_forward_and_backward(solve, width, depth):
    torch.manual_seed(0)
    func = TimeDependentField(dim=4, width=width, depth=depth).double()
    y0 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    meter = SavedTensorBytes(exclude=[*func.parameters(), y0, t])
    with meter:
        out = solve(func, y0, t)
    return meter.total, y0.numel() * y0.element_size(), out


def ours(func, y0, t):  # one state per step (the paper's method; "min" keeps fewer, see test_checkpointing.py)
    return odeint_symplectic_adjoint(func, y0, t, method="rk4", options={"step_size": 1.0 / STEPS},
                                     memory_budget="trajectory")


def backprop(func, y0, t):
    return torchdiffeq.odeint(func, y0, t, method="rk4", options={"step_size": 1.0 / STEPS})


def test_held_memory_is_the_trajectory_and_does_not_grow_with_the_network():
    base, state_bytes, out = held_between_forward_and_backward(ours, width=16, depth=1)
    wider, _, _ = held_between_forward_and_backward(ours, width=64, depth=1)
    deeper, _, _ = held_between_forward_and_backward(ours, width=16, depth=4)
    assert base == wider == deeper
    # (N + 1) states, the returned solution (saved for ∂L/∂t), and 3 scalars per step.
    trajectory = (STEPS + 1) * state_bytes
    solution = out.numel() * out.element_size()
    assert trajectory <= base <= trajectory + solution + 3 * STEPS * 8 + 64


def test_stored_stages_hold_s_states_per_step_and_still_nothing_from_the_network():
    def stored(func, y0, t):
        return odeint_symplectic_adjoint(func, y0, t, method="rk4", options={"step_size": 1.0 / STEPS},
                                         store_stages=True)

    base, state_bytes, out = held_between_forward_and_backward(stored, width=16, depth=1)
    wider, _, _ = held_between_forward_and_backward(stored, width=64, depth=4)
    assert base == wider
    held = (STEPS + 1) * state_bytes + STEPS * 4 * state_bytes  # states + 4 stage inputs per rk4 step
    solution = out.numel() * out.element_size()
    assert held <= base <= held + solution + 3 * STEPS * 8 + 64


def test_backprop_memory_grows_with_the_network_for_comparison():
    base, _, _ = held_between_forward_and_backward(backprop, width=16, depth=1)
    wider, _, _ = held_between_forward_and_backward(backprop, width=64, depth=1)
    ours_base, _, _ = held_between_forward_and_backward(ours, width=16, depth=1)
    assert wider > 3 * base and base > 4 * ours_base


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("dopri5", {}),
                                            ("rk4", {"step_size": 0.1, "interp": "cubic"})])
def test_at_most_one_graph_of_func_alive_during_backward(method, options):
    torch.manual_seed(0)
    func = TimeDependentField(dim=4, width=32, depth=3).double()
    y0 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.33, 1.0], dtype=torch.float64)

    one_graph = SavedTensorBytes(exclude=[*func.parameters()])
    with one_graph:
        func(t[0], y0.detach().requires_grad_())
    assert one_graph.total > 0

    out = odeint_symplectic_adjoint(func, y0, t, method=method, options=options)
    meter = SavedTensorBytes(exclude=[*func.parameters()])
    with meter:
        out.pow(2).sum().backward()
    assert meter.total > 0, "the hooks must see the graphs built in backward"
    # One graph of func, plus (cubic dense output) a few interpolation weights: far below two graphs.
    slack = y0.numel() * y0.element_size()
    assert meter.peak <= one_graph.total + slack, (meter.peak, one_graph.total)


def _tensors_alive() -> set[int]:
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}


@pytest.mark.parametrize("budget", ["min", "trajectory", "stages", "max", "auto", 2000])
@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", {})])
def test_the_solve_leaves_nothing_for_the_garbage_collector(budget, method, options):
    """Reference counting frees everything after backward: a reference cycle would keep every kept state (and
    stage input) alive until the collector happens to run."""
    func = TimeDependentField(dim=4, width=16).double()
    y0 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)

    def solve_and_backward():
        out = odeint_symplectic_adjoint(func, y0, t, method=method, options=dict(options), memory_budget=budget)
        out.sum().backward()

    solve_and_backward()  # warm-up: caches (tableau tensors) are filled once
    gc.collect()
    gc.disable()
    try:
        before = _tensors_alive()
        solve_and_backward()
        left = _tensors_alive() - before
    finally:
        gc.enable()
    assert not left, f"{len(left)} tensors left for the garbage collector"
