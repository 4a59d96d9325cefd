"""What the installed torchdiffeq offers, checked against what we claim, so each cell of the version matrix
(``python -m nox -s matrix``, see noxfile.py) tests the API that cell really has.

torchdiffeq 0.2.3 has no ``heun2``/``heun3``; master adds ``tsit5`` and implicit fixed-grid solvers (``python -m
nox -s dev`` with ``TORCHDIFFEQ_SRC`` set runs it). Every explicit Runge–Kutta method present must have exact
gradients and torchdiffeq's forward bit for bit; every other method must be refused with a message (never a
silently wrong gradient).
"""

import pytest
import torch
import torch_symplectic_adjoint as tsa
import torchdiffeq
from helpers import ADAPTIVE, FIXED
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from symadj_plugins import torchdiffeq as adapter

F64 = torch.float64
SUPPORTED = adapter.supported_methods()


def test_supported_versions():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 1), "pyproject.toml says torch>=2.1"
    assert tuple(int(x) for x in torchdiffeq.__version__.split(".")[:3]) >= (0, 2, 3)


def test_every_explicit_rk_method_of_this_torchdiffeq_is_supported():
    explicit = {name for name, cls in SOLVERS.items()
                if isinstance(cls, type) and issubclass(cls, RKAdaptiveStepsizeODESolver)}
    explicit |= {name for name in ("euler", "midpoint", "rk4", "heun2", "heun3") if name in SOLVERS}
    assert explicit <= set(SUPPORTED), sorted(explicit - set(SUPPORTED))
    if "tsit5" in SOLVERS:  # torchdiffeq master
        assert "tsit5" in SUPPORTED


def test_method_parametrised_tests_cover_every_supported_method():
    # tests/test_torchdiffeq.py (forward bit for bit, exact gradients, tuples, jump_t, stored stages) is
    # parametrised over helpers.ADAPTIVE + FIXED: a method of this torchdiffeq missing there goes untested.
    assert sorted(ADAPTIVE + FIXED) == sorted(SUPPORTED)
    assert set(ADAPTIVE) == {m for m in SUPPORTED if issubclass(SOLVERS[m], RKAdaptiveStepsizeODESolver)}


class _Func(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(2, 2).double()

    def forward(self, t, y):
        return torch.tanh(self.lin(y))


@pytest.mark.parametrize("method", SUPPORTED)
def test_exact_gradient_for_each_supported_method(method):
    func = _Func()
    y0 = torch.tensor([[0.3, -0.7]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    cls = SOLVERS[method]
    options = {"first_step": 0.1} if issubclass(cls, RKAdaptiveStepsizeODESolver) else {"step_size": 0.25}
    grads, ys = [], []
    for fn in (torchdiffeq.odeint, adapter.odeint_symplectic_adjoint):
        y = fn(func, y0, t, rtol=1e-6, atol=1e-8, method=method, options=options)
        ys.append(y)
        grads.append(torch.autograd.grad(y.sum(), (y0, *func.parameters())))
    assert torch.equal(ys[0], ys[1]), f"{method}: forward must be torchdiffeq's bit for bit"
    for g, ref in zip(*reversed(grads)):
        assert torch.allclose(g, ref, rtol=1e-10, atol=1e-12), method


@pytest.mark.parametrize("method", sorted(set(SOLVERS) - set(SUPPORTED)))
def test_other_methods_are_refused_with_a_message(method):
    with pytest.raises(ValueError, match="supported"):
        adapter.odeint_symplectic_adjoint(_Func(), torch.zeros(1, 2, dtype=F64), torch.linspace(0, 1, 2, dtype=F64),
                                          method=method)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", tsa.METHODS)
def test_compat_methods_run_on_this_torchdiffeq(method):
    y0 = torch.tensor([0.3, -0.7], dtype=F64)
    y = tsa.odeint(lambda t, y: -y, y0, torch.linspace(0, 1, 9, dtype=F64), rtol=1e-3, atol=1e-4, method=method)
    assert torch.allclose(y[-1], y0 * torch.exp(torch.tensor(-1.0, dtype=F64)), rtol=0.1)
