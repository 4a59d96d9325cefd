"""Every private torchdiffeq name symadj_plugins.torchdiffeq depends on, checked in one place, so that an
upstream change fails here with a clear message rather than as a wrong gradient elsewhere.

The fixed-grid solvers are written out by hand in torchdiffeq; the adapter restates their tableaux and
stage times. These tests replay one torchdiffeq step with a recording vector field and check that the
adapter's tableau reproduces every stage input and the step, and that its stage times and perturbation
flags are bit-for-bit torchdiffeq's. The adapter also restates torchdiffeq's three interpolation formulas to
evaluate many times at once: checked bit for bit against torchdiffeq's own, one time at a time.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq._impl.interp as interp
import torchdiffeq._impl.misc as misc
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _RungeKuttaState
from torchdiffeq._impl.solvers import FixedGridODESolver

from symadj_plugins import torchdiffeq as adapter
from symadj_plugins.core import Trajectory
from symadj_plugins.torchdiffeq import _internals, dense_output, fixed_grid, recording
from symadj_plugins.torchdiffeq.host import _TorchdiffeqHost


def test_the_check_of_torchdiffeqs_private_names_finds_them_all():
    """One list of every private name the adapter uses (the five the old check missed included), and the check
    of the installed torchdiffeq finds nothing missing."""
    listed = {f"{where}.{name}" for where, _, names in _internals.private_names() for name in names}
    for name in ("RKAdaptiveStepsizeODESolver.integrate_until_event", "FixedGridODESolver.integrate_until_event",
                 "_RungeKuttaState (solver.rk_state).interp_coeff", "_PerturbFunc.base_func",
                 "a fixed-grid solver.perturb", "a fixed-grid solver.interp",
                 "torchdiffeq._impl.misc._select_initial_step"):
        assert name in listed
    assert _internals._check_torchdiffeq() == []


def test_a_missing_private_name_is_named_at_the_first_use_and_checked_once(monkeypatch):
    func = torch.nn.Linear(2, 2).double()
    y0, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    monkeypatch.delattr(FixedGridODESolver, "integrate_until_event")
    _internals._check_result.cache_clear()
    try:
        assert _internals._check_torchdiffeq() == ["FixedGridODESolver.integrate_until_event is missing"]
        # the first use raises, naming the installed torchdiffeq and the missing name (no register() involved)
        with pytest.raises(RuntimeError, match=r"torchdiffeq 0\.2.*FixedGridODESolver.integrate_until_event"):
            adapter.odeint_symplectic_adjoint(lambda t, y: func(y), y0, t, adjoint_params=())
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match="integrate_until_event"):  # the result is kept: checked once
            adapter.odeint_symplectic_adjoint(lambda t, y: func(y), y0, t, adjoint_params=())
    finally:
        _internals._check_result.cache_clear()
    calls = []
    monkeypatch.setattr(_internals, "_check_torchdiffeq", lambda: calls.append(1) or [])
    for _ in range(3):
        adapter.odeint_symplectic_adjoint(lambda t, y: func(y), y0, t, adjoint_params=())
    assert calls == [1]
    _internals._check_result.cache_clear()


def test_private_names_exist():
    for name in ("_check_inputs", "_flat_to_shape", "Perturb", "_PerturbFunc"):
        assert hasattr(misc, name), f"torchdiffeq._impl.misc.{name} is gone"
    assert callable(interp._interp_evaluate) and callable(find_parameters)
    assert {"y1", "f1", "t1"} <= set(_RungeKuttaState._fields)
    for attr in ("_interp_fit", "_adaptive_step", "_before_integrate"):
        assert hasattr(RKAdaptiveStepsizeODESolver, attr)
    for attr in ("tableau", "mid"):
        assert hasattr(SOLVERS["dopri5"], attr)
    for attr in ("_linear_interp", "_cubic_hermite_interp", "_step_func", "integrate"):
        assert hasattr(FixedGridODESolver, attr)
    assert {"alpha", "beta", "c_sol"} <= set(SOLVERS["dopri5"].tableau._fields)
    for cls in fixed_grid._FIXED_GRID:
        assert SOLVERS.get(cls.__name__.lower(), cls) is cls


class Recording(torch.nn.Module):
    """A linear field that records every call torchdiffeq makes: (t, y, perturb)."""

    def __init__(self, dim):
        super().__init__()
        torch.manual_seed(3)
        self.m = torch.randn(dim, dim, dtype=torch.float64) * 0.5
        self.calls = []

    def forward(self, t, y, perturb=misc.Perturb.NONE):
        self.calls.append((t.clone(), y.clone(), perturb))
        return y @ self.m.T + t


@pytest.mark.parametrize("method", [m for m in adapter.supported_methods() if m in
                                    ("euler", "midpoint", "rk4", "heun2", "heun3")])
@pytest.mark.parametrize("perturb", [False, True])
def test_fixed_grid_rule_matches_torchdiffeq_step(method, perturb):
    cls = SOLVERS[method]
    rule = fixed_grid._FIXED_GRID[cls]
    field = Recording(3)
    y0 = torch.randn(3, dtype=torch.float64)
    solver = cls(func=field, y0=y0, perturb=perturb, atol=1e-9)
    t0, t1 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.55, dtype=torch.float64)
    dt = t1 - t0
    dy, _ = solver._step_func(field, t0, dt, t1, y0)

    s = rule.tableau.num_stages
    assert len(field.calls) == s
    host = _TorchdiffeqHost(field, method, 1e-7, 1e-9, {"perturb": perturb})
    host.solver = solver
    traj = Trajectory([y0, y0 + dy], t0.reshape(1), t1.reshape(1), dt.reshape(1), [None], {})
    traj.host_data = recording._TorchdiffeqSteps(["initial"], host._stage_times(traj.t0, traj.t1, traj.dt, y0))
    calls = host.stage_calls(traj, 0)
    a, b = rule.tableau.tensors(torch.float64, "cpu")
    recorded = list(field.calls)
    ks = [field(t, y) for t, y, _ in recorded]
    for i, ((t_i, y_i, p_i), call) in enumerate(zip(recorded, calls)):
        assert torch.equal(call.t, t_i), f"{method} stage {i} time"
        assert dict(call.kwargs)["perturb"] is p_i, f"{method} stage {i} perturb flag"
        y_tab = y0 + dt * sum(a[i, j] * ks[j] for j in range(i)) if i else y0
        assert torch.allclose(y_i, y_tab, rtol=1e-14, atol=1e-14), f"{method} stage {i} input"
    assert torch.allclose(dy, dt * sum(b[i] * ks[i] for i in range(s)), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("method", [m for m in adapter.supported_methods()
                                    if issubclass(SOLVERS[m], RKAdaptiveStepsizeODESolver)])
def test_adaptive_tableau_is_torchdiffeqs(method):
    tab = _internals._adaptive_tableau(SOLVERS[method])
    host_tab = SOLVERS[method].tableau
    assert tab.c[1:] == tuple(host_tab.alpha.tolist())
    assert tab.b == tuple(host_tab.c_sol.tolist())
    for i, row in enumerate(host_tab.beta, start=1):
        assert tab.a[i][:i] == tuple(row.tolist())
    # FSAL methods re-evaluate the carried stage; the others store it. torchdiffeq's own test (_runge_kutta_step):
    # the step's y1 is the last stage's input. Not for torchdiffeq master's tsit5, whose c_sol (Tsitouras's
    # embedded weights, last entry 1/66) differs from its last beta row: its carried k_1 is not f(t1, y1).
    host_fsal = bool(host_tab.c_sol[-1] == 0 and (host_tab.c_sol[:-1] == host_tab.beta[-1]).all())
    assert tab.fsal == host_fsal
    if method in ("dopri5", "dopri8", "bosh3"):
        assert tab.fsal


# The replay calls what torchdiffeq's _PerturbFunc wraps, with the time _PerturbFunc would pass on
# (_internals.perturb_base / perturbed_time): the times must be the forward pass's, bit for bit.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method,options", [
    ("rk4", dict(step_size=0.1, perturb=True)),
    ("midpoint", dict(step_size=0.1)),
    ("euler", dict(step_size=0.1, perturb=True)),
    ("dopri5", dict(jump_t=torch.tensor([0.35]))),
    ("bosh3", dict()),
])
@pytest.mark.parametrize("reverse", [False, True])
def test_replayed_evaluations_see_the_forward_pass_times_bit_for_bit(dtype, method, options, reverse):
    from collections import Counter
    seen: dict[str, Counter] = {"forward": Counter(), "replay": Counter()}

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))

        def forward(self, t, y):
            seen["replay" if torch.is_grad_enabled() else "forward"][(t.dtype, t.item())] += 1
            return -self.w * y * torch.cos(3 * t) + (t > 0.35).to(y.dtype)

    field = Field()
    y0 = torch.tensor([1.0, -0.5], dtype=dtype)
    t = torch.tensor([0.0, 0.8], dtype=torch.float64)
    if reverse:
        t = t.flip(0)
        options = {k: (-v if k == "jump_t" else v) for k, v in options.items()}
    # "stages": the forward pass evaluates without a graph, the backward pass with one (the field tells them apart).
    out = adapter.odeint_symplectic_adjoint(field, y0, t, method=method, rtol=1e-6, atol=1e-8, options=options,
                                            memory_budget="stages")
    out[-1].sum().backward()
    assert seen["replay"], "the backward pass evaluated nothing"
    # Every replayed evaluation is a forward one (adaptive solvers also evaluate rejected attempts and probes).
    assert not seen["replay"] - seen["forward"], "the replay evaluated f at times the forward pass did not"
    if method != "dopri5" and method != "bosh3":
        assert seen["replay"] == seen["forward"]  # fixed grid, stage inputs kept: each stage replayed once


def test_perturbed_time_is_what_perturbfunc_passes_on():
    received = []
    wrapped = misc._PerturbFunc(lambda t, y: received.append(t) or y)
    y = torch.zeros(2, dtype=torch.complex64)
    for perturb in (misc.Perturb.NONE, misc.Perturb.PREV, misc.Perturb.NEXT):
        for t in (torch.tensor(0.3, dtype=torch.float64), torch.tensor(2.0 ** 30, dtype=torch.float64)):
            wrapped(t, y, perturb=perturb)
            expected = received.pop()
            got = _internals.perturbed_time(t, y, perturb)
            assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected.detach())
    assert _internals.perturb_base(wrapped) is wrapped.base_func and _internals.perturb_base(lambda t, y: y) is None


@pytest.mark.parametrize("state_dtype,time_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                    (torch.float32, torch.float64), (torch.complex128, torch.float64)],
                         ids=["f64", "f32", "f32-state-f64-times", "complex"])
def test_dense_output_at_many_times_is_torchdiffeqs_at_each_time_bit_for_bit(state_dtype, time_dtype):
    torch.manual_seed(0)
    t0, t1 = torch.tensor(0.3, dtype=time_dtype), torch.tensor(0.7, dtype=time_dtype)
    times = torch.cat([t0[None], 0.3 + 0.4 * torch.rand(6, dtype=time_dtype), t1[None]])  # both ends included
    y0, y1, f0, f1, y_mid = (torch.randn(3, 2, dtype=state_dtype) for _ in range(5))
    coefficients = interp._interp_fit(y0, y1, y_mid, f0, f1, (t1 - t0).to(state_dtype))
    column = times.reshape(-1, 1, 1)

    def at_each_time(formula):
        return torch.stack([formula(t) for t in times])

    assert torch.equal(dense_output.interp_evaluate(coefficients, t0, t1, column),
                       at_each_time(lambda t: interp._interp_evaluate(coefficients, t0, t1, t)))
    assert torch.equal(dense_output.linear_interp(t0, t1, y0, y1, column),
                       at_each_time(lambda t: FixedGridODESolver._linear_interp(None, t0, t1, y0, y1, t)))
    assert torch.equal(dense_output.cubic_hermite_interp(t0, y0, f0, t1, y1, f1, column),
                       at_each_time(lambda t: FixedGridODESolver._cubic_hermite_interp(None, t0, y0, f0, t1, y1, f1,
                                                                                       t)))
