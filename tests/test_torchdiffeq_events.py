"""Events (``event_fn``) with the symplectic adjoint under torchdiffeq.

``odeint_symplectic_adjoint(..., event_fn=...)`` returns torchdiffeq's ``(event_t, solution)`` bit for bit, and
``torchdiffeq.odeint_event`` on top of it gives the gradient of backprop through the same accepted steps (step
sizes constant, first step fixed) plus torchdiffeq's own implicit rerouting of the event time, w.r.t. ``y0``,
the parameters and ``t0``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchdiffeq
from helpers import TimeDependentField, flat_grads, rel_error

import symadj_plugins.torchdiffeq as sa
from symadj_plugins.bench.saved import SavedTensorBytes
from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

TOL = 1e-10
RTOL, ATOL = 1e-6, 1e-7

INTERFACES = {
    "odeint_symplectic_adjoint": odeint_symplectic_adjoint,
    "odeint_adjoint_symplectic": functools.partial(sa.odeint_adjoint, adjoint_method="symplectic"),
}

# (method, options): adaptive solvers, and fixed grids (torchdiffeq needs a step_size for events there).
METHODS = {
    "dopri5": ("dopri5", {}),
    "bosh3": ("bosh3", {}),
    "rk4": ("rk4", {"step_size": 0.05}),
    "rk4-cubic": ("rk4", {"step_size": 0.05, "interp": "cubic"}),
    "midpoint-perturb": ("midpoint", {"step_size": 0.05, "perturb": True}),
}


def make(dtype=torch.float64, seed=0, width=16, depth=1):
    torch.manual_seed(seed)
    func = TimeDependentField(dim=3, width=width, depth=depth).to(dtype)
    y0 = torch.randn(3, dtype=dtype, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    return func, y0, t0


def event_for(reverse_time):
    # Forward in time y.sum() rises through 1 (near t = 1.2); backward in time it rises through 0.3
    # (near t = -2.8), for make()'s field and y0.
    if reverse_time:
        return lambda t, y: y.sum() - 0.3
    return lambda t, y: y.sum() - 1.0 + 0.1 * t


def reference_options(method, options, func, y0, t0, reverse_time):
    options = dict(options)
    if "step_size" not in options:  # adaptive: torchdiffeq.odeint would differentiate its initial step choice
        t = torch.stack([t0.detach(), t0.detach() + (-1.0 if reverse_time else 1.0)])
        options["first_step"] = sa.initial_step(func, y0, t, rtol=RTOL, atol=ATOL, method=method)
    return options


def event_loss(event_t, solution):
    state = solution[-1] if isinstance(solution, torch.Tensor) else torch.cat([s[-1].reshape(-1) for s in solution])
    return 3.0 * event_t + (state ** 2).sum() + state.sin().sum()


@pytest.mark.parametrize("interface", list(INTERFACES))
@pytest.mark.parametrize("reverse_time", [False, True], ids=["forward", "reverse_time"])
@pytest.mark.parametrize("name", list(METHODS))
def test_odeint_event_gradient_is_backprop_through_the_same_steps(name, reverse_time, interface):
    method, options = METHODS[name]
    func, y0, t0 = make()
    ev = event_for(reverse_time)
    kwargs = dict(event_fn=ev, reverse_time=reverse_time, rtol=RTOL, atol=ATOL, method=method)
    want_t, want_sol = torchdiffeq.odeint_event(
        func, y0, t0, odeint_interface=torchdiffeq.odeint,
        options=reference_options(method, options, func, y0, t0, reverse_time), **kwargs)
    got_t, got_sol = torchdiffeq.odeint_event(func, y0, t0, odeint_interface=INTERFACES[interface],
                                              options=options, **kwargs)
    assert torch.equal(got_t, want_t) and torch.equal(got_sol, want_sol), "forward must be torchdiffeq's, bit for bit"
    assert (t0 < got_t) != reverse_time  # the event was found in the direction asked for

    inputs = [y0, t0, *func.parameters()]
    want = flat_grads(event_loss(want_t, want_sol), inputs)
    got = flat_grads(event_loss(got_t, got_sol), inputs)
    assert all(g.abs().sum() > 0 for g in want[:2]), "the reference gradient w.r.t. y0 and t0 must not vanish"
    assert rel_error(got[:1], want[:1]) <= TOL, "y0"
    assert rel_error(got[1:2], want[1:2]) <= TOL, "t0"
    assert rel_error(got[2:], want[2:]) <= TOL, "parameters"


@pytest.mark.parametrize("name", ["dopri5", "rk4", "rk4-cubic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_direct_call_returns_torchdiffeqs_event_time_and_solution(name, dtype):
    method, options = METHODS[name]
    func, y0, t0 = make(dtype)
    t = torch.stack([t0, t0.detach() + 1.0])
    want_t, want_sol = torchdiffeq.odeint(func, y0, t, rtol=RTOL, atol=ATOL, method=method, options=options,
                                          event_fn=event_for(False))
    got_t, got_sol = odeint_symplectic_adjoint(func, y0, t, rtol=RTOL, atol=ATOL, method=method, options=options,
                                               event_fn=event_for(False))
    assert torch.equal(got_t, want_t) and torch.equal(got_sol, want_sol)
    assert got_sol.shape == (2, 3) and not got_t.requires_grad  # the event time is a constant, as in torchdiffeq
    assert got_sol.requires_grad


@pytest.mark.parametrize("name", ["dopri5", "rk4"])
def test_stored_stages_give_the_same_gradient(name):
    method, options = METHODS[name]
    func, y0, t0 = make()
    inputs = [y0, t0, *func.parameters()]
    grads = []
    for store_stages in (False, True):
        solve = functools.partial(odeint_symplectic_adjoint, store_stages=store_stages)
        event_t, solution = torchdiffeq.odeint_event(func, y0, t0, event_fn=event_for(False), rtol=RTOL, atol=ATOL,
                                                     method=method, options=options, odeint_interface=solve)
        grads.append(flat_grads(event_loss(event_t, solution), inputs))
    assert rel_error(grads[1], grads[0]) <= TOL


class Ball(torch.nn.Module):
    """A falling ball with quadratic drag on a tuple state ``(height (1,), velocity (1,), spin (2,))``."""

    def __init__(self):
        super().__init__()
        self.gravity = torch.nn.Parameter(torch.tensor([9.8], dtype=torch.float64))
        self.drag = torch.nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
        self.lin = torch.nn.Linear(2, 2).double()

    def forward(self, t, state):
        height, velocity, spin = state
        dv = -self.gravity - self.drag * velocity * velocity.abs() + 0.1 * spin.sum() * torch.cos(t)
        return velocity, dv, torch.tanh(self.lin(spin)) * 0.1

    @staticmethod
    def event_fn(t, state):
        height, _, spin = state
        return height - 0.2 - 0.01 * spin[0]


@pytest.mark.parametrize("method,options", [("dopri5", {}), ("rk4", {"step_size": 0.02})])
def test_tuple_state(method, options):
    torch.manual_seed(0)
    ball = Ball()
    y0 = (torch.tensor([3.0], dtype=torch.float64, requires_grad=True),
          torch.tensor([0.5], dtype=torch.float64, requires_grad=True),
          torch.randn(2, dtype=torch.float64, requires_grad=True))
    t0 = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    kwargs = dict(event_fn=Ball.event_fn, rtol=RTOL, atol=ATOL, method=method)
    ref_options = dict(options)
    if method == "dopri5":
        ref_options["first_step"] = sa.initial_step(ball, y0, torch.stack([t0, t0 + 1]).detach(), rtol=RTOL, atol=ATOL,
                                                    method=method)
    want_t, want_sol = torchdiffeq.odeint_event(ball, y0, t0, odeint_interface=torchdiffeq.odeint,
                                                options=ref_options, **kwargs)
    got_t, got_sol = torchdiffeq.odeint_event(ball, y0, t0, odeint_interface=odeint_symplectic_adjoint,
                                              options=options, **kwargs)
    assert torch.equal(got_t, want_t)
    assert isinstance(got_sol, tuple) and all(torch.equal(g, w) for g, w in zip(got_sol, want_sol))
    assert [s.shape for s in got_sol] == [(2, 1), (2, 1), (2, 2)]

    inputs = [*y0, t0, *ball.parameters()]
    want = flat_grads(event_loss(want_t, want_sol), inputs)
    got = flat_grads(event_loss(got_t, got_sol), inputs)
    assert want[-1].abs().sum() > 0 and want[3].abs().sum() > 0
    assert rel_error(got, want) <= TOL


def test_event_already_at_t0_returns_y0_with_its_gradient():
    func, y0, t0 = make()
    ev = lambda t, y: t - 0.1  # noqa: E731  (zero at t0 = 0.1: torchdiffeq takes no step)
    t = torch.stack([t0, t0.detach() + 1.0])
    want_t, want_sol = torchdiffeq.odeint(func, y0, t, method="dopri5", event_fn=ev)
    got_t, got_sol = odeint_symplectic_adjoint(func, y0, t, method="dopri5", event_fn=ev)
    assert torch.equal(got_t, want_t) and torch.equal(got_sol, want_sol)
    (grad,) = torch.autograd.grad((got_sol[-1] * torch.arange(1.0, 4.0, dtype=torch.float64)).sum(), y0)
    assert torch.equal(grad, torch.arange(1.0, 4.0, dtype=torch.float64))


def test_other_adjoint_methods_still_go_to_torchdiffeq():
    func, y0, t0 = make()
    kwargs = dict(event_fn=event_for(False), rtol=RTOL, atol=ATOL, method="dopri5")
    want_t, want_sol = torchdiffeq.odeint_event(func, y0, t0, odeint_interface=torchdiffeq.odeint_adjoint, **kwargs)
    got_t, got_sol = torchdiffeq.odeint_event(func, y0, t0, odeint_interface=sa.odeint_adjoint, **kwargs)
    assert torch.equal(got_t, want_t) and torch.equal(got_sol, want_sol)
    want = flat_grads(event_loss(want_t, want_sol), [y0])
    got = flat_grads(event_loss(got_t, got_sol), [y0])
    assert torch.equal(got[0], want[0])


def test_bad_event_inputs_name_the_fix():
    func, y0, t0 = make()
    with pytest.raises(ValueError, match=r"2 times.*odeint_event"):
        odeint_symplectic_adjoint(func, y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64),
                                  event_fn=event_for(False))
    with pytest.raises(ValueError, match=r"step_size"):
        odeint_symplectic_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                                  event_fn=event_for(False))
    with pytest.raises(TypeError, match=r"event_fn must be a callable"):
        odeint_symplectic_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), event_fn=1.0)


# --- memory ----------------------------------------------------------------------------------------------

STEP = 0.05
EVENT_AT = 0.52  # an event time that does not depend on the network: the same 11 steps whatever its size


def held_with_events(solve, width, depth):
    func, y0, t0 = make(width=width, depth=depth)
    t0 = t0.detach().fill_(0.0).requires_grad_()  # t0 differentiated: the event-time path is on
    meter = SavedTensorBytes(exclude=[*func.parameters(), y0, t0])
    with meter:
        event_t, solution = torchdiffeq.odeint_event(
            func, y0, t0, event_fn=lambda t, y: t - EVENT_AT + 0.0 * y.sum(), odeint_interface=solve, method="rk4",
            options={"step_size": STEP})
    return meter.held, y0.numel() * y0.element_size(), solution


def test_event_memory_is_the_trajectory_and_does_not_grow_with_the_network():
    minimal = functools.partial(odeint_symplectic_adjoint, memory_budget="trajectory")
    base, state_bytes, solution = held_with_events(minimal, width=16, depth=1)
    wider, _, _ = held_with_events(minimal, width=64, depth=1)
    deeper, _, _ = held_with_events(minimal, width=16, depth=4)
    stages, _, _ = held_with_events(functools.partial(odeint_symplectic_adjoint, memory_budget="stages"), width=64,
                                    depth=4)
    assert stages == base + 11 * 3 * state_bytes  # "stages" also keeps the 3 new stage inputs of each rk4 step
    below, _, _ = held_with_events(functools.partial(odeint_symplectic_adjoint, memory_budget="min"), width=64,
                                   depth=4)
    assert below < base  # "min": fewer states than steps, with events too
    assert base == wider == deeper
    steps = 11
    trajectory = (steps + 1) * state_bytes
    # + the returned (2, *state) solution, the event state's time derivative, odeint_event's own saved
    # event time and state, and a few scalars per step.
    assert trajectory <= base <= trajectory + 4 * state_bytes + 4 * steps * 8 + 256, (base, trajectory)

    backprop, _, _ = held_with_events(torchdiffeq.odeint, width=16, depth=1)
    backprop_wider, _, _ = held_with_events(torchdiffeq.odeint, width=64, depth=1)
    assert backprop_wider > 2 * backprop and backprop > 4 * base


def test_event_backward_holds_at_most_one_graph_of_func():
    func, y0, t0 = make(width=32, depth=3)
    one_graph = SavedTensorBytes(exclude=[*func.parameters()])
    with one_graph:
        func(t0.detach(), y0.detach().requires_grad_())
    event_t, solution = torchdiffeq.odeint_event(func, y0, t0, event_fn=event_for(False), method="dopri5",
                                                 rtol=RTOL, atol=ATOL, odeint_interface=odeint_symplectic_adjoint)
    meter = SavedTensorBytes(exclude=[*func.parameters()])
    with meter:
        event_loss(event_t, solution).backward()
    assert meter.total > 0
    # One graph of func, plus the dense output's and odeint_event's few state-sized tensors.
    assert meter.peak <= one_graph.total + 8 * y0.numel() * y0.element_size(), (meter.peak, one_graph.total)


# --- the bouncing-ball example --------------------------------------------------------------------------

def test_bouncing_ball_example_at_tiny_size(tmp_path):
    out = tmp_path / "ball.png"
    script = Path(__file__).resolve().parent.parent / "examples" / "bouncing_ball.py"
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(script), "--nbounces", "2", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if "relative error" in line)
    error = float(line.split("relative error")[1].split()[0])
    assert error <= TOL, line
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
