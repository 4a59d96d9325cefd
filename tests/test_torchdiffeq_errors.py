"""Bad input gets a clear error that names the problem, before any state is touched."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS

from symadj_plugins import torchdiffeq as adapter
from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

# Methods of torchdiffeq that are not explicit Runge-Kutta methods (backward_euler: torchdiffeq after 0.2.5).
NOT_RK = [m for m in ("explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver", "backward_euler")
          if m in SOLVERS]
# Names the installed torchdiffeq does not know: a typo, or a method of a newer torchdiffeq (tsit5 after 0.2.5).
UNKNOWN = ["not_a_method", "dopri", *(m for m in ("tsit5", "backward_euler") if m not in SOLVERS)]


@pytest.mark.parametrize("method", NOT_RK)
def test_unsupported_method_lists_supported(problem, method):
    func, y0, t = problem
    with pytest.raises(ValueError, match=r"not supported.*supported: dopri8, dopri5.*rk4"):
        odeint_symplectic_adjoint(func, y0, t, method=method)


@pytest.mark.parametrize("method", UNKNOWN)
def test_method_unknown_to_torchdiffeq_gets_torchdiffeqs_error(problem, method):
    func, y0, t = problem
    with pytest.raises(ValueError) as ours:
        odeint_symplectic_adjoint(func, y0, t, method=method)
    with pytest.raises(ValueError) as theirs:
        torchdiffeq.odeint(func, y0, t, method=method)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith(f'Invalid method "{method}"')
    assert "explicit Runge" not in str(ours.value)


@pytest.mark.parametrize("entry", ["odeint_symplectic_adjoint", "odeint_adjoint"])
def test_symplectic_as_method_says_it_is_an_adjoint_method(problem, entry):
    func, y0, t = problem
    with pytest.raises(ValueError, match=r"method='symplectic' is not an ODE solver.*adjoint_method='symplectic'"):
        getattr(adapter, entry)(func, y0, t, method="symplectic")


@pytest.mark.parametrize("times", [[0.0, 0.5, 0.3], [0.0, 0.5, 0.5], [1.0, 0.5, 0.7]])
def test_non_monotonic_t(problem, times):
    func, y0, _ = problem
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        odeint_symplectic_adjoint(func, y0, torch.tensor(times, dtype=torch.float64))


def test_t_must_be_floating_1d_tensor(problem):
    func, y0, _ = problem
    with pytest.raises(TypeError, match="floating point"):
        odeint_symplectic_adjoint(func, y0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D"):
        odeint_symplectic_adjoint(func, y0, torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="Tensor"):
        odeint_symplectic_adjoint(func, y0, [0.0, 1.0])


def test_func_returning_wrong_shape(problem):
    _, y0, t = problem
    with pytest.raises(ValueError, match=r"returned shape \(2, 2\).*state has shape \(2, 3\)"):
        odeint_symplectic_adjoint(lambda t, y: y[:, :2], y0, t, adjoint_params=())


def test_func_returning_wrong_dtype(problem):
    _, y0, t = problem
    with pytest.raises(ValueError, match="dtype torch.float32.*dtype torch.float64"):
        odeint_symplectic_adjoint(lambda t, y: y.float(), y0, t, adjoint_params=())


def test_plain_function_needs_adjoint_params(problem):
    _, y0, t = problem
    with pytest.raises(ValueError, match="adjoint_params"):
        odeint_symplectic_adjoint(lambda t, y: -y, y0, t)


def test_double_backward_is_refused(problem):
    func, y0, t = problem
    out = odeint_symplectic_adjoint(func, y0, t)
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), y0, create_graph=True)


def test_non_finite_state_raises_torchdiffeqs_error(problem):
    func, y0, t = problem
    bad = y0.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite|underflow"):
        odeint_symplectic_adjoint(func, bad, t)


def test_backward_twice_without_retain_graph_is_a_clear_error(problem):
    func, y0, t = problem
    loss = odeint_symplectic_adjoint(func, y0, t).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time|freed"):
        loss.backward()


def test_trajectory_is_freed_with_the_graph(problem):
    func, y0, t = problem
    seen = []
    func.callback_accept_step = lambda t0, y, dt: seen.append(weakref.ref(y))
    out = odeint_symplectic_adjoint(func, y0, t, method="dopri5")
    del func.callback_accept_step
    stored = [r for r in seen[1:]]  # states after y0 exist only inside the trajectory
    assert stored and all(r() is not None for r in stored)
    del out
    gc.collect()
    assert all(r() is None for r in stored), "the trajectory outlived the graph"


def test_trajectory_is_freed_after_backward(problem):
    func, y0, t = problem
    seen = []
    func.callback_accept_step = lambda t0, y, dt: seen.append(weakref.ref(y))
    out = odeint_symplectic_adjoint(func, y0, t, method="dopri5")
    del func.callback_accept_step
    out.sum().backward()
    gc.collect()
    assert all(r() is None for r in seen[1:]), "saved states must be released by backward (retain_graph=False)"
    assert out.grad_fn is not None
