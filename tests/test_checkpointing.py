"""Below one state per step (``memory_budget="min"`` or a byte budget smaller than the trajectory): the forward pass
keeps only some states, the backward pass recomputes the others with the host's own step.

The claims: every recomputed state equals the forward pass's bit for bit, so the gradient at every budget equals
``"trajectory"``'s bit for bit and backprop's through the same steps; what is held between forward and backward is
``O(log N)`` states at ``"min"`` and within the budget otherwise; the backward pass never holds more restart points than
the schedule allows; the schedule recomputes no more steps than the optimal binomial schedule.
"""

from __future__ import annotations

import functools
import gc
import math
import warnings
import weakref

import pytest
import torch
import torchdiffeq
from checkpoint_schedules import optimal_steps_binomial
from helpers import TimeDependentField, flat_grads, loss_of, reference_options, rel_error

from symadj_plugins.bench.saved import SavedTensorBytes
from symadj_plugins.core.checkpointing import OnlineThinning, Restart, log_cap, min_kept, reversed_states
from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

# -- the schedule ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps,snapshots", [(1, 1), (7, 1), (10, 2), (128, 13), (100, 3), (1000, 11), (37, 100)])
def test_the_reversal_visits_every_step_backwards_with_the_optimal_number_of_recomputed_steps(num_steps, snapshots):
    advanced = []

    def advance(n, restart):
        assert int(restart.state) == n  # restarted from the right state
        advanced.append(n)
        return Restart(torch.tensor(n + 1))

    visited = [(n, int(r.state)) for n, r in reversed_states(num_steps, {0: Restart(torch.tensor(0))}, advance,
                                                             snapshots)]
    assert visited == [(n, n) for n in reversed(range(num_steps))]
    optimal = optimal_steps_binomial(num_steps, min(snapshots, num_steps - 1)) - num_steps if num_steps > 1 else 0
    assert len(advanced) == optimal


@pytest.mark.parametrize("snapshots", [1, 3, 6])
def test_the_reversal_holds_at_most_its_snapshots(snapshots):
    alive: list[weakref.ref] = []

    def advance(n, restart):
        state = torch.tensor(float(n + 1))
        alive.append(weakref.ref(state))
        return Restart(state)

    peak = 0
    for _, restart in reversed_states(200, {0: Restart(torch.tensor(0.0))}, advance, snapshots):
        del restart
        gc.collect()
        peak = max(peak, sum(ref() is not None for ref in alive))
    # The snapshots beyond the kept start, and the one being handed out.
    assert peak <= snapshots


def test_online_thinning_keeps_evenly_spaced_states_within_the_cap():
    thinning = OnlineThinning(lambda n: 10)
    kept = set()
    for n in range(1001):
        kept.add(n)
        kept -= set(thinning.admit(n))
    assert kept == set(thinning.kept) and 0 in kept
    assert 5 <= len(kept) <= 10
    assert len({b - a for a, b in zip(sorted(kept), sorted(kept)[1:])}) == 1  # evenly spaced


def test_min_keeps_logarithmically_many_states():
    thinning = OnlineThinning(min_kept)
    for n in range(10_001):
        thinning.admit(n)
    assert len(thinning.kept) <= math.ceil(math.log2(10_002) / 2)


# -- solves ------------------------------------------------------------------------------------------------------

STEPS = 64
BUDGETS_BELOW_TRAJECTORY = ["min", "2KiB"]


def _solve(budget, method="rk4", options=None, t=None, field=None, seed=0):
    torch.manual_seed(seed)
    func = field or TimeDependentField(dim=4, width=16).double()
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=torch.float64) if t is None else t
    options = dict(step_size=2 / STEPS) if options is None else options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the smallest byte budget runs at "min", saying so
        out = odeint_symplectic_adjoint(func, y0, t, method=method, options=options, rtol=1e-7, atol=1e-9,
                                        memory_budget=budget)
    return out, flat_grads(loss_of(out), [y0, *func.parameters()]), (func, y0, t, options)


@pytest.mark.parametrize("method,options", [
    ("rk4", None), ("midpoint", dict(step_size=2 / STEPS, perturb=True)), ("euler", None),
    ("dopri5", dict(first_step=0.05)), ("bosh3", dict(first_step=0.05)), ("fehlberg2", dict(first_step=0.05)),
    ("adaptive_heun", dict(first_step=0.05)), ("dopri5", dict(first_step=0.05, jump_t=torch.tensor([0.7, 1.3]))),
])
@pytest.mark.parametrize("budget", BUDGETS_BELOW_TRAJECTORY)
def test_recomputed_states_give_the_trajectorys_gradient(method, options, budget):
    out_all, grads_all, _ = _solve("trajectory", method, options)
    out, grads, _ = _solve(budget, method, options)
    assert torch.equal(out, out_all)
    if budget == "min":  # nothing kept but states: the same arithmetic as "trajectory", bit for bit
        assert all(torch.equal(g, h) for g, h in zip(grads, grads_all))
    else:  # a byte budget may also keep some steps' stage inputs: the same gradient up to rounding
        assert rel_error(grads, grads_all) < 1e-12


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_min_equals_backprop_through_the_same_steps(method):
    options = None if method == "rk4" else {}
    out, grads, (func, y0, t, options) = _solve("min", method, options)
    options = reference_options(method, func, y0, t, 1e-7, 1e-9, options)
    reference = torchdiffeq.odeint(func, y0, t, method=method, options=options, rtol=1e-7, atol=1e-9)
    assert rel_error(grads, flat_grads(loss_of(reference), [y0, *func.parameters()])) < 1e-10


def test_reversed_time_and_outputs_between_steps_at_min():
    t = torch.tensor([2.0, 1.7, 0.9, 0.2], dtype=torch.float64)
    _, grads_all, _ = _solve("trajectory", "dopri5", dict(first_step=0.05), t=t)
    _, grads, _ = _solve("min", "dopri5", dict(first_step=0.05), t=t)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_all))


class DropoutField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Dropout(0.3), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 4))

    def forward(self, t, y):
        return self.net(y)


def test_random_numbers_are_replayed_through_recomputed_steps():
    field = DropoutField().double()
    _, grads_all, _ = _solve("trajectory", "rk4", field=field, seed=5)
    _, grads, _ = _solve("min", "rk4", field=field, seed=5)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_all))


def _held(budget, steps):
    torch.manual_seed(0)
    func = TimeDependentField(dim=4, width=16).double()
    y0 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    meter = SavedTensorBytes(exclude=[*func.parameters(), y0, t])
    with meter, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = odeint_symplectic_adjoint(func, y0, t, method="rk4", options=dict(step_size=1 / steps),
                                        memory_budget=budget)
    state = y0.numel() * y0.element_size()
    # Per step: t0, t1, dt and the 4 stage times (float64 scalars); the solution when it is saved.
    scalars = (3 + 4) * steps * 8 + out.numel() * out.element_size() + 64
    return meter.held, state, scalars


def test_held_memory_at_min_grows_logarithmically_with_the_number_of_steps():
    for steps in (64, 1024):
        held, state, scalars = _held("min", steps)
        assert held - scalars <= (min_kept(steps) + 1) * state  # the kept states and y_N
    held_trajectory, state, scalars = _held("trajectory", 1024)
    assert held_trajectory >= 1025 * state


@pytest.mark.parametrize("budget", [4096, 20_000, 100_000])
def test_held_memory_stays_within_a_byte_budget(budget):
    held, state, scalars = _held(budget, 256)
    assert held - scalars <= max(budget, (log_cap(256) + 1) * state)


def test_a_budget_below_the_fewest_states_runs_at_min_and_warns_once():
    torch.manual_seed(0)
    func = TimeDependentField(dim=4, width=16).double()
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = odeint_symplectic_adjoint(func, y0, torch.linspace(0, 2, 5, dtype=torch.float64), method="rk4",
                                        options=dict(step_size=2 / STEPS), memory_budget=100)
    grads = flat_grads(loss_of(out), [y0, *func.parameters()])
    assert sum("running at memory_budget='min'" in str(w.message) for w in caught) == 1
    _, grads_min, _ = _solve("min")
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_min))


@pytest.mark.parametrize("solver", ["rk4", "dopri5", "tsit5"])
@pytest.mark.parametrize("integral", [False, True], ids=["", "integral loss"])
def test_torchdyn_recomputes_states_bit_for_bit(registered, solver, integral):
    from torchdyn.core import NeuralODE

    import symadj_plugins

    results = {}
    for budget in ("trajectory", "min"):
        torch.manual_seed(0)
        field = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
        kwargs = dict(integral_loss=lambda t, x: x.pow(2).sum(-1)) if integral else {}
        model = NeuralODE(field, sensitivity="symplectic_adjoint", solver=solver, atol=1e-8, rtol=1e-8,
                          **kwargs).double()
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        t = torch.linspace(0, 2, 3 if solver != "rk4" else 41, dtype=torch.float64)
        with symadj_plugins.options(memory_budget=budget):
            _, sol = model(x, t)
        results[budget] = (sol.detach(), flat_grads(loss_of(sol), [x, *model.parameters()]))
    assert torch.equal(results["min"][0], results["trajectory"][0])
    assert all(torch.equal(g, h) for g, h in zip(results["min"][1], results["trajectory"][1]))

# -- everything that works with one state per step works below it --------------------------------------------------


class DecayField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, t, y):
        return -y + 0.1 * self.net(y)


def _event_solve(budget):
    torch.manual_seed(2)
    func = DecayField().double()
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)

    def event_fn(t, y):  # the first component falls to 0.2
        return y[0] - 0.2

    solve = functools.partial(odeint_symplectic_adjoint, memory_budget=budget)
    event_t, solution = torchdiffeq.odeint_event(func, y0, t0, event_fn=event_fn, method="rk4",
                                                 options=dict(step_size=0.01), odeint_interface=solve)
    loss = event_t + solution[-1].pow(2).sum()
    return flat_grads(loss, [y0, t0, *func.parameters()])


def test_events_at_min_give_the_trajectorys_gradient():
    assert all(torch.equal(g, h) for g, h in zip(_event_solve("min"), _event_solve("trajectory")))


class BatchNormField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 4))

    def forward(self, t, y):
        return self.net(y)


def test_buffers_and_hooks_at_min_end_as_with_one_state_per_step():
    results = {}
    for budget in ("trajectory", "min"):
        torch.manual_seed(3)
        field = BatchNormField().double()
        calls = []
        for p in field.parameters():
            p.register_hook(lambda g, calls=calls: calls.append(1) or g)
        y0 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
        out = odeint_symplectic_adjoint(field, y0, torch.linspace(0, 1, 3, dtype=torch.float64), method="rk4",
                                        options=dict(step_size=1 / 32), memory_budget=budget)
        loss_of(out).backward()
        results[budget] = ([p.grad for p in field.parameters()], [b.clone() for b in field.buffers()], len(calls))
    assert all(torch.equal(g, h) for g, h in zip(results["min"][0], results["trajectory"][0]))
    assert all(torch.equal(b, c) for b, c in zip(results["min"][1], results["trajectory"][1]))
    assert results["min"][2] == results["trajectory"][2] == len(results["min"][0])  # each hook once


def test_autocast_is_replayed_through_recomputed_steps():
    grads = {}
    for budget in ("trajectory", "min"):
        torch.manual_seed(4)
        field = TimeDependentField(dim=4, width=16)
        y0 = torch.randn(3, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = odeint_symplectic_adjoint(lambda t, y, field=field: field(t, y).float(), y0, torch.linspace(0, 1, 3),
                                            method="rk4", options=dict(step_size=1 / 32), memory_budget=budget,
                                            adjoint_params=tuple(field.parameters()))
        grads[budget] = flat_grads(out.pow(2).sum(), [y0, *field.parameters()])
    assert all(torch.equal(g, h) for g, h in zip(grads["min"], grads["trajectory"]))


@pytest.mark.parametrize("steps", [40, 300])
def test_min_holds_logarithmically_many_restart_points_in_the_backward_pass(monkeypatch, steps):
    """The kept states stay alive through the whole backward pass (autograd holds what was saved), so they count
    against the reversal's snapshots: kept states and snapshots together stay within ``log_cap(N) + 1``, and two more
    states are alive: the one the schedule is advancing (or hands out without keeping) and ``y_{n+1}``, which the
    sweep still holds while it reverses step ``n``."""
    from symadj_plugins.core import adjoint
    from symadj_plugins.torchdiffeq.host import _TorchdiffeqHost

    recomputed: list[weakref.ref] = []
    kept: list[torch.Tensor] = []
    peak = 0
    advance, reverse_step = _TorchdiffeqHost.advance, adjoint._Sweep.reverse_step

    def counting_advance(self, trajectory, n, restart, replaying):
        out = advance(self, trajectory, n, restart, replaying)
        recomputed.append(weakref.ref(out.state))
        return out

    def counting_reverse_step(self, n, restart, next_state):
        nonlocal peak
        if not kept:
            kept.extend(s for s in self.trajectory.states if s is not None)
        peak = max(peak, len(kept) + sum(ref() is not None for ref in recomputed))
        return reverse_step(self, n, restart, next_state)

    monkeypatch.setattr(_TorchdiffeqHost, "advance", counting_advance)
    monkeypatch.setattr(adjoint._Sweep, "reverse_step", counting_reverse_step)
    func = TimeDependentField(dim=4, width=16).double()
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = odeint_symplectic_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                                    options=dict(step_size=1 / steps), memory_budget="min")
    out.sum().backward()
    assert recomputed and len(kept) <= min_kept(steps) + 1
    assert peak <= log_cap(steps) + 3, (peak, log_cap(steps))
