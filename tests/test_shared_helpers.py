"""The helpers written once and used by both adapters, compat, tests and examples: time checks, parameter
discovery, and the saved-tensor meter."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import TimeDependentField, flat_grads, loss_of

from symadj_plugins.bench.saved import SavedTensorBytes
from symadj_plugins.inputs import check_times, parameters_requiring_grad
from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint


@pytest.mark.parametrize("name,min_points", [("t", 1), ("t_span", 2)])
def test_check_times_names_the_argument_and_the_problem(name, min_points):
    check_times(torch.tensor([0.0, 1.0]), name, min_points)
    check_times(torch.tensor([1.0, 0.5, 0.0]), name, min_points)
    with pytest.raises(TypeError, match=f"^{name} must be a 1-D floating point torch.Tensor"):
        check_times([0.0, 1.0], name, min_points)
    with pytest.raises(TypeError, match=f"^{name} must be a floating point tensor, got dtype torch.int64"):
        check_times(torch.tensor([0, 1]), name, min_points)
    with pytest.raises(ValueError, match=rf"^{name} must be a 1-D tensor of at least .* got shape \(2, 2\)"):
        check_times(torch.zeros(2, 2), name, min_points)
    with pytest.raises(ValueError, match=f"^{name} must be strictly increasing or strictly decreasing"):
        check_times(torch.tensor([0.0, 1.0, 1.0]), name, min_points)


def test_check_times_minimum_number_of_points():
    check_times(torch.tensor([0.0]), "t", 1)
    with pytest.raises(ValueError, match="at least two times"):
        check_times(torch.tensor([0.0]), "t_span", 2)


def test_parameters_requiring_grad_order_dedup_and_types():
    module = torch.nn.Linear(2, 2)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    extra = torch.zeros(3, requires_grad=True)
    got = parameters_requiring_grad(module, [extra, module.weight, frozen], None)
    assert [id(p) for p in got] == [id(module.weight), id(module.bias), id(extra)]
    with pytest.raises(TypeError, match="adjoint_params must be tensors, got float"):
        parameters_requiring_grad([1.0])


def test_a_parameter_listed_twice_gets_its_gradient_once():
    torch.manual_seed(0)
    func = TimeDependentField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    weight = func.net[0].weight
    once = flat_grads(loss_of(odeint_symplectic_adjoint(func, y0, t, adjoint_params=[weight])), [weight])
    twice = flat_grads(loss_of(odeint_symplectic_adjoint(func, y0, t, adjoint_params=[weight, weight])), [weight])
    assert torch.equal(once[0], twice[0])


def test_saved_tensor_meter_counts_a_known_graph():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    meter = SavedTensorBytes(exclude=[x])
    with meter:
        y = (x * 2).sin()  # sin saves its input: 8000 bytes; x * 2 saves nothing that requires grad but x's
        z = y.exp()  # exp saves its output: 8000 bytes more
    assert meter.held == meter.total == meter.peak == 16000
    z.sum().backward()  # frees the graph's saved tensors
    gc.collect()
    assert meter.held == 0 and meter.live == 0 and meter.peak == 16000
