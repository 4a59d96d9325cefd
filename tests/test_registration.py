"""register()/unregister(): torchdiffeq.odeint_adjoint(..., adjoint_method="symplectic") in user code, and
torchdiffeq restored exactly afterwards."""

from __future__ import annotations

import threading

import pytest
import torch
import torchdiffeq
from helpers import TimeDependentField, flat_grads, loss_of, run_in_threads
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

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
                                     adjoint_rtol=1e-3, adjoint_options={"memory_budget": "min"})
    ref = odeint_symplectic_adjoint(func, y0, t, memory_budget="min")
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


# --------------------------------------------------------------------------------------------------------
# "symplectic" is an adjoint method, never a solver

def test_register_does_not_add_symplectic_to_torchdiffeqs_methods():
    symadj_plugins.register()
    assert "symplectic" not in SOLVERS
    func, y0, t = problem()
    with pytest.raises(ValueError, match=r'Invalid method "dopri".*"rk4"') as excinfo:
        torchdiffeq.odeint(func, y0, t, method="dopri")
    assert "symplectic" not in str(excinfo.value)


def test_symplectic_as_method_is_explained_by_every_entry_point():
    from torchdiffeq import odeint as odeint_bound_before_register

    stale_adjoint = torchdiffeq.odeint_adjoint
    symadj_plugins.register()
    func, y0, t = problem()
    explained = r"method='symplectic' is not an ODE solver.*adjoint_method='symplectic'"
    for entry in (torchdiffeq.odeint, odeint_bound_before_register, torchdiffeq.odeint_adjoint, stale_adjoint):
        with pytest.raises(ValueError, match=explained):
            entry(func, y0, t, method="symplectic")


def test_without_register_symplectic_as_method_is_torchdiffeqs_invalid_method():
    func, y0, t = problem()
    with pytest.raises(ValueError, match=r'Invalid method "symplectic"'):
        torchdiffeq.odeint(func, y0, t, method="symplectic")


# --------------------------------------------------------------------------------------------------------
# Atomic, idempotent, one room per host

def _patched_attributes():
    """Every (owner, attribute) register() replaces, by host, and the objects there now."""
    import sys

    import torchdyn.core.problems as problems

    odeint_module, adjoint_module = sys.modules["torchdiffeq._impl.odeint"], sys.modules["torchdiffeq._impl.adjoint"]
    return {
        "torchdiffeq": [(torchdiffeq, "odeint_adjoint"), (odeint_module, "_check_inputs"),
                        (adjoint_module, "_check_inputs"), (adjoint_module, "odeint")],
        "torchdyn": [(problems.ODEProblem, "_autograd_func"), (problems.MultipleShootingProblem, "_autograd_func")],
    }


def _current(attributes):
    return {key: [owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name) for owner, name in pairs]
            for key, pairs in attributes.items()}


def _assert_wrapped_once(now, originals):
    for host in originals:
        for wrapped, original in zip(now[host], originals[host]):
            assert wrapped is not original
            # A wrapper of a wrapper would have the first wrapper as __wrapped__.
            assert getattr(wrapped, "__wrapped__", original) is original, host


def test_concurrent_register_patches_once_and_unregister_restores_every_original():
    pytest.importorskip("torchdyn")
    attributes = _patched_attributes()
    originals = _current(attributes)
    for _ in range(20):
        barrier = threading.Barrier(8)
        errors = []

        def register_together(barrier=barrier, errors=errors):
            try:
                barrier.wait()
                symadj_plugins.register()
            except Exception as exc:  # reported below
                errors.append(exc)

        run_in_threads(register_together, 8)
        assert not errors
        assert symadj_plugins.is_registered("torchdiffeq") and symadj_plugins.is_registered("torchdyn")
        _assert_wrapped_once(_current(attributes), originals)
        symadj_plugins.unregister()
        now = _current(attributes)
        assert all(a is b for host in originals for a, b in zip(now[host], originals[host]))


def test_adapter_level_register_is_symadj_plugins_register():
    adapter = pytest.importorskip("symadj_plugins.torchdyn")
    attributes = _patched_attributes()
    originals = _current(attributes)
    adapter.register()
    adapter.register()
    symadj_plugins.register()
    assert symadj_plugins.is_registered("torchdyn") and symadj_plugins.is_registered("torchdiffeq")
    _assert_wrapped_once(_current(attributes), originals)
    symadj_plugins.unregister()
    now = _current(attributes)
    assert all(a is b for host in originals for a, b in zip(now[host], originals[host]))


def test_changed_torchdiffeq_internals_fail_registration_naming_the_version(monkeypatch):
    from symadj_plugins.torchdiffeq import _internals

    monkeypatch.delattr(RKAdaptiveStepsizeODESolver, "_interp_fit")
    _internals._check_result.cache_clear()  # checked once per process: forget the result for the installed one
    try:
        with pytest.raises(RuntimeError, match=r"written against torchdiffeq .* installed torchdiffeq \d+\.\d+\.\d+ "
                                               r"does not match .*RKAdaptiveStepsizeODESolver\._interp_fit is missing"):
            symadj_plugins.register()
    finally:
        _internals._check_result.cache_clear()
    assert not symadj_plugins.is_registered("torchdiffeq")
    assert torchdiffeq.odeint_adjoint is ORIGINAL
