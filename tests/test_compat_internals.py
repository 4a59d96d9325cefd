"""Every private name the torch_symplectic_adjoint compat package uses (listed in its ``_host.py`` and
``_methods.py``), checked in one place: a change in torchdiffeq or in the adapter fails here, by name."""

import inspect

import pytest
import torch
import torchdiffeq
from torch_symplectic_adjoint import _host, _methods
from torchdiffeq._impl import misc
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _runge_kutta_step, rk4_step_func
from torchdiffeq._impl.solvers import FixedGridODESolver

from symadj_plugins import torchdiffeq as adapter
from symadj_plugins.inputs import check_times, parameters_requiring_grad
from symadj_plugins.torchdiffeq.fixed_grid import _FIXED_GRID


def test_torchdiffeq_private_names():
    for name in ("_check_inputs", "_flat_to_shape", "Perturb"):
        assert hasattr(misc, name), f"torchdiffeq._impl.misc.{name} is gone"
    assert {"NONE", "PREV", "NEXT"} <= set(misc.Perturb.__members__)
    assert list(inspect.signature(misc._check_inputs).parameters) == [
        "func", "y0", "t", "rtol", "atol", "method", "options", "event_fn", "SOLVERS"]
    assert list(inspect.signature(_runge_kutta_step).parameters) == ["func", "y0", "f0", "t0", "dt", "t1", "tableau"]
    assert list(inspect.signature(rk4_step_func).parameters) == ["func", "t0", "dt", "t1", "y0", "f0", "perturb"]
    assert callable(find_parameters)
    assert "perturb" in inspect.signature(FixedGridODESolver.__init__).parameters
    assert hasattr(FixedGridODESolver, "_step_func")
    assert {"alpha", "beta", "c_sol"} <= set(SOLVERS["dopri5"].tableau._fields)


def test_every_method_maps_onto_a_torchdiffeq_solver_class():
    for name in _methods.METHODS:
        cls = _methods.SOLVERS[name]
        assert issubclass(cls, (RKAdaptiveStepsizeODESolver, FixedGridODESolver)), name
        td_name = _methods.torchdiffeq_name(name)
        assert (cls is _methods.ClassicalRK4) if td_name is None else (SOLVERS[td_name] is cls), name
    assert name not in SOLVERS.values() if (name := _methods.ClassicalRK4) else True  # never put into torchdiffeq


def test_runge_kutta_step_returns_y1_f1_error_and_stages():
    tab = SOLVERS["bosh3"].tableau
    y0 = torch.ones(2, dtype=torch.float64)
    t0, dt = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    y1, f1, err, k = _runge_kutta_step(lambda t, y, perturb=None: -y, y0, -y0, t0, dt, t0 + dt, tableau=tab)
    assert y1.shape == y0.shape and f1.shape == y0.shape and err.shape == y0.shape and k.shape == (2, 4)
    assert torch.equal(f1, k[..., -1])


def test_adapter_public_api_it_uses():
    assert list(inspect.signature(adapter.torchdiffeq_host).parameters)[:5] == [
        "func", "method", "rtol", "atol", "options"]
    assert {"rule", "store_stages"} <= set(inspect.signature(adapter.torchdiffeq_host).parameters)
    assert set(adapter.FixedGridRule.__dataclass_fields__) == {"tableau", "stage_times", "perturb_prev"}
    assert callable(check_times) and callable(parameters_requiring_grad)


def test_importing_compat_leaves_the_adapter_unchanged():
    # The classical RK4 rule travels with each call; the adapter's table of torchdiffeq's solvers is not extended.
    assert _methods.ClassicalRK4 not in _FIXED_GRID
    assert all(cls.__module__.startswith("torchdiffeq.") for cls in _FIXED_GRID)


def test_classical_rk4_host_is_a_full_adapter_host():
    """Built through the adapter's own __init__, so every attribute it sets is there; then re-pointed."""
    _, func, y0, t, rtol, atol, options = _host.normalise(lambda t, y: -y, torch.ones(2, dtype=torch.float64),
                                                          torch.linspace(0, 1, 3, dtype=torch.float64), 1e-7, 1e-9,
                                                          "rk4", {})
    host = _host.make_host(func, "rk4", rtol, atol, options)
    reference = adapter.torchdiffeq_host(func, "rk4", rtol, atol, options)
    assert set(vars(host)) == set(vars(reference))
    assert host.solver_cls is _methods.ClassicalRK4 and host.tableau.b == (1 / 6, 1 / 3, 1 / 3, 1 / 6)
    assert host.fixed_rule.stage_times == (0.0, 0.5, 0.5, "t1")
    solution, trajectory = host.solve(y0, t)
    assert trajectory.num_steps == 2 and torch.equal(solution[-1], trajectory.states[-1])


@pytest.mark.filterwarnings("ignore:Solver .* does not support callbacks")
def test_torchdiffeq_reports_steps_through_func_callbacks():
    """The adapter (and so this package) records steps through ``func.callback_step`` /
    ``callback_accept_step``; torchdiffeq 0.2.3 has no such hooks, and then nothing could be replayed."""
    seen = {"callback_step": 0, "callback_accept_step": 0}

    class Func(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            seen["callback_step"] += 1

        def callback_accept_step(self, t0, y0, dt):
            seen["callback_accept_step"] += 1

    y0, t = torch.ones(2, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64)
    torchdiffeq.odeint(Func(), y0, t, method="rk4")
    assert seen["callback_step"] == 2, "torchdiffeq does not call func.callback_step (needs torchdiffeq>=0.2.4)"
    torchdiffeq.odeint(Func(), y0, t, method="dopri5")
    assert seen["callback_accept_step"] >= 2, "torchdiffeq does not call func.callback_accept_step"
