"""torchdyn's ``sensitivity="symplectic_adjoint"``, checked against torchdyn itself.

- The forward pass is torchdyn's: ``(t_eval, sol)`` equal ``sensitivity="autograd"``'s bit for bit.
- Gradients equal backpropagation through the same accepted steps with the step sizes held constant: for
  fixed-step solvers that is torchdyn's ``"autograd"``; for adaptive ones it is ``"autograd"`` with the one
  step size torchdyn differentiates (the first, from ``init_step``) detached (``adapt_step`` is already under
  ``no_grad`` in torchdyn 1.0.6). ``autograd_with_constant_steps`` below does that by patching ``init_step``
  in the test only.
- Every option of the issue, every bad input, registration, and torchdyn's internals the adapter relies on.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import DenseOutputProbe, rel_error
from torch import nn
from torchdyn.core import MultipleShootingLayer, NeuralODE, ODEProblem
from torchdyn.core import problems as torchdyn_problems
from torchdyn.numerics.interpolators import FourthOrder
from torchdyn.numerics.solvers.ode import RungeKutta4

import symadj_plugins
from symadj_plugins.core.budget import MemoryBudget
from symadj_plugins.core.recording import StageKeeper
from symadj_plugins.torchdyn import _internals, recording
from symadj_plugins.torchdyn.host import _TorchdynHost

torchdyn_odeint = importlib.import_module("torchdyn.numerics.odeint")

SOLVERS = ["euler", "midpoint", "rk4", "dopri5", "tsit5"]
ADAPTIVE = {"dopri5", "tsit5"}
DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
SOLVER_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # atol = rtol of adaptive solvers


pytestmark = pytest.mark.usefixtures("registered", "torchdyn_warnings_ignored")


# --------------------------------------------------------------------------------------------------------
# Problems and references

class Field(nn.Module):
    """``dx/dt = MLP(x)·(1 + t) + 0.1 sin(3t)``: depends on time, so a stage replayed at the wrong time shows."""

    def __init__(self, dim: int = 2, width: int = 8, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t, x, args=None):
        return self.net(x) * (1 + t) + 0.1 * torch.sin(3 * t)


def loss_of(sol: torch.Tensor) -> torch.Tensor:
    """Weights every output time differently, so each output's cotangent differs."""
    weights = torch.arange(1, sol.shape[0] + 1, dtype=sol.dtype)
    return (sol.pow(2).sum(dim=tuple(range(1, sol.ndim))) * weights).sum() + sol.sin().sum()


def grads(loss, inputs):
    out = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(out, inputs)]


def autograd_with_constant_steps(monkeypatch):
    """Makes torchdyn's ``'autograd'`` backpropagate through its accepted steps with the step sizes constant."""
    init_step = torchdyn_odeint.init_step
    monkeypatch.setattr(torchdyn_odeint, "init_step", lambda *args, **kwargs: init_step(*args, **kwargs).detach())


def assert_exact(error: float, dtype: torch.dtype, solver: str | None = None) -> None:
    # float64 dopri5/tsit5 steps in which torchdyn rounded some dt * a_ij to float32 are exact too: the host
    # hands the core the coefficients torchdyn really used (HostSolver.step_coefficients).
    tolerance = TOLERANCE[dtype]
    assert error <= tolerance, f"relative gradient error {error:.2e} > {tolerance:.0e}"


def case_inputs(case: str, solver: str, dtype: torch.dtype) -> dict:
    """``t_span`` and options of one column of the exactness table."""
    fixed = solver not in ADAPTIVE
    if case == "t_span":
        return {"t_span": torch.linspace(0, 1, 5, dtype=dtype)}
    if case == "save_at":
        if fixed:  # outputs at some step ends only (neither the first nor the last)
            t_span = torch.linspace(0, 1, 9, dtype=dtype)
            return {"t_span": t_span, "save_at": t_span[[2, 5]]}
        # adaptive solvers ignore save_at (torchdyn warns): outputs between steps come from t_span points,
        # which torchdyn reaches by shortening steps
        return {"t_span": torch.tensor([0.0, 0.13, 0.5, 0.77, 1.0], dtype=dtype)}
    if case == "reversed":
        return {"t_span": torch.linspace(1, 0, 5, dtype=dtype)}
    if case == "interpolator_4th":  # dopri5 interpolates inside steps; torchdyn ignores it for the others
        return {"t_span": torch.linspace(0, 1, 7, dtype=dtype), "interpolator": "4th"}
    raise AssertionError(case)


def solve(sensitivity, field, x, t_span, *, solver, interpolator=None, save_at=(), **options):
    dtype = x.dtype
    model = NeuralODE(field, sensitivity=sensitivity, solver=solver, interpolator=interpolator,
                      atol=SOLVER_TOLERANCE[dtype], rtol=SOLVER_TOLERANCE[dtype], **options)
    return model(x, t_span, save_at=save_at)


def problem(dtype, seed=0, batch=3, dim=2, **field_kwargs):
    torch.manual_seed(seed)
    field = Field(dim=dim, **field_kwargs).to(dtype)
    x = torch.randn(batch, dim, dtype=dtype, requires_grad=True)
    return field, x


CASES = ["t_span", "save_at", "reversed", "interpolator_4th"]


# --------------------------------------------------------------------------------------------------------
# The forward pass is torchdyn's; the gradient is exact.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_forward_pass_is_torchdyns_bit_for_bit(solver, case, dtype):
    field, x = problem(dtype)
    inputs = case_inputs(case, solver, dtype)
    t_ours, sol_ours = solve("symplectic_adjoint", field, x, solver=solver, **inputs)
    t_theirs, sol_theirs = solve("autograd", field, x, solver=solver, **inputs)
    assert sol_ours.shape == sol_theirs.shape and t_ours.shape == t_theirs.shape
    assert torch.equal(t_ours, t_theirs)
    assert torch.equal(sol_ours, sol_theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_gradient_equals_backprop_through_the_same_steps(solver, case, dtype, monkeypatch):
    field, x = problem(dtype)
    inputs = case_inputs(case, solver, dtype)
    wrt = [x, *field.parameters()]
    _, sol = solve("symplectic_adjoint", field, x, solver=solver, **inputs)
    ours = grads(loss_of(sol), wrt)
    autograd_with_constant_steps(monkeypatch)
    _, sol_ref = solve("autograd", field, x, solver=solver, **inputs)
    reference = grads(loss_of(sol_ref), wrt)
    assert_exact(rel_error(ours, reference), dtype, solver)


def test_a_step_with_several_outputs_makes_one_vjp_and_equals_backprop(monkeypatch):
    field, x = problem(torch.float64)
    t_span = torch.linspace(0, 1, 41, dtype=torch.float64)  # more points than dopri5 takes steps
    wrt = [x, *field.parameters()]
    probe = DenseOutputProbe(monkeypatch, _TorchdynHost)
    _, sol = solve("symplectic_adjoint", field, x, t_span, solver="dopri5", interpolator="4th")
    ours = grads(loss_of(sol), wrt)
    steps, times, vjps = zip(*probe.calls)
    # Each step's outputs in one dense output and one VJP; all 40 outputs after t_span[0] covered, several per step.
    assert len(set(steps)) == len(steps) and set(vjps) == {1}
    assert sum(times) == 40 and max(times) > 1
    autograd_with_constant_steps(monkeypatch)
    _, sol_ref = solve("autograd", field, x, t_span, solver="dopri5", interpolator="4th")
    assert_exact(rel_error(ours, grads(loss_of(sol_ref), wrt)), torch.float64)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_fixed_step_gradient_equals_torchdyn_autograd_itself(solver):
    field, x = problem(torch.float64)
    t_span = torch.linspace(0, 1, 6, dtype=torch.float64)
    wrt = [x, *field.parameters()]
    ours = grads(loss_of(solve("symplectic_adjoint", field, x, t_span, solver=solver)[1]), wrt)
    theirs = grads(loss_of(solve("autograd", field, x, t_span, solver=solver)[1]), wrt)
    assert rel_error(ours, theirs) <= 1e-12


def test_float32_times_with_float64_state(monkeypatch):
    """torchdyn then computes step times in float32 and some stage times in float64: replayed as it did."""
    field, x = problem(torch.float64)
    t_span = torch.tensor([0.0, 0.3, 1.0])
    wrt = [x, *field.parameters()]
    for solver in ["rk4", "dopri5"]:
        t_ours, sol = solve("symplectic_adjoint", field, x, t_span, solver=solver, interpolator="4th")
        ours = grads(loss_of(sol), wrt)
        with monkeypatch.context() as patch:
            autograd_with_constant_steps(patch)
            t_ref, sol_ref = solve("autograd", field, x, t_span, solver=solver, interpolator="4th")
        assert torch.equal(sol, sol_ref) and torch.equal(t_ours, t_ref)
        assert_exact(rel_error(ours, grads(loss_of(sol_ref), wrt)), torch.float64, solver)


def test_rk4_stages_are_replayed_where_torchdyns_step_evaluates_them():
    """torchdyn 1.0.6's RungeKutta4.step evaluates k2..k4 at t + c[0..2]·dt with c = (0, 1/2, 1/2, 1): at
    (t, t, t + dt/2, t + dt/2), not at the textbook (t, t + dt/2, t + dt/2, t + dt). The exactness tests above
    use a time-dependent field, so replaying at the textbook times would fail them."""
    solver = RungeKutta4(torch.float64)
    seen = []

    def f(t, x):
        seen.append(float(t))
        return torch.cos(x) * t

    solver.step(f, torch.ones(2, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64),
                torch.tensor(0.5, dtype=torch.float64))
    assert seen == [1.0, 1.0, 1.25, 1.25]
    assert _internals._stage_offsets(solver) == (0.0, 0.0, 0.5, 0.5)  # where its step evaluates the stages
    assert _internals._tableau_of(solver).c == (0.0, 0.5, 0.5, 1.0)  # the nodes: c has one meaning


def test_torchdyns_interpolant_is_linear_in_the_stages():
    """The core needs the dense output to be linear in (y0, y1, k): its VJP must not depend on their values."""
    interp = FourthOrder(torch.float64)
    dt, t0, t1, t = (torch.tensor([v], dtype=torch.float64) for v in (0.3, 0.1, 0.4, 0.27))

    def vjp_at(seed):
        torch.manual_seed(seed)
        y0, y1 = (torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
        k = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(7)]
        x_mid = y0 + dt * sum([interp.bmid[i] * k[i] for i in range(7)])
        out = interp.evaluate(interp.fit(dt, k[0], k[-1], y0, y1, x_mid), t0, t1, t)
        return torch.autograd.grad(out, [y0, y1, *k], torch.ones_like(out))

    for a, b in zip(vjp_at(0), vjp_at(1)):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# Options

def test_args_are_passed_as_torchdyn_passes_them():
    field, x = problem(torch.float64)
    t_span = torch.linspace(0, 1, 4, dtype=torch.float64)
    ours = solve("symplectic_adjoint", field, x, t_span, solver="rk4")
    with_args = NeuralODE(field, sensitivity="symplectic_adjoint", solver="rk4")(x, t_span, args={"unused": 1})
    theirs = NeuralODE(field, sensitivity="autograd", solver="rk4")(x, t_span, args={"unused": 1})
    assert torch.equal(with_args[1], theirs[1]) and torch.equal(ours[1], theirs[1])


def test_optimizable_params_of_a_parameterless_vector_field():
    k = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    torch.manual_seed(0)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t_span = torch.linspace(0, 1, 5, dtype=torch.float64)
    results = []
    for sensitivity in ["symplectic_adjoint", "autograd"]:
        problem_ = ODEProblem(lambda x: -k * torch.sin(x) * x, "rk4", sensitivity=sensitivity, optimizable_params=[k])
        _, sol = problem_.odeint(x, t_span)
        results.append(grads(loss_of(sol), [x, k]))
    assert results[0][1].abs() > 0
    assert rel_error(*results) <= 1e-12


def test_second_order_system_through_defunc():
    """``order=2``: torchdyn's DEFunc makes it a first-order system on (x, v); that is what is replayed."""
    class Acceleration(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, t, z, args=None):
            return torch.tanh(self.lin(z)) * (1 + t)

    torch.manual_seed(0)
    acc = Acceleration().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t_span = torch.linspace(0, 1, 5, dtype=torch.float64)
    results = []
    for sensitivity in ["symplectic_adjoint", "autograd"]:
        _, sol = NeuralODE(acc, order=2, solver="rk4", sensitivity=sensitivity)(x, t_span)
        results.append(grads(loss_of(sol), [x, *acc.parameters()]))
    assert rel_error(*results) <= 1e-12


class IntegralLoss(nn.Module):
    """A running cost with its own parameter, depending on time and state."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))

    def forward(self, t, x):
        return (x * self.w).sum(-1).pow(2) * (1 + t)


@pytest.mark.parametrize(("solver", "reverse"), [("euler", False), ("midpoint", False), ("rk4", False),
                                                 ("rk4", True)])
def test_integral_loss_gradient_equals_autograd_on_the_augmented_state(solver, reverse):
    """torchdyn's convention: with an adjoint the state is not augmented and backward adds the gradient of
    ``Σ ∫ integral_loss dt``; under 'autograd' the user augments x with an accumulator column. Same steps here."""
    field, x = problem(torch.float64)
    cost = IntegralLoss()
    t_span = torch.linspace(1, 0, 6, dtype=torch.float64) if reverse else torch.linspace(0, 1, 6, dtype=torch.float64)
    wrt = [x, *field.parameters(), cost.w]

    _, sol = NeuralODE(field, sensitivity="symplectic_adjoint", solver=solver, integral_loss=cost)(x, t_span)
    ours = grads(sol.pow(2).sum(), wrt)

    augmented = torch.cat([torch.zeros(3, 1, dtype=torch.float64), x], dim=1)
    _, sol_aug = NeuralODE(field, sensitivity="autograd", solver=solver, integral_loss=cost)(augmented, t_span)
    assert torch.equal(sol, sol_aug[..., 1:])
    reference = grads(sol_aug[..., 1:].pow(2).sum() + sol_aug[-1, :, 0].sum(), wrt)
    assert rel_error(ours, reference) <= 1e-12
    assert ours[-1].abs().sum() > 0


def test_integral_loss_with_an_adaptive_solver():
    """Reference: backprop through torchdyn's own DormandPrince45.step over the accepted steps of the
    (unaugmented) solve, on the state augmented with the accumulator, as DEFunc augments it under 'autograd'."""
    field, x = problem(torch.float64)
    cost = IntegralLoss()
    t_span = torch.tensor([0.0, 1.0], dtype=torch.float64)
    wrt = [x, *field.parameters(), cost.w]
    model = NeuralODE(field, sensitivity="symplectic_adjoint", solver="dopri5", atol=1e-6, rtol=1e-6,
                      integral_loss=cost)
    _, sol = model(x, t_span)
    ours = grads(sol[-1].pow(2).sum(), wrt)

    keeper = StageKeeper(MemoryBudget(0), x, 7, ())
    with torch.no_grad(), recording._TorchdynStepRecorder(model.solver, keeper) as recorder:
        torchdyn_problems.odeint(model.vf, x, t_span, recorder.solver, model.atol, model.rtol)
    recorder.finish()

    def augmented_field(t, z):
        return torch.cat([cost(t, z[:, 1:])[:, None], field(t, z[:, 1:])], dim=1)

    z = torch.cat([torch.zeros(3, 1, dtype=torch.float64), x], dim=1)
    k1 = augmented_field(recorder.steps[0].t, z)
    for step in recorder.steps:
        k1, z, _, _ = model.solver.step(augmented_field, z, step.t, step.dt, k1=k1)
    assert torch.allclose(z[:, 1:], sol[-1], rtol=1e-13, atol=1e-13)
    reference = grads(z[:, 1:].pow(2).sum() + z[:, 0].sum(), wrt)
    assert_exact(rel_error(ours, reference), torch.float64, "dopri5")


def test_no_grad_gives_torchdyns_solution():
    field, x = problem(torch.float32)
    t_span = torch.linspace(0, 1, 4)
    with torch.no_grad():
        ours = NeuralODE(field, sensitivity="symplectic_adjoint", solver="dopri5")(x, t_span)
        theirs = NeuralODE(field, sensitivity="autograd", solver="dopri5")(x, t_span)
    assert torch.equal(ours[1], theirs[1]) and not ours[1].requires_grad


def test_solver_instance_and_odeproblem():
    field, x = problem(torch.float64)
    t_span = torch.linspace(0, 1, 3, dtype=torch.float64)
    solver = torchdyn_problems.str_to_solver("tsit5", torch.float64)
    t_eval, sol = ODEProblem(field, solver, sensitivity="symplectic_adjoint", atol=1e-6, rtol=1e-6).odeint(x, t_span)
    t_ref, sol_ref = ODEProblem(field, solver, sensitivity="autograd", atol=1e-6, rtol=1e-6).odeint(x, t_span)
    assert torch.equal(sol, sol_ref) and torch.equal(t_eval, t_ref)
    assert "step" not in solver.__dict__  # the recorder put torchdyn's step back
    assert grads(sol.sum(), [x])[0].abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# Bad input

def _forward(model, t_span=None, x=None):
    x = torch.randn(3, 2, requires_grad=True) if x is None else x
    return model(x, torch.linspace(0, 1, 3) if t_span is None else t_span)


@pytest.mark.parametrize("solver", ["alf", "ieuler"])
def test_unsupported_solver_names_what_is_supported(solver):
    model = NeuralODE(Field(), sensitivity="symplectic_adjoint", solver=solver)
    with pytest.raises(ValueError, match="Supported: 'euler', 'midpoint', 'rk4', 'dopri5', 'tsit5'"):
        _forward(model)


def test_solver_subclass_with_its_own_step_is_unsupported():
    from torchdyn.numerics.solvers.hyper import HyperEuler

    model = NeuralODE(Field(), sensitivity="symplectic_adjoint", solver=HyperEuler(lambda t, x: torch.zeros_like(x)))
    with pytest.raises(ValueError, match="HyperEuler is not supported"):
        _forward(model)


def test_multiple_shooting_is_unsupported():
    model = MultipleShootingLayer(lambda x: -x, solver="zero", sensitivity="symplectic_adjoint")
    with pytest.raises(ValueError, match="does not support multiple shooting.*'rk4'"):
        model(torch.randn(3, 2, requires_grad=True), torch.linspace(0, 1, 3))


def test_unknown_sensitivity_lists_every_valid_value():
    model = NeuralODE(Field(), sensitivity="symplectic", solver="rk4")
    with pytest.raises(ValueError, match="'autograd', 'adjoint', 'interpolated_adjoint', 'symplectic_adjoint'"):
        _forward(model)


@pytest.mark.parametrize(("t_span", "message"), [
    (torch.tensor([0.0]), "at least two times"),
    (torch.tensor([0.0, 0.5, 0.3, 1.0]), "strictly increasing or strictly decreasing"),
    (torch.tensor([0.0, 0.5, 0.5, 1.0]), "strictly increasing or strictly decreasing"),
    (torch.zeros(2, 3), "1-D tensor"),
])
def test_bad_t_span(t_span, message):
    model = NeuralODE(Field(), sensitivity="symplectic_adjoint", solver="dopri5")
    with pytest.raises(ValueError, match=message):
        _forward(model, t_span)


def test_gradient_wrt_t_span_is_refused():
    model = NeuralODE(Field(), sensitivity="symplectic_adjoint", solver="rk4")
    with pytest.raises(ValueError, match="with respect to t_span"):
        _forward(model, torch.linspace(0, 1, 3).requires_grad_())


def test_unsupported_interpolator():
    model = NeuralODE(Field(), sensitivity="symplectic_adjoint", solver="dopri5", interpolator="cubic")
    with pytest.raises(ValueError, match="interpolator='cubic'"):
        _forward(model)


# --------------------------------------------------------------------------------------------------------
# Registration and torchdyn's internals

def test_register_hooks_the_dispatch_only_and_unregister_restores_it():
    symadj_plugins.unregister()
    originals = {cls: cls.__dict__["_autograd_func"]
                 for cls in (torchdyn_problems.ODEProblem, torchdyn_problems.MultipleShootingProblem)}
    # unregister() also removed the guard of `import symadj_plugins` (test_import_and_unregister_leave_torchdyn...)
    assert all(f.__module__ == "torchdyn.core.problems" and not hasattr(f, "__wrapped__") for f in originals.values())

    symadj_plugins.register()
    symadj_plugins.register()  # idempotent
    assert symadj_plugins.is_registered("torchdyn")
    assert all(cls.__dict__["_autograd_func"] is not original for cls, original in originals.items())
    t_eval, sol = _forward(NeuralODE(Field(), sensitivity="symplectic_adjoint", solver="rk4"))
    assert sol.requires_grad

    symadj_plugins.unregister()
    symadj_plugins.unregister()
    assert not symadj_plugins.is_registered("torchdyn")
    assert all(cls.__dict__["_autograd_func"] is original for cls, original in originals.items())


def test_torchdyns_own_sensitivities_are_untouched():
    field, x = problem(torch.float64)
    t_span = torch.linspace(0, 1, 3, dtype=torch.float64)
    model = NeuralODE(field, sensitivity="adjoint", solver="rk4")
    _, registered_sol = model(x, t_span)
    registered = grads(registered_sol.sum(), [x])
    symadj_plugins.unregister()
    _, plain_sol = model(x, t_span)
    assert torch.equal(registered[0], grads(plain_sol.sum(), [x])[0])


def test_the_installed_torchdyn_is_what_the_adapter_expects():
    assert _internals._check_torchdyn() == []


def test_registration_fails_loudly_when_torchdyn_changes(monkeypatch):
    def textbook_rk4_step(self, f, x, t, dt, k1=None, args=None):
        _, a, b, _ = self.tableau
        k1 = f(t, x)
        k2 = f(t + dt / 2, x + dt * a[0] * k1)
        k3 = f(t + dt / 2, x + dt * (a[1][0] * k1 + a[1][1] * k2))
        k4 = f(t + dt, x + dt * (a[2][0] * k1 + a[2][1] * k2 + a[2][2] * k3))
        return None, x + dt * (b[0] * k1 + b[1] * k2 + b[2] * k3 + b[3] * k4), None

    symadj_plugins.unregister()
    monkeypatch.setattr(RungeKutta4, "step", textbook_rk4_step)
    with pytest.raises(RuntimeError, match=r"torchdyn 1\.0\.6 .*RungeKutta4.step evaluates stage 2 at t \+ 0\.5 dt"):
        symadj_plugins.register()

    monkeypatch.undo()
    monkeypatch.delattr(torchdyn_problems.MultipleShootingProblem, "_autograd_func")
    with pytest.raises(RuntimeError, match=r"MultipleShootingProblem\._autograd_func is missing"):
        symadj_plugins.register()


# --------------------------------------------------------------------------------------------------------
# One model, several threads; and nothing of torchdyn's left changed by a failed solve

@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_one_model_solves_in_two_threads_with_the_single_thread_gradient(solver):
    from helpers import run_in_threads

    field, x = problem(torch.float64)
    model = NeuralODE(field, sensitivity="symplectic_adjoint", solver=solver, atol=1e-6, rtol=1e-6)
    t_span = torch.linspace(0, 1, 3, dtype=torch.float64)
    wrt = [x, *field.parameters()]
    _, sol = model(x, t_span)
    reference = grads(loss_of(sol), wrt)

    results, errors = [], []

    def solve_twenty_times():
        for _ in range(20):
            try:
                _, sol = model(x, t_span)
                results.append(grads(loss_of(sol), wrt))
            except Exception as exc:  # reported below
                errors.append(exc)

    run_in_threads(solve_twenty_times, 2)
    assert not errors, errors[:3]
    assert len(results) == 40
    for got in results:
        assert all(torch.equal(g, r) for g, r in zip(got, reference))
    assert "step" not in vars(model.solver)


def test_an_error_inside_the_field_leaves_torchdyns_solver_as_it_was():
    field, x = problem(torch.float64)

    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.field, self.fail = field, True

        def forward(self, t, x, args=None):
            if self.fail:
                raise FloatingPointError("the field failed")
            return self.field(t, x)

    failing = Failing()
    model = NeuralODE(failing, sensitivity="symplectic_adjoint", solver="dopri5", atol=1e-6, rtol=1e-6)
    t_span = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="the field failed"):
        model(x, t_span)
    assert "step" not in vars(model.solver)
    assert type(model.solver).step is torchdyn_dopri5_step()

    failing.fail = False
    model.sensalg = "autograd"
    _, sol = model(x, t_span)
    _, expected = NeuralODE(field, sensitivity="autograd", solver="dopri5", atol=1e-6, rtol=1e-6)(x, t_span)
    assert torch.equal(sol, expected)
    model.sensalg = "symplectic_adjoint"
    _, sol = model(x, t_span)
    assert torch.equal(sol, expected)


def torchdyn_dopri5_step():
    from torchdyn.numerics.solvers.ode import DormandPrince45

    return DormandPrince45.__dict__["step"]


def test_unregistered_sensitivity_names_register_in_a_fresh_process_that_unpickles_a_model(tmp_path):
    """symadj_plugins imported (before torchdyn) but not registered: a model unpickled there says to call
    register(); after register() the same model solves."""
    import pickle
    import subprocess
    import sys

    model = NeuralODE(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)), sensitivity="symplectic_adjoint",
                      solver="rk4")
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    script = f"""
import pickle, sys, torch
import symadj_plugins
assert "torchdyn" not in sys.modules
model = pickle.loads(open({str(path)!r}, "rb").read())
x = torch.randn(3, 2, requires_grad=True)
try:
    model(x, torch.linspace(0, 1, 3))
except RuntimeError as exc:
    print("ERROR:", exc)
symadj_plugins.register()
_, sol = model(x, torch.linspace(0, 1, 3))
sol.sum().backward()
print("SOLVED:", x.grad is not None)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ERROR: sensitivity='symplectic_adjoint' is provided by symadj-plugins" in done.stdout
    assert "call symadj_plugins.register()" in done.stdout
    assert "SOLVED: True" in done.stdout


@pytest.mark.parametrize("torchdyn_first", [True, False], ids=["torchdyn_imported_first", "symadj_imported_first"])
def test_import_and_unregister_leave_torchdyn_as_it_was(torchdyn_first):
    """`import symadj_plugins` guards torchdyn's dispatch (documented; nothing else), and unregister() puts back the
    very objects torchdyn held before that import, and sys.meta_path as it was."""
    import subprocess
    import sys

    script = f"""
import sys
meta_path = list(sys.meta_path)
if {torchdyn_first}:
    import torchdyn.core.problems as problems
    before = [c.__dict__["_autograd_func"] for c in (problems.ODEProblem, problems.MultipleShootingProblem)]
import symadj_plugins
import torchdyn.core.problems as problems
classes = (problems.ODEProblem, problems.MultipleShootingProblem)
if not {torchdyn_first}:
    before = [c.__dict__["_autograd_func"].__wrapped__ for c in classes]  # torchdyn's own, under the guard
assert all(c.__dict__["_autograd_func"] is not f for c, f in zip(classes, before))  # the guard
symadj_plugins.register()
symadj_plugins.unregister()
assert all(c.__dict__["_autograd_func"] is f for c, f in zip(classes, before)), "not restored"
assert all(f.__qualname__.endswith("._autograd_func") and f.__module__ == problems.__name__ for f in before)
assert len(sys.meta_path) == len(meta_path) and all(a is b for a, b in zip(sys.meta_path, meta_path)), "meta_path"
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_the_torchdyn_host_solves_the_state_and_times_it_is_given(solver, reverse):
    """``_TorchdynHost.solve(y0, t)`` solves ``y0`` over ``t`` (core coordinates), not what ``__init__`` saw."""
    from symadj_plugins.torchdyn.host import _TorchdynHost

    field, x = problem(torch.float64)
    t_span = torch.linspace(0, 1, 4, dtype=torch.float64)
    t_span = t_span.flip(0) if reverse else t_span
    model = NeuralODE(field, sensitivity="symplectic_adjoint", solver=solver)
    host = _TorchdynHost(model, x.detach(), t_span, (), {}, None, MemoryBudget.parse("min"))
    other = 2.0 * x.detach() + 1.0
    with torch.no_grad():
        got, _ = host.solve(other, host.t_core[:2].clone())  # a different state, and only the first interval
        _, want = NeuralODE(field, sensitivity="autograd", solver=solver)(other, t_span[:2])
    assert torch.equal(got, want)


@pytest.mark.parametrize("budget", ["min", "trajectory", "max"])
def test_the_solve_leaves_nothing_for_the_garbage_collector(registered, budget):
    """As for torchdiffeq (tests/test_torchdiffeq_memory.py): reference counting frees what the solve kept."""
    import gc

    field = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
    model = NeuralODE(field, sensitivity="symplectic_adjoint", solver="dopri5")
    x = torch.randn(8, 4)

    def solve_and_backward():
        with symadj_plugins.options(memory_budget=budget):
            _, y = model(x, torch.linspace(0, 1, 4))
        y.sum().backward()

    solve_and_backward()  # warm-up: caches are filled once
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
        solve_and_backward()
        left = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)} - before
    finally:
        gc.enable()
    assert not left, f"{len(left)} tensors left for the garbage collector"
