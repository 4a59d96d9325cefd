"""register()/unregister(): torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic") in user code, and
torchdiffeq restored exactly afterwards."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from helpers import TimeDependentField, flat_grads, loss_of
from torchdiffeq._impl.odeint import SOLVERS

import symadj_plugins
from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

ORIGINAL = torchdiffeq.odeint_adjoint


@pytest.fixture(autouse=True)
def clean_registry():
    symadj_plugins.unregister()
    yield
    symadj_plugins.unregister()


def problem():
    torch.manual_seed(0)
    func = TimeDependentField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    return func, y0, torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)


def test_register_routes_symplectic_and_unregister_restores_exactly():
    solvers_before = dict(SOLVERS)
    symadj_plugins.register()
    symadj_plugins.register()  # idempotent
    assert symadj_plugins.is_registered("torchdiffeq")
    func, y0, t = problem()
    out = torchdiffeq.odeint_adjoint(func, y0, t, adjoint_method="symplectic",
                                     adjoint_rtol=1e-3, adjoint_options={"norm": "seminorm"})
    ref = odeint_symplectic_adjoint(func, y0, t)
    assert torch.equal(out, ref)
    inputs = [y0, *func.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(flat_grads(loss_of(out), inputs), flat_grads(loss_of(ref), inputs)))

    symadj_plugins.unregister()
    symadj_plugins.unregister()  # idempotent
    assert torchdiffeq.odeint_adjoint is ORIGINAL
    assert dict(SOLVERS) == solvers_before
    assert not symadj_plugins.is_registered("torchdiffeq")


def test_other_adjoint_methods_keep_torchdiffeq_meaning():
    symadj_plugins.register()
    func, y0, t = problem()
    ours_wrapper = torchdiffeq.odeint_adjoint(func, y0, t, adjoint_method="rk4", adjoint_options={"step_size": 0.05})
    theirs = ORIGINAL(func, y0, t, adjoint_method="rk4", adjoint_options={"step_size": 0.05})
    assert torch.equal(ours_wrapper, theirs)
    inputs = [y0, *func.parameters()]
    for a, b in zip(flat_grads(ours_wrapper.sum(), inputs), flat_grads(theirs.sum(), inputs)):
        assert torch.equal(a, b)


def test_name_imported_before_register_gives_a_clear_error():
    stale = torchdiffeq.odeint_adjoint  # like `from torchdiffeq import odeint_adjoint` at the top of a script
    symadj_plugins.register()
    func, y0, t = problem()
    out = stale(func, y0, t, adjoint_method="symplectic")
    with pytest.raises(RuntimeError, match=r"imported .* before symadj_plugins.register\(\)"):
        out.sum().backward()


def test_without_register_symplectic_is_unknown_to_torchdiffeq():
    func, y0, t = problem()
    out = torchdiffeq.odeint_adjoint(func, y0, t, adjoint_method="symplectic")
    with pytest.raises(ValueError, match="Invalid method"):
        out.sum().backward()
