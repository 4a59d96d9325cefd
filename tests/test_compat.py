"""The ``torch_symplectic_adjoint`` compat package: the paper's API, its method names, its numbers.

Reference values come from the Butcher tableaux of the original package (tksmatsubara/symplectic-adjoint-method,
``torch_symplectic_adjoint/_impl/integrators/*.py``), written out below and stepped by a plain Runge–Kutta loop.
"""

import warnings

import pytest
import torch
import torch_symplectic_adjoint as tsa
import torchdiffeq
from helpers import rel_error
from torch_symplectic_adjoint import _methods

from symadj_plugins import torchdiffeq as adapter

F64 = torch.float64

# (c, A rows, b) of the original package, method by method. dopri8's is textually identical to torchdiffeq's
# (checked against the original source) and is taken from torchdiffeq rather than copied here.
ORIGINAL_TABLEAUX = {
    "euler": ([0.0], [], [1.0]),
    "midpoint": ([0.0, 0.5], [[0.5]], [0.0, 1.0]),
    "rk4": ([0.0, 0.5, 0.5, 1.0], [[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    "rk38": ([0.0, 1 / 3, 2 / 3, 1.0], [[1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]], [1 / 8, 3 / 8, 3 / 8, 1 / 8]),
    "bosh3": ([0.0, 1 / 2, 3 / 4, 1.0], [[1 / 2], [0.0, 3 / 4], [2 / 9, 1 / 3, 4 / 9]], [2 / 9, 1 / 3, 4 / 9, 0.0]),
    "fehlberg2": ([0.0, 1 / 2, 1.0], [[1 / 2], [1 / 256, 255 / 256]], [1 / 512, 255 / 256, 1 / 512]),
    "adaptive_heun": ([0.0, 1.0], [[1.0]], [0.5, 0.5]),
    "dopri5": ([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
               [[1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
                [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
                [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
                [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]],
               [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0]),
}


def _dopri8():
    tab = torchdiffeq._impl.dopri8._DOPRI8_TABLEAU
    return [0.0, *tab.alpha.tolist()], [row.tolist() for row in tab.beta], tab.c_sol.tolist()


def _tableau(method):
    return _dopri8() if method == "dopri8" else ORIGINAL_TABLEAUX[method]


def _vector_field(t, y):
    return torch.stack([torch.sin(3 * t) * y[..., 1] - y[..., 0] ** 3, torch.cos(y[..., 0]) - 0.5 * y[..., 1]], -1)


def _reference_step(method, t0, h, y0):
    c, a_rows, b = _tableau(method)
    k = []
    for i in range(len(b)):
        yi = y0 + h * sum(a * kj for a, kj in zip(a_rows[i - 1], k)) if i else y0
        k.append(_vector_field(t0 + c[i] * h, yi))
    return y0 + h * sum(bi * ki for bi, ki in zip(b, k))


class MLP(torch.nn.Module):
    def __init__(self, dim=2, hidden=8, dtype=F64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))
        self.to(dtype)

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


def _adaptive_options(method, **extra):
    return {"first_step": 0.05, **extra} if method in _methods.ADAPTIVE_METHODS else extra


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# API and method names

def test_public_api_is_the_papers():
    assert tsa.METHODS == ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "rk38", "rk4", "midpoint",
                           "euler")
    import inspect
    for name in ("odeint", "odeint_adjoint", "odeint_symplectic_adjoint", "odeint_checkpoint", "odeint_onecheckpoint"):
        params = inspect.signature(getattr(tsa, name)).parameters
        assert list(params)[:3] == ["func", "y0", "t"]
        assert params["rtol"].default == 1e-7 and params["atol"].default == 1e-9
        assert params["method"].default is None and params["options"].default is None
        assert all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[3:])
        if name != "odeint":
            assert params["adjoint_params"].default is None


@pytest.mark.parametrize("method", tsa.METHODS)
def test_one_step_reproduces_the_original_tableau(method):
    """For each name, one step of the shim equals one step of the original package's Runge–Kutta method."""
    y0 = torch.tensor([[0.7, -0.4], [1.3, 0.2]], dtype=F64)
    h = 0.3
    t = torch.tensor([0.1, 0.1 + h], dtype=F64)
    options = _adaptive_options(method, first_step=h)
    y = _quiet(tsa.odeint, _vector_field, y0, t, rtol=1e3, atol=1e3, method=method, options=options)
    expected = _reference_step(method, t[0], t[1] - t[0], y0)
    assert torch.allclose(y[1], expected, rtol=1e-13, atol=1e-14), (y[1] - expected).abs().max()


@pytest.mark.parametrize("method", _methods.FIXED_METHODS)
def test_fixed_step_methods_take_one_step_per_interval_of_t(method):
    y0 = torch.tensor([0.7, -0.4], dtype=F64)
    t = torch.tensor([0.0, 0.2, 0.25, 0.6, 1.0], dtype=F64)
    y = tsa.odeint(_vector_field, y0, t, method=method)
    expected = [y0]
    for t0, t1 in zip(t[:-1], t[1:]):
        expected.append(_reference_step(method, t0, t1 - t0, expected[-1]))
    assert torch.allclose(y, torch.stack(expected), rtol=1e-13, atol=1e-14)


def test_rk4_is_classical_and_rk38_is_torchdiffeqs_rk4():
    y0 = torch.tensor([0.7, -0.4], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    classical, three_eighths = tsa.odeint(_vector_field, y0, t, method="rk4"), tsa.odeint(_vector_field, y0, t,
                                                                                          method="rk38")
    assert (classical - three_eighths).abs().max() > 1e-6  # different methods, visibly
    assert torch.equal(three_eighths, torchdiffeq.odeint(_vector_field, y0, t, method="rk4"))
    native = adapter.odeint_symplectic_adjoint(_vector_field, y0, t, method="rk4", adjoint_params=())
    assert torch.equal(tsa.odeint_symplectic_adjoint(_vector_field, y0, t, method="rk38"), native)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_steps_land_on_every_output_time_like_the_original(method):
    ends = []

    class Recording(MLP):
        def callback_accept_step(self, t0, y0, dt):
            ends.append(float(t0 + dt))

    func = Recording()
    t = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.2], dtype=F64)
    with torch.no_grad():
        tsa.odeint(func, torch.ones(3, 2, dtype=F64), t, rtol=1e-3, atol=1e-4, method=method)
    assert all(any(abs(e - float(tk)) < 1e-15 for e in ends) for tk in t[1:])
    ends.clear()
    with torch.no_grad():  # torchdiffeq itself steps past them and interpolates
        torchdiffeq.odeint(func, torch.ones(3, 2, dtype=F64), t, rtol=1e-3, atol=1e-4, method=method)
    assert not all(any(abs(e - float(tk)) < 1e-15 for e in ends) for tk in t[1:])


# --------------------------------------------------------------------------------------------------------
# Gradients

def _grads(fn, func, y0, t, **kwargs):
    y = _quiet(fn, func, y0, t, **kwargs)
    loss = sum((yi * torch.linspace(-1, 1, yi.numel(), dtype=yi.dtype).view_as(yi)).sum() for yi in
               (y if isinstance(y, tuple) else (y,)))
    inputs = [*(y0 if isinstance(y0, tuple) else (y0,)), *func.parameters()]
    return y, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("method", tsa.METHODS)
def test_exact_gradients_equal_backprop_for_every_method(method):
    """odeint_symplectic_adjoint and odeint_checkpoint: backprop through the same steps (float64, 1e-10);
    odeint_onecheckpoint: odeint's gradient."""
    func = MLP()
    y0 = torch.tensor([[0.5, -1.0], [0.3, 0.8]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.45, 1.0], dtype=F64)
    kwargs = dict(rtol=1e-6, atol=1e-8, method=method, options=_adaptive_options(method))
    y_ref, g_ref = _grads(tsa.odeint, func, y0, t, **kwargs)
    for fn in (tsa.odeint_symplectic_adjoint, tsa.odeint_checkpoint, tsa.odeint_onecheckpoint):
        y, g = _grads(fn, func, y0, t, **kwargs)
        assert torch.equal(y, y_ref), fn.__name__
        assert rel_error(g, g_ref) < 1e-10, (fn.__name__, rel_error(g, g_ref))


@pytest.mark.parametrize("method", ["dopri5", "fehlberg2", "rk4"])
def test_exact_gradients_with_tuple_state_and_reversed_time(method):
    func_inner = MLP(dim=3)

    class TupleFunc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = func_inner

        def forward(self, t, y):
            a, b = y
            out = self.inner(t, torch.cat([a, b], -1))
            return out[..., :2], out[..., 2:]

    func = TupleFunc()
    y0 = (torch.tensor([[0.5, -1.0]], dtype=F64, requires_grad=True), torch.tensor([[0.2]], dtype=F64,
                                                                                    requires_grad=True))
    t = torch.tensor([1.0, 0.6, 0.1, -0.2], dtype=F64)
    kwargs = dict(rtol=1e-6, atol=1e-8, method=method, options=_adaptive_options(method))
    _, g_ref = _grads(tsa.odeint, func, y0, t, **kwargs)
    for fn in (tsa.odeint_symplectic_adjoint, tsa.odeint_checkpoint):
        _, g = _grads(fn, func, y0, t, **kwargs)
        assert rel_error(g, g_ref) < 1e-10, (fn.__name__, rel_error(g, g_ref))


def test_float32_gradients():
    func = MLP(dtype=torch.float32)
    y0 = torch.tensor([[0.5, -1.0]], requires_grad=True)
    t = torch.linspace(0, 1, 3)
    _, g_ref = _grads(tsa.odeint, func, y0, t, method="dopri5", rtol=1e-5, atol=1e-6, options={"first_step": 0.1})
    for fn in (tsa.odeint_symplectic_adjoint, tsa.odeint_checkpoint):
        _, g = _grads(fn, func, y0, t, method="dopri5", rtol=1e-5, atol=1e-6, options={"first_step": 0.1})
        assert rel_error(g, g_ref) < 1e-4


def test_odeint_adjoint_is_the_continuous_adjoint():
    func = MLP()
    y0 = torch.tensor([[0.5, -1.0]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    _, g_ref = _grads(tsa.odeint, func, y0, t, method="rk38")
    _, g = _grads(tsa.odeint_adjoint, func, y0, t, method="rk38")
    assert 1e-12 < rel_error(g, g_ref) < 1e-1  # approximate: a second solve, backwards
    with pytest.raises(ValueError, match="classical Runge-Kutta.*rk38"):
        tsa.odeint_adjoint(func, y0, t, method="rk4")
    with pytest.raises(ValueError, match="adjoint_method='rk4'"):
        tsa.odeint_adjoint(func, y0, t, method="rk38", adjoint_method="rk4")


def test_plain_function_without_adjoint_params_gets_no_parameter_gradient_like_the_original():
    y0 = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    y = tsa.odeint_symplectic_adjoint(_vector_field, y0, t, method="rk4")
    (g,) = torch.autograd.grad(y.sum(), y0)
    y_ref = tsa.odeint(_vector_field, y0, t, method="rk4")
    (g_ref,) = torch.autograd.grad(y_ref.sum(), y0)
    assert torch.allclose(g, g_ref, rtol=1e-12)


# --------------------------------------------------------------------------------------------------------
# The paper's README, unchanged

def test_readme_snippets_run_unchanged():
    func = MLP()
    y0 = torch.tensor([[0.5, -1.0]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)
    namespace = {"func": func, "y0": y0, "t": t}
    readme = """
from torch_symplectic_adjoint import odeint
a = odeint(func, y0, t)

from torch_symplectic_adjoint import odeint_adjoint
b = odeint_adjoint(func, y0, t)

from torch_symplectic_adjoint import odeint_onecheckpoint
c = odeint_onecheckpoint(func, y0, t)

from torch_symplectic_adjoint import odeint_checkpoint
d = odeint_checkpoint(func, y0, t)

from torch_symplectic_adjoint import odeint_symplectic_adjoint
e = odeint_symplectic_adjoint(func, y0, t)
"""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the README's usage is reproduced exactly: nothing to warn about
        exec(readme, namespace)
    for name in "abcde":
        assert torch.allclose(namespace[name], namespace["a"], rtol=1e-12, atol=1e-12), name
        namespace[name].sum().backward()


# --------------------------------------------------------------------------------------------------------
# Where behaviour differs: said clearly

def test_torchdiffeq_only_fixed_step_options_warn_once_per_call_site():
    y0 = torch.tensor([0.5, -1.0], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = tsa.odeint(_vector_field, y0, t, method="rk4", options={"step_size": 0.1})
        tsa.odeint(_vector_field, y0, t, method="rk4", options={"step_size": 0.1})  # another call site
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 2, messages
    assert "step_size" in messages[0] and "one step per interval of t" in messages[0]
    assert caught[0].filename == __file__
    # ... and the option is honoured: more steps than one per interval
    assert (y - tsa.odeint(_vector_field, y0, t, method="rk4")).abs().max() > 1e-8


@pytest.mark.parametrize("method, what", [("fehlberg2", "error estimate"), ("adaptive_heun", "first stage")])
def test_methods_whose_results_differ_from_the_original_warn(method, what):
    y0 = torch.tensor([0.5, -1.0], dtype=F64)
    with pytest.warns(UserWarning, match=what):
        tsa.odeint(_vector_field, y0, torch.linspace(0, 1, 3, dtype=F64), rtol=1e-3, atol=1e-4, method=method)


def test_methods_that_match_the_original_do_not_warn():
    y0 = torch.tensor([0.5, -1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("dopri8", "dopri5", "bosh3", "rk38", "rk4", "midpoint", "euler"):
            tsa.odeint(_vector_field, y0, torch.linspace(0, 1, 3, dtype=F64), method=method)


def test_unsupported_arguments_raise():
    y0 = torch.tensor([0.5, -1.0], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(ValueError, match="torchdiffeq method that torch_symplectic_adjoint did not have"):
        tsa.odeint(_vector_field, y0, t, method="explicit_adams")
    with pytest.raises(ValueError, match="Invalid method 'rk5'"):
        tsa.odeint_symplectic_adjoint(_vector_field, y0, t, method="rk5", adjoint_params=())
    with pytest.raises(NotImplementedError, match="event_fn"):
        tsa.odeint_checkpoint(_vector_field, y0, t, event_fn=lambda t, y: y[0], adjoint_params=())
