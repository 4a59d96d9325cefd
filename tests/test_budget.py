"""One memory budget for the exact gradient: every level gives the same gradient, the host's forward values, and holds
no more than the trajectory plus the budget; bad budgets and unknown options are refused with a useful message."""

from __future__ import annotations

import gc
import math
import warnings

import numpy as np
import pytest
import torch
import torchdiffeq
from helpers import ADAPTIVE, FIXED, TimeDependentField, TupleField, rel_error
from torch import nn

import symadj_plugins
from symadj_plugins import SymplecticAdjoint
from symadj_plugins.bench.saved import SavedTensorBytes
from symadj_plugins.core.budget import MemoryBudget
from symadj_plugins.torchdiffeq import initial_step, odeint_adjoint, odeint_symplectic_adjoint
from symadj_plugins.torchdiffeq.host import _TorchdiffeqHost

LEVELS = ["min", 0, "trajectory", "stages", 30_000, "200KiB", "max", "auto", math.inf]
T = torch.tensor([0.0, 0.3, 0.45, 1.0], dtype=torch.float64)  # outputs between steps


def _solve_and_grad(solve, func, y0, **kwargs):
    y = y0.clone().requires_grad_(True)
    out = solve(func, y, T, **kwargs)
    grads = torch.autograd.grad(out.pow(2).sum() + out[1].sum(), (y, *func.parameters()))
    return out.detach(), grads


@pytest.mark.parametrize("method", ADAPTIVE + FIXED)
def test_every_budget_gives_the_same_gradient_and_the_hosts_forward(method):
    torch.manual_seed(0)
    func = TimeDependentField(dim=3, width=16).double()
    y0 = torch.randn(5, 3, dtype=torch.float64)
    options = dict(step_size=0.05) if method in FIXED else dict(first_step=initial_step(func, y0, T, method=method))
    kwargs = dict(method=method, rtol=1e-6, atol=1e-8, options=options)
    ref_out, ref_grads = _solve_and_grad(torchdiffeq.odeint, func, y0, **kwargs)
    minimal = None
    for level in LEVELS:
        out, grads = _solve_and_grad(odeint_symplectic_adjoint, func, y0, memory_budget=level, **kwargs)
        assert torch.equal(out, ref_out), level
        assert rel_error(grads, ref_grads) <= 1e-10, level
        minimal = minimal or grads
        assert rel_error(grads, minimal) <= 1e-12, level


@pytest.mark.parametrize("case", ["tuple", "reversed", "perturb", "jump_t"])
def test_every_budget_gives_the_same_gradient_with_options(case):
    torch.manual_seed(1)
    if case == "tuple":
        func = TupleField().double()
        y0 = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    else:
        func = TimeDependentField(dim=3, width=16).double()
        y0 = torch.randn(4, 3, dtype=torch.float64)
    t = T.flip(0) if case == "reversed" else T
    kwargs = dict(method="dopri5", rtol=1e-6, atol=1e-8, options=dict(first_step=0.05))
    if case == "perturb":
        kwargs = dict(method="rk4", options=dict(step_size=0.1, perturb=True))
    if case == "jump_t":
        kwargs["options"] = dict(first_step=0.05, jump_t=torch.tensor([0.37], dtype=torch.float64))
    grads = []
    for level in ["min", "stages", "max", "100KiB"]:
        y = tuple(x.clone().requires_grad_(True) for x in y0) if case == "tuple" else y0.clone().requires_grad_(True)
        out = odeint_symplectic_adjoint(func, y, t, memory_budget=level, **kwargs)
        loss = sum(o.pow(2).sum() for o in out) if case == "tuple" else out.pow(2).sum()
        inputs = (*y, *func.parameters()) if case == "tuple" else (y, *func.parameters())
        grads.append(torch.autograd.grad(loss, inputs))
    for g in grads[1:]:
        assert rel_error(g, grads[0]) <= 1e-12


class WideField(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 8))

    def forward(self, t, y):
        return self.net(y)


def _held(solve, func, y0, t, **kwargs):
    meter = SavedTensorBytes(exclude=[*func.parameters(), y0, t])
    with meter:
        out = solve(func, y0, t, **kwargs)
    held = meter.held
    out.sum().backward()
    return held


@pytest.mark.parametrize("method,options", [("rk4", dict(step_size=0.05)), ("dopri5", dict(first_step=0.02))])
def test_held_bytes_stay_within_the_trajectory_plus_the_budget(method, options):
    torch.manual_seed(2)
    func = WideField(128)
    y0 = torch.randn(32, 8, requires_grad=True)
    t = torch.linspace(0, 1, 2)
    kwargs = dict(method=method, options=options, rtol=1e-7, atol=1e-9)  # dopri5: some rejected attempts too
    trajectory = _held(odeint_symplectic_adjoint, func, y0, t, memory_budget="trajectory", **kwargs)
    backprop = _held(torchdiffeq.odeint, func, y0, t, **kwargs)
    state = y0.numel() * y0.element_size()
    assert trajectory < backprop / 20
    for budget in [0, 20_000, 100_000, 400_000, 2_000_000]:
        held = _held(odeint_symplectic_adjoint, func, y0, t, memory_budget=budget, **kwargs)
        assert held <= trajectory + budget, (budget, held, trajectory)
    # The graphs a finite budget keeps are measured by our own saved-tensor hooks, which hand every tensor on to the
    # caller's: the caller's meter sees them too.
    stages = _held(odeint_symplectic_adjoint, func, y0, t, memory_budget="stages", **kwargs)
    assert _held(odeint_symplectic_adjoint, func, y0, t, memory_budget=2_000_000, **kwargs) > stages + 100_000
    # Budget 0 is "min", below one state per step; more than backprop's graph holds backprop's graph (plus the final
    # state, which the trajectory keeps and backprop does not, and the step times: a few scalars per step).
    assert _held(odeint_symplectic_adjoint, func, y0, t, memory_budget=0, **kwargs) < trajectory
    steps = 20 if method == "rk4" else 60
    most = _held(odeint_symplectic_adjoint, func, y0, t, memory_budget=10 * backprop, **kwargs)
    assert most <= backprop + state + 64 * steps, (most, backprop)


class CountingField(WideField):
    def __init__(self, width):
        super().__init__(width)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return super().forward(t, y)


@pytest.mark.parametrize("level,backward_calls", [("min", 70), ("trajectory", 70), ("stages", 40), ("max", 0)])
def test_what_the_budget_buys_is_evaluations_of_f_in_the_backward_pass(level, backward_calls):
    # rk4, 10 steps, 4 stages: one state per step recomputes stages 1-3 without a graph (30) and evaluates all four
    # with one (40); with the stage inputs kept only the 40; with every graph kept none. Below one state per step,
    # each recomputed step costs its 4 evaluations more.
    torch.manual_seed(3)
    func = CountingField(16).double()
    y0 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = odeint_symplectic_adjoint(func, y0, torch.linspace(0, 1, 2, dtype=torch.float64), method="rk4",
                                    options=dict(step_size=0.1), memory_budget=level)
    func.calls = 0
    advanced = []
    real_advance = _TorchdiffeqHost.advance

    def counting_advance(self, trajectory, n, *args):
        advanced.append(n)
        return real_advance(self, trajectory, n, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_TorchdiffeqHost, "advance", counting_advance)
        out[-1].sum().backward()
    assert func.calls == backward_calls + 4 * len(advanced)
    assert (len(advanced) > 0) == (level == "min")


def test_a_second_backward_through_kept_graphs_replays_instead():
    torch.manual_seed(4)
    func = WideField(16).double()
    y0 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = odeint_symplectic_adjoint(func, y0, torch.linspace(0, 1, 3, dtype=torch.float64), method="dopri5",
                                    memory_budget="max")
    first = torch.autograd.grad(out.sum(), y0, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), y0)[0]
    assert rel_error([second], [first]) <= 1e-12


# --- how the budget is given ---------------------------------------------------------------------------

def _budget_seen(solve=odeint_symplectic_adjoint, method="rk4", options=None, **kwargs):
    """The memory budget the torchdiffeq adapter's host solves with, for one call of ``solve``."""
    seen = []
    original = _TorchdiffeqHost.solve

    def spy(self, y, t):
        seen.append(self.memory_budget)
        return original(self, y, t)

    func = WideField(8).double()
    y0 = torch.randn(2, 8, dtype=torch.float64)
    options = dict(step_size=0.5) if options is None and method != "dopri5" else options
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_TorchdiffeqHost, "solve", spy)
        solve(func, y0, torch.linspace(0, 1, 2, dtype=torch.float64), method=method, options=options, **kwargs)
    assert len(seen) == 1
    return seen[0]


def test_the_budget_reaches_the_solver_from_every_entry_point():
    assert _budget_seen() == MemoryBudget.named("auto")  # the default
    assert _budget_seen(memory_budget="1MiB") == MemoryBudget(2**20)
    assert _budget_seen(adjoint=SymplecticAdjoint(memory_budget="2GB")) == MemoryBudget(2e9)
    assert _budget_seen(store_stages=False) == MemoryBudget.named("trajectory")
    with symadj_plugins.options(memory_budget=1234):
        assert _budget_seen() == MemoryBudget(1234)
        assert _budget_seen(memory_budget="min") == MemoryBudget(0)  # an explicit argument wins
        assert _budget_seen(solve=odeint_adjoint, adjoint_method="symplectic") == MemoryBudget(1234)
    assert _budget_seen(solve=odeint_adjoint, adjoint_method="symplectic",
                        adjoint_options=dict(memory_budget="max")) == MemoryBudget.named("max")


@pytest.mark.parametrize("text,expected", [("256MiB", 256 * 2**20), ("2GB", 2e9), ("512 kib", 512 * 1024),
                                           ("1.5GiB", 1.5 * 2**30), ("1000", 1000), ("min", 0), ("MAX", math.inf)])
def test_budget_strings(text, expected):
    assert MemoryBudget.parse(text).bytes == expected


@pytest.mark.parametrize("value,level", [("1e400", "bytes"), (10**400, "bytes"), (np.int64(5000), "bytes"),
                                         (np.float64(5000.0), "bytes"), ("-0", "min"), (-0.0, "min"), (0, "min"),
                                         ("Trajectory", "trajectory"), ("auto", "auto")])
def test_large_numpy_and_signed_budgets_are_read_alike(value, level):
    budget = MemoryBudget.parse(value)
    assert budget.level == level
    assert budget.bytes == {"min": 0, "bytes": budget.bytes}.get(level, math.inf)


@pytest.mark.parametrize("value,error", [(-1, ValueError), (float("nan"), ValueError), ("12 parsecs", ValueError),
                                         ("lots", ValueError), ("-5MB", ValueError), (True, TypeError),
                                         ([1024], TypeError), (None, TypeError)])
def test_bad_budgets_name_the_accepted_forms(value, error):
    with pytest.raises(error, match=r"memory_budget must be 'min'.*'trajectory'.*'stages'.*'max'.*'auto'.*'256MiB'"):
        SymplecticAdjoint(memory_budget=value)


def test_unknown_adjoint_options_are_refused_with_the_valid_keys():
    func = WideField(8).double()
    y0 = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'nrom'.*valid keys: 'memory_budget'"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the error comes first, no warning about the known 'norm'
        odeint_adjoint(func, y0, torch.linspace(0, 1, 2, dtype=torch.float64), adjoint_method="symplectic",
                       adjoint_options=dict(nrom="seminorm", norm="seminorm"))
    with pytest.raises(ValueError, match=r"'budget'.*valid keys: 'memory_budget'"):
        with symadj_plugins.options(budget=5):
            pass


def test_continuous_adjoint_options_are_ignored_with_one_warning_naming_them():
    """torchdiffeq's own recommendation, adjoint_options=dict(norm="seminorm"), keeps working after switching to the
    symplectic adjoint: its keys (and any other option of torchdiffeq's adjoint solve) are ignored, with one
    warning naming them; the gradient is the one without them, and memory_budget beside them still applies."""
    func = WideField(8).double()
    y0 = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)

    def grad(**kwargs):
        out = odeint_adjoint(func, y0, t, method="dopri5", adjoint_method="symplectic", **kwargs)
        return torch.autograd.grad(out.square().sum(), y0)[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = grad()
        got = grad(adjoint_options=dict(norm="seminorm"))
    assert [str(w.message).split(" ignored")[0] for w in caught] == ["adjoint_options 'norm'"]
    assert caught[0].filename == __file__  # points at the caller's line
    assert torch.equal(got, want)
    with pytest.warns(UserWarning, match=r"^adjoint_options 'first_step', 'norm', 'step_size' ignored") as caught:
        got = grad(adjoint_options=dict(step_size=0.1, norm="seminorm", first_step=1e-3, memory_budget="min"))
    assert len(caught) == 1 and torch.equal(got, grad(adjoint_options=dict(memory_budget="min")))
    with pytest.warns(UserWarning, match="'norm'"):
        seen = _budget_seen(solve=odeint_adjoint, adjoint_method="symplectic",
                            adjoint_options=dict(memory_budget="max", norm="seminorm"))
    assert seen == MemoryBudget.named("max")


def test_conflicting_arguments_are_refused():
    func = WideField(8).double()
    y0 = torch.randn(2, 8, dtype=torch.float64)
    t = torch.linspace(0, 1, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="one of memory_budget, adjoint and store_stages"):
        odeint_symplectic_adjoint(func, y0, t, memory_budget=0, store_stages=True)
    with pytest.raises(TypeError, match="SymplecticAdjoint"):
        odeint_symplectic_adjoint(func, y0, t, adjoint=dict(memory_budget=0))


@pytest.mark.parametrize("method", ["dopri5", "rk4", "rk38"])
def test_the_torch_symplectic_adjoint_drop_in_keeps_one_state_per_step_as_the_original(method):
    import torch_symplectic_adjoint

    with symadj_plugins.options(memory_budget="max"):
        assert _budget_seen(torch_symplectic_adjoint.odeint_symplectic_adjoint, method) == \
            MemoryBudget.named("trajectory")


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4", "dopri5", "tsit5"])
@pytest.mark.parametrize("integral", [False, True], ids=["", "integral loss"])
def test_every_budget_gives_the_same_gradient_with_torchdyn(registered, solver, integral):
    from torchdyn.core import NeuralODE

    torch.manual_seed(5)
    field = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    cost = (lambda t, x: x.pow(2).sum(-1)) if integral else None
    x = torch.randn(4, 3, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 11, dtype=torch.float64)
    results = {}
    # None: torchdyn's own autograd (which wants the state augmented by hand with an integral loss: not here)
    for level in ["min", "stages", "100KiB", "max"] + ([] if integral else [None]):
        model = NeuralODE(field, solver=solver, sensitivity="autograd" if level is None else "symplectic_adjoint",
                          atol=1e-6, rtol=1e-6, integral_loss=cost, return_t_eval=False)
        xx = x.clone().requires_grad_(True)
        with symadj_plugins.options(memory_budget=level if level is not None else "min"):
            sol = model(xx, t_span)
        results[level] = (sol.detach(), torch.autograd.grad(sol.pow(2).sum(), (xx, *field.parameters())))
    base_out, base = results["min"]
    for level in ["stages", "100KiB", "max"]:
        assert torch.equal(results[level][0], base_out), level
        assert rel_error(results[level][1], base) <= 1e-12, level
    if solver in ("euler", "midpoint", "rk4") and not integral:  # autograd differentiates nothing else there
        assert rel_error(base, results[None][1]) <= 1e-10


def test_torchdyn_held_bytes_stay_within_the_trajectory_plus_the_budget(registered):
    from torchdyn.core import NeuralODE

    class Field(WideField):
        def forward(self, t, y, args=None):  # torchdyn passes args to a field that takes t
            return super().forward(t, y)

    torch.manual_seed(6)
    field = Field(64)
    model = NeuralODE(field, solver="rk4", sensitivity="symplectic_adjoint", return_t_eval=False)
    x = torch.randn(16, 8, requires_grad=True)
    t_span = torch.linspace(0, 1, 21)

    def held(level):
        meter = SavedTensorBytes(exclude=[*field.parameters(), x, t_span])
        with meter, symadj_plugins.options(memory_budget=level):
            sol = model(x, t_span, save_at=t_span[[0, -1]])
        result = meter.held
        sol.sum().backward()
        return result

    trajectory = held("trajectory")
    for extra in [10_000, 60_000, 300_000]:  # the budget counts the states too
        assert trajectory < held(trajectory + extra) <= trajectory + extra
    assert held("max") > held(300_000) > held(10_000)


# --- kept graphs: a step keeps all its graphs or none ----------------------------------------------------------


@pytest.mark.parametrize("options", [dict(first_step=0.05), dict(first_step=0.05, jump_t=torch.tensor([0.45]))],
                         ids=["dopri5", "dopri5 with jump_t"])
def test_max_evaluates_nothing_in_the_backward_pass_like_backprop(options):
    # The host's initial evaluation f(t0, y0) and the one after a jump_t happen outside the steps: their graphs are
    # built in the forward pass too, so that no stage is evaluated again (and none escapes the replay check).
    torch.manual_seed(3)
    func = CountingField(16).double()
    y0 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = odeint_symplectic_adjoint(func, y0, T, method="dopri5", options=options, memory_budget="max")
    func.calls = 0
    grads = torch.autograd.grad(out.pow(2).sum(), (y0, *func.parameters()))
    assert func.calls == 0
    y = y0.detach().clone().requires_grad_(True)
    reference = odeint_symplectic_adjoint(func, y, T, method="dopri5", options=options, memory_budget="trajectory")
    assert rel_error(grads, torch.autograd.grad(reference.pow(2).sum(), (y, *func.parameters()))) < 1e-12


def test_torchdyn_max_evaluates_nothing_in_the_backward_pass(registered):
    from torchdyn.core import NeuralODE

    class Field(CountingField):
        def forward(self, t, y, args=None):
            return super().forward(t, y)

    torch.manual_seed(4)
    field = Field(16).double()
    model = NeuralODE(field, solver="dopri5", sensitivity="symplectic_adjoint", return_t_eval=False)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with symadj_plugins.options(memory_budget="max"):
        sol = model(x, torch.linspace(0, 1, 3, dtype=torch.float64))
    field.calls = 0
    sol.sum().backward()
    assert field.calls == 0


@pytest.mark.parametrize("budget", ["max", 40_000])
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_a_compiled_field_with_a_first_same_as_last_method_keeps_graphs(method, budget):
    # The last stage's graph is the next step's first stage: differentiated once, with both cotangents (a compiled
    # graph with donated buffers refuses a second backward through it).
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    compiled = torch.compile(net, backend="aot_eager")
    y0 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for name, field in (("compiled", compiled), ("plain", net)):
        out = odeint_symplectic_adjoint(lambda t, y, field=field: field(y), y0, T, method=method,
                                        options=dict(first_step=0.05), memory_budget=budget,
                                        adjoint_params=tuple(net.parameters()))
        grads[name] = torch.autograd.grad(out.pow(2).sum(), (y0, *net.parameters()))
    assert rel_error(grads["compiled"], grads["plain"]) < 1e-10


def test_what_max_kept_is_released_when_backward_has_used_it():
    from symadj_plugins.bench.memory import PeakMemory, mark

    torch.manual_seed(6)
    func = WideField(64)
    y0 = torch.randn(32, 8, requires_grad=True)
    state = y0.numel() * y0.element_size()
    after = {}
    for name in ("backprop", "ours"):
        with PeakMemory() as meter:
            if name == "ours":
                out = odeint_symplectic_adjoint(func, y0, T, method="rk4", options=dict(step_size=0.05),
                                                memory_budget="max")
            else:
                out = torchdiffeq.odeint(func, y0, T, method="rk4", options=dict(step_size=0.05))
            loss = out.pow(2).sum()
            loss.backward()  # the loss and the solution stay alive, as in a training loop until the next step
            gc.collect()
            with mark("after backward"):
                pass
        after[name] = meter.report.marks["after backward"]
        del out, loss
    # Backprop keeps its solution and the parameters' gradients; ours keeps no stage input or graph beyond that.
    assert after["ours"] <= after["backprop"] + 4 * state


@pytest.mark.parametrize("budget", ["max", 40_000])
def test_a_compiled_torchdyn_field_with_dopri5_keeps_graphs(registered, budget):
    from torchdyn.core import NeuralODE

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    compiled = torch.compile(net, backend="aot_eager")
    grads = {}
    for name, field in (("compiled", compiled), ("plain", net)):
        model = NeuralODE(field, sensitivity="symplectic_adjoint", solver="dopri5", atol=1e-6, rtol=1e-6,
                          return_t_eval=False).double()
        x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with symadj_plugins.options(memory_budget=budget):
            sol = model(x, torch.linspace(0, 1, 3, dtype=torch.float64))
        grads[name] = torch.autograd.grad(sol.pow(2).sum(), (x, *net.parameters()))
    assert rel_error(grads["compiled"], grads["plain"]) < 1e-10
