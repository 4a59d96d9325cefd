"""What symadj_plugins.torchdiffeq promises: torchdiffeq's forward, bit for bit, and the gradient of backprop
through the same accepted steps (step sizes constant), for every explicit RK method and option."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from helpers import (
    ADAPTIVE,
    FIXED,
    DenseOutputProbe,
    TimeDependentField,
    TupleField,
    flat_grads,
    loss_of,
    reference_options,
    rel_error,
)

from symadj_plugins.torchdiffeq import initial_step, odeint_symplectic_adjoint, supported_methods
from symadj_plugins.torchdiffeq.host import _TorchdiffeqHost

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
METHODS = ADAPTIVE + FIXED


def default_options(method):
    return {} if method in ADAPTIVE else {"step_size": 0.1}


def compare(method, func, y0, t, *, rtol=1e-6, atol=1e-7, options=None, dtype=torch.float64, store_stages=False):
    """Runs ours and the reference; checks forward equality and returns the gradient relative error."""
    options = default_options(method) if options is None else options
    params = [p for p in func.parameters()]
    y0s = y0 if isinstance(y0, tuple) else (y0,)
    ref_options = reference_options(method, func, y0, t, rtol, atol, options)

    want_sol = torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=ref_options)
    got_sol = odeint_symplectic_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                        store_stages=store_stages)
    want_sols = want_sol if isinstance(want_sol, tuple) else (want_sol,)
    got_sols = got_sol if isinstance(got_sol, tuple) else (got_sol,)
    for g, w in zip(got_sols, want_sols):
        assert torch.equal(g, w), "forward must be bit-for-bit torchdiffeq.odeint"

    inputs = [*y0s, *params]
    want = flat_grads(loss_of(want_sol), inputs)
    got = flat_grads(loss_of(got_sol), inputs)
    return rel_error(got, want)


def make(dtype, dim=3, batch=4, seed=0):
    torch.manual_seed(seed)
    func = TimeDependentField(dim).to(dtype)
    y0 = torch.randn(batch, dim, dtype=dtype, requires_grad=True)
    return func, y0


def test_supported_methods_cover_every_explicit_rk_method():
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
    from torchdiffeq._impl.solvers import FixedGridODESolver

    explicit_rk = {name for name, cls in SOLVERS.items() if isinstance(cls, type) and (
        issubclass(cls, RKAdaptiveStepsizeODESolver)
        or (issubclass(cls, FixedGridODESolver) and "adams" not in cls.__name__.lower()
            and "implicit" not in cls.__module__))}
    assert explicit_rk <= set(supported_methods())
    assert {"dopri5", "dopri8", "bosh3", "euler", "midpoint", "rk4"} <= set(supported_methods())
    assert not {"explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver"} & set(supported_methods())


# --- exactness, every method ------------------------------------------------------------------------------

SCENARIOS = {
    # output times that fall inside steps (interpolated), several of them
    "outputs_between_steps": dict(t=[0.0, 0.13, 0.5, 0.77, 1.2]),
    # decreasing time
    "reversed": dict(t=[1.0, 0.6, 0.05, -0.3]),
    # just the end points
    "two_points": dict(t=[0.0, 1.0]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method", METHODS)
def test_gradient_equals_backprop_through_same_steps(method, scenario, dtype):
    func, y0 = make(dtype)
    t = torch.tensor(SCENARIOS[scenario]["t"], dtype=dtype)
    err = compare(method, func, y0, t, dtype=dtype)
    assert err <= TOL[dtype], f"{method}/{scenario}/{dtype}: relative gradient error {err:.2e}"


QUARTER = 0.25 * (1 + 1e-12)  # an adaptive method made to take four steps over [0, 1]: first = min = max step


@pytest.mark.parametrize("method,options", [
    ("dopri5", {"first_step": QUARTER, "min_step": QUARTER, "max_step": QUARTER}),
    ("rk4", {"step_size": 0.25, "interp": "linear"}),
    ("rk4", {"step_size": 0.25, "interp": "cubic"}),
], ids=["dopri5", "rk4-linear", "rk4-cubic"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
def test_a_step_with_several_outputs_makes_one_vjp_and_equals_backprop(method, options, reverse, monkeypatch):
    func, y0 = make(torch.float64)
    t = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)  # ten output times inside each of the four steps
    probe = DenseOutputProbe(monkeypatch, _TorchdiffeqHost)
    assert compare(method, func, y0, t.flip(0) if reverse else t, options=options) <= 1e-10
    # (step, output times, VJPs): each step's ten outputs in one dense output and one VJP.
    assert sorted(probe.calls) == [(n, 10, 1) for n in range(4)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method", METHODS)
def test_stored_stage_inputs_give_the_same_exact_gradient(method, scenario):
    func, y0 = make(torch.float64)
    t = torch.tensor(SCENARIOS[scenario]["t"], dtype=torch.float64)
    assert compare(method, func, y0, t, store_stages=True) <= 1e-10
    options = {"jump_t": torch.tensor([0.3], dtype=torch.float64)} if method in ADAPTIVE else {"step_size": 0.1,
                                                                                              "interp": "cubic"}
    assert compare(method, func, y0, t, options=options, store_stages=True) <= 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_tuple_state(method):
    torch.manual_seed(1)
    func = TupleField().double()
    y0 = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(5, dtype=torch.float64, requires_grad=True))
    t = torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64)
    assert compare(method, func, y0, t) <= 1e-10


@pytest.mark.parametrize("method", ADAPTIVE)
def test_jump_t_and_step_t(method):
    func, y0 = make(torch.float64)
    t = torch.tensor([0.0, 0.45, 1.0], dtype=torch.float64)
    options = {"jump_t": torch.tensor([0.3, 0.71], dtype=torch.float64),
               "step_t": torch.tensor([0.5], dtype=torch.float64)}
    assert compare(method, func, y0, t, options=options) <= 1e-10


def test_jump_t_with_reversed_time():
    func, y0 = make(torch.float64)
    t = torch.tensor([1.0, 0.2], dtype=torch.float64)
    options = {"jump_t": torch.tensor([0.55], dtype=torch.float64)}
    assert compare("dopri5", func, y0, t, options=options) <= 1e-10


@pytest.mark.parametrize("options", [
    {"first_step": 0.05},
    {"min_step": 0.02, "max_step": 0.15},
    {"safety": 0.8, "ifactor": 5.0, "dfactor": 0.3},
    {"norm": lambda x: x.abs().max()},
    {"max_num_steps": 10_000},
    {"dtype": torch.float32},
], ids=["first_step", "min_max_step", "controller", "norm", "max_num_steps", "time_dtype"])
def test_adaptive_options(options):
    func, y0 = make(torch.float64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    assert compare("dopri5", func, y0, t, options=options) <= 1e-10


@pytest.mark.parametrize("method", FIXED)
@pytest.mark.parametrize("options", [
    {"step_size": 0.1, "interp": "linear"},
    {"step_size": 0.1, "interp": "cubic"},
    {"step_size": 0.1, "perturb": True},
    {"grid_constructor": lambda f, y0, t: torch.linspace(t[0], t[-1], 7, dtype=t.dtype)},
    {},  # the grid is t itself
], ids=["linear", "cubic", "perturb", "grid_constructor", "grid_is_t"])
def test_fixed_grid_options(method, options):
    func, y0 = make(torch.float64)
    t = torch.tensor([0.0, 0.25, 0.42, 1.0], dtype=torch.float64)
    assert compare(method, func, y0, t, options=options) <= 1e-10


def test_perturb_reaches_discontinuity_on_the_right_side():
    """A field with a jump at t=0.5: perturb=True evaluates just before/after grid points."""

    class Jump(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))

        def forward(self, t, y):
            return torch.where(t < 0.5, 1.0, -2.0) * y * self.w

    func = Jump()
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    for method in FIXED:
        assert compare(method, func, y0, t, options={"step_size": 0.25, "perturb": True}) <= 1e-10
    assert compare("dopri5", func, y0, t, options={"jump_t": torch.tensor([0.5], dtype=torch.float64)}) <= 1e-10
    # step_t ends a step at the jump without re-evaluating: the next step starts from the carried stage
    # evaluated just before t=0.5 (torchdiffeq's FSAL), which the replay must reproduce.
    for method in ("dopri5", "bosh3", "fehlberg2"):
        assert compare(method, func, y0, t, options={"step_t": torch.tensor([0.5], dtype=torch.float64)}) <= 1e-10


def test_single_output_time_returns_y0():
    func, y0 = make(torch.float64)
    t = torch.tensor([0.3], dtype=torch.float64)
    out = odeint_symplectic_adjoint(func, y0, t)
    assert torch.equal(out[0], y0)
    (g,) = torch.autograd.grad(out.sum(), y0)
    assert torch.equal(g, torch.ones_like(y0))


def test_float32_state_with_float64_times():
    func, y0 = make(torch.float32)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    assert compare("dopri5", func, y0, t) <= 1e-4
    assert compare("rk4", func, y0, t) <= 1e-4


def test_gradcheck_tiny_problem():
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2).double()
    y0 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def fn(y0, weight, bias):
        def field(t, y):
            return torch.tanh(torch.nn.functional.linear(y, weight, bias))
        return odeint_symplectic_adjoint(field, y0, t, method="rk4", options={"step_size": 0.1},
                                         adjoint_params=(weight, bias))

    weight = lin.weight.detach().clone().requires_grad_(True)
    bias = lin.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (y0, weight, bias))


def test_adjoint_params_subset_and_explicit():
    func, y0 = make(torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    first = func.net[0].weight
    out = odeint_symplectic_adjoint(func, y0, t, adjoint_params=[first])
    g_first, g_other = torch.autograd.grad(out.sum(), (first, func.net[2].weight), allow_unused=True)
    assert g_first is not None and g_first.abs().sum() > 0
    assert g_other is None  # not an adjoint parameter: no gradient, as with torchdiffeq.odeint_adjoint


def test_time_gradient_matches_torchdiffeq_adjoint_formula():
    func, y0 = make(torch.float64)
    kwargs = dict(rtol=1e-10, atol=1e-10, method="dopri5")
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(loss_of(odeint_symplectic_adjoint(func, y0, t, **kwargs)), t)[0]
    theirs = torch.autograd.grad(loss_of(torchdiffeq.odeint_adjoint(func, y0, t, **kwargs)), t)[0]
    assert rel_error([ours], [theirs]) < 1e-6
    # and the derivative of the exact flow, by central differences of a tightly solved odeint
    eps = 1e-5
    for k in range(len(t)):
        dt = torch.zeros_like(t)
        dt[k] = eps
        with torch.no_grad():
            up = loss_of(torchdiffeq.odeint(func, y0, t + dt, **kwargs))
            down = loss_of(torchdiffeq.odeint(func, y0, t - dt, **kwargs))
        fd = (up - down) / (2 * eps)
        assert abs(ours[k].item() - fd.item()) <= 1e-5 * max(1.0, abs(fd.item()))


def test_time_gradient_reversed():
    func, y0 = make(torch.float64)
    kwargs = dict(rtol=1e-10, atol=1e-10, method="dopri5")
    t = torch.tensor([1.0, 0.4], dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(loss_of(odeint_symplectic_adjoint(func, y0, t, **kwargs)), t)[0]
    theirs = torch.autograd.grad(loss_of(torchdiffeq.odeint_adjoint(func, y0, t, **kwargs)), t)[0]
    assert rel_error([ours], [theirs]) < 1e-6


def test_retain_graph_twice_gives_same_gradient():
    func, y0 = make(torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    loss = loss_of(odeint_symplectic_adjoint(func, y0, t))
    first = torch.autograd.grad(loss, (y0, *func.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, (y0, *func.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_callbacks_of_func_still_fire():
    func, y0 = make(torch.float64)
    accepted = []
    func.callback_accept_step = lambda t0, y, dt: accepted.append(float(dt))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    odeint_symplectic_adjoint(func, y0, t).sum().backward()
    assert len(accepted) > 0


class _ComplexField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.w = torch.nn.Parameter(0.5 * torch.randn(3, 3, dtype=torch.complex128))

    def forward(self, t, y):
        return torch.tanh(y @ self.w) * torch.cos(t)


@pytest.mark.parametrize("method,options", [("rk4", dict(step_size=0.1, perturb=True)), ("dopri5", {}),
                                            ("bosh3", {})])
@pytest.mark.parametrize("budget", ["min", "stages", "max"])
def test_complex_state_gradient_equals_backprop_through_same_steps(method, options, budget):
    # torchdiffeq solves complex states; the replay check measures them in the real dtype.
    func = _ComplexField()
    y0 = torch.tensor([0.3 + 0.2j, -0.1 + 0.5j, 0.7 - 0.4j], dtype=torch.complex128, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    ref_options = reference_options(method, func, y0, t, 1e-7, 1e-9, options)
    want = flat_grads(torchdiffeq.odeint(func, y0, t, rtol=1e-7, atol=1e-9, method=method,
                                         options=ref_options).abs().pow(2).sum(), [y0, func.w])
    out = odeint_symplectic_adjoint(func, y0, t, rtol=1e-7, atol=1e-9, method=method, options=ref_options,
                                    memory_budget=budget)
    assert out.dtype == torch.complex128
    got = flat_grads(out.abs().pow(2).sum(), [y0, func.w])
    assert rel_error(got, want) < 1e-10


def _first_step_taken(func, y0, t, **kwargs) -> float:
    """The first step ``torchdiffeq.odeint`` takes, seen through its ``callback_step`` hook."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.func = func

        def forward(self, t_, y_):
            return self.func(t_, y_)

        def callback_step(self, t0, y_, dt):
            seen.append(float(dt))

    with torch.no_grad():
        torchdiffeq.odeint(Probe(), y0, t, **kwargs)
    return seen[0]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_initial_step_is_the_first_step_torchdiffeq_takes(method, reverse):
    torch.manual_seed(0)
    func = TimeDependentField().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.2] if reverse else [0.2, 1.0], dtype=torch.float64)
    kwargs = dict(method=method, rtol=1e-5, atol=1e-6)
    step = initial_step(func, y0, t, **kwargs)
    assert isinstance(step, float) and step == _first_step_taken(func, y0, t, **kwargs)
    # tuple states and a norm option go through torchdiffeq's own input normalisation
    state = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    options = dict(norm=lambda y: torch.stack([x.abs().max() for x in y]).max())  # a tuple norm
    field = TupleField().double()
    assert initial_step(field, state, t, options=options, **kwargs) == \
        _first_step_taken(field, state, t, options=options, **kwargs)
    assert initial_step(func, y0, t, options=dict(first_step=0.125), **kwargs) == 0.125


def test_initial_step_makes_backprop_the_exact_reference():
    """Without it backprop also differentiates the initial step choice; with it, the gradients agree to rounding."""
    torch.manual_seed(1)
    func = TimeDependentField().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 3, dtype=torch.float64)
    kwargs = dict(method="dopri5", rtol=1e-6, atol=1e-8)
    params = [y0, *func.parameters()]

    def grads(solve, options=None):
        return torch.autograd.grad(loss_of(solve(func, y0, t, options=options, **kwargs)), params)

    fixed = dict(first_step=initial_step(func, y0, t, **kwargs))
    assert rel_error(grads(odeint_symplectic_adjoint, fixed), grads(torchdiffeq.odeint, fixed)) < 1e-10
    assert rel_error(grads(odeint_symplectic_adjoint), grads(torchdiffeq.odeint)) > 1e-8  # the trap itself


def test_initial_step_refuses_methods_without_one():
    func = TimeDependentField().double()
    y0 = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"adaptive Runge-Kutta method.*method='rk4'.*step_size"):
        initial_step(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4")
