"""The default budget on a solve whose states outweigh the field's graph: the backward pass rebuilds each step's stage
graphs at once from the step's state (``core.budget.BudgetLedger.rebuild_bytes``) and differentiates the step through
them in one engine call, and the forward pass keeps nothing but the states. Each test makes sure the rebuild happened
(a spy counts rebuilt steps), then compares with ``"trajectory"`` (the same evaluations, differentiated one graph at a
time: the same gradient to rounding) or with backprop through the same steps.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from helpers import rel_error
from torch import nn

import symadj_plugins
import symadj_plugins.core.adjoint as adjoint
from symadj_plugins.bench.saved import SavedTensorBytes
from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

T = torch.tensor([0.0, 0.3, 0.45, 1.0], dtype=torch.float64)  # outputs between steps
CONFIGS = {"rk4": dict(method="rk4", options=dict(step_size=0.05)),
           "dopri5": dict(method="dopri5", rtol=1e-11, atol=1e-13, options=dict(first_step=0.05))}


class SmallGraphField(nn.Module):
    """A field whose graph is about one state (tanh's output): a long solve's states soon outweigh s graphs."""

    def __init__(self, dim: int = 4, noise: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.noise = noise
        self.gain = 1.0

    def forward(self, t, y, args=None):  # args: torchdyn passes it to fields that take t
        out = torch.tanh(self.lin(y)) * (self.gain * torch.cos(t))
        if self.noise:
            out = nn.functional.dropout(out, 0.2) + self.noise * torch.randn_like(y)
        return out


class WideField(nn.Module):
    """A field whose graph is many states: the default keeps stage inputs instead."""

    def __init__(self, dim: int = 4, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, dim))

    def forward(self, t, y, args=None):
        return self.net(y)


@pytest.fixture
def rebuilt_steps(monkeypatch):
    """Counts the steps the backward pass rebuilds (a list, appended to per rebuilt step)."""
    calls = []
    original = adjoint._Sweep._reverse_through_step_graph

    def counted(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(adjoint._Sweep, "_reverse_through_step_graph", counted)
    return calls


def _grads(solve, field, y0):
    y = y0.clone().requires_grad_(True)
    out = solve(field, y)
    return out.detach(), torch.autograd.grad(out.pow(2).sum() + out[1].sum(), (y, *field.parameters()))


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_the_default_rebuilds_once_the_states_outweigh_the_graphs_with_trajectorys_gradient(config, rebuilt_steps):
    torch.manual_seed(0)
    field = SmallGraphField().double()
    y0 = torch.randn(256, 4, dtype=torch.float64)
    kwargs = CONFIGS[config]
    out, grads = _grads(lambda f, y: odeint_symplectic_adjoint(f, y, T, **kwargs), field, y0)
    assert len(rebuilt_steps) > 10
    rebuilt_steps.clear()
    ref_out, ref_grads = _grads(lambda f, y: odeint_symplectic_adjoint(f, y, T, memory_budget="trajectory", **kwargs),
                                field, y0)
    assert not rebuilt_steps  # "trajectory" holds one graph at a time
    assert torch.equal(out, ref_out)
    assert rel_error(grads, ref_grads) <= 1e-13
    _, backprop = _grads(lambda f, y: torchdiffeq.odeint(f, y, T, **kwargs), field, y0)
    if config == "rk4":  # (dopri5: backprop differentiates the step sizes too)
        assert rel_error(grads, backprop) <= 1e-10


def test_the_default_keeps_stage_inputs_when_the_graphs_outweigh_the_states(rebuilt_steps):
    torch.manual_seed(1)
    field = WideField().double()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    kwargs = CONFIGS["rk4"]
    _, grads = _grads(lambda f, y: odeint_symplectic_adjoint(f, y, T, **kwargs), field, y0)
    assert not rebuilt_steps
    _, backprop = _grads(lambda f, y: torchdiffeq.odeint(f, y, T, **kwargs), field, y0)
    assert rel_error(grads, backprop) <= 1e-10


def test_torchdyn_rebuilds_too(registered, rebuilt_steps):
    from torchdyn.core import NeuralODE

    torch.manual_seed(2)
    field = SmallGraphField().double()
    y0 = torch.randn(256, 4, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 21, dtype=torch.float64)
    results = {}
    for name, budget in [("auto", "auto"), ("trajectory", "trajectory")]:
        model = NeuralODE(field, solver="rk4", sensitivity="symplectic_adjoint", return_t_eval=False)
        with symadj_plugins.options(memory_budget=budget):
            results[name] = _grads(lambda f, y, model=model: model(y, t_span), field, y0)
        if name == "auto":
            assert len(rebuilt_steps) == 20
    model = NeuralODE(field, solver="rk4", sensitivity="autograd", return_t_eval=False)
    _, backprop = _grads(lambda f, y: model(y, t_span), field, y0)
    assert torch.equal(results["auto"][0], results["trajectory"][0])
    assert rel_error(results["auto"][1], results["trajectory"][1]) <= 1e-13
    assert rel_error(results["auto"][1], backprop) <= 1e-10


def test_random_numbers_are_replayed_through_rebuilt_steps(rebuilt_steps):
    torch.manual_seed(3)
    field = SmallGraphField(noise=0.05).double()
    y0 = torch.randn(256, 4, dtype=torch.float64)
    kwargs = CONFIGS["rk4"]
    results = []
    for solve in (odeint_symplectic_adjoint, torchdiffeq.odeint):
        torch.manual_seed(7)
        out, grads = _grads(lambda f, y, solve=solve: solve(f, y, T, **kwargs), field, y0)
        results.append((out, grads, torch.rand(())))
    assert len(rebuilt_steps) > 10
    (out, grads, after), (ref_out, ref_grads, ref_after) = results
    assert torch.equal(out, ref_out)
    assert rel_error(grads, ref_grads) < 1e-10
    assert torch.equal(after, ref_after)  # the replay put the generator back


def test_parameter_hooks_fire_once_through_rebuilt_steps(rebuilt_steps):
    torch.manual_seed(4)
    field = SmallGraphField().double()
    y0 = torch.randn(256, 4, dtype=torch.float64, requires_grad=True)
    calls = []
    handles = [p.register_hook(lambda g: calls.append(1) or 2 * g) for p in field.parameters()]
    try:
        odeint_symplectic_adjoint(field, y0, T, **CONFIGS["rk4"]).pow(2).sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert len(rebuilt_steps) > 10
    assert len(calls) == len(list(field.parameters()))


def test_a_field_changed_between_forward_and_backward_fails_loudly_through_rebuilt_steps(rebuilt_steps):
    torch.manual_seed(5)
    field = SmallGraphField().double()
    y0 = torch.randn(256, 4, dtype=torch.float64, requires_grad=True)
    out = odeint_symplectic_adjoint(field, y0, T, **CONFIGS["rk4"])
    field.gain = 1.5  # an attribute set between the forward pass and backward()
    with pytest.raises(RuntimeError, match="did not reproduce the forward pass"):
        out.pow(2).sum().backward()
    assert rebuilt_steps


def test_the_default_holds_the_trajectory_between_forward_and_backward_and_s_graphs_in_backward(rebuilt_steps):
    torch.manual_seed(6)
    field = SmallGraphField().double()
    y0 = torch.randn(256, 4, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 2, dtype=torch.float64)
    kwargs = CONFIGS["rk4"]
    one_graph = SavedTensorBytes(exclude=[*field.parameters()])
    with one_graph:
        field(t[0], y0.detach().requires_grad_())
    state = y0.numel() * y0.element_size()

    def held_and_backward_peak(budget):
        held = SavedTensorBytes(exclude=[*field.parameters(), y0, t])
        with held:
            out = odeint_symplectic_adjoint(field, y0, t, memory_budget=budget, **kwargs)
        backward = SavedTensorBytes(exclude=[*field.parameters()])
        with backward:
            out.pow(2).sum().backward()
        return held.held, backward.peak

    trajectory_held, trajectory_peak = held_and_backward_peak("trajectory")
    assert not rebuilt_steps
    held, peak = held_and_backward_peak("auto")
    assert rebuilt_steps
    assert held == trajectory_held  # the forward pass kept nothing but the states
    # rk4: four graphs at once, each saving its own copy of its stage input (one state: the input's graph saves it).
    assert trajectory_peak <= one_graph.total + state
    assert 3 * one_graph.total < peak <= 4 * (one_graph.total + state), (peak, one_graph.total)
