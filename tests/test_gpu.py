"""The same promises on CUDA (skipped without a GPU): exact gradients, forward identical to torchdiffeq, and
backward memory that does not grow with the network beyond one graph."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from helpers import TimeDependentField, flat_grads, loss_of, reference_options, rel_error

from symadj_plugins.torchdiffeq import odeint_symplectic_adjoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["dopri5", "dopri8", "fehlberg2", "rk4", "midpoint"])
def test_gradient_on_cuda_equals_backprop(method, dtype):
    torch.manual_seed(0)
    func = TimeDependentField(dim=5, width=32).to("cuda", dtype)
    y0 = torch.randn(16, 5, device="cuda", dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], device="cuda", dtype=dtype)
    options = {} if method in ("dopri5", "dopri8", "fehlberg2") else {"step_size": 0.05}
    ref_opts = reference_options(method, func, y0, t, 1e-6, 1e-7, options)
    want = torchdiffeq.odeint(func, y0, t, rtol=1e-6, atol=1e-7, method=method, options=ref_opts)
    got = odeint_symplectic_adjoint(func, y0, t, rtol=1e-6, atol=1e-7, method=method, options=options)
    assert torch.equal(got, want)
    inputs = [y0, *func.parameters()]
    err = rel_error(flat_grads(loss_of(got), inputs), flat_grads(loss_of(want), inputs))
    assert err <= (1e-10 if dtype == torch.float64 else 1e-4)
    assert all(g.device.type == "cuda" for g in flat_grads(loss_of(got), inputs))


def _peak_backward_bytes(width):
    torch.manual_seed(0)
    func = TimeDependentField(dim=64, width=width, depth=3).cuda()
    y0 = torch.randn(256, 64, device="cuda", requires_grad=True)
    t = torch.tensor([0.0, 1.0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = odeint_symplectic_adjoint(func, y0, t, method="rk4", options={"step_size": 0.02})
    out.sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_cuda_peak_memory_is_about_one_graph_not_all_steps():
    small, large = _peak_backward_bytes(256), _peak_backward_bytes(1024)
    # 50 steps x 4 stages of a 3-layer MLP with backprop would hold 200 graphs; we hold one at a time, so
    # quadrupling the width grows the peak by far less than 200 graphs' worth of activations.
    act_bytes_per_graph = 256 * 1024 * 4 * 3 * 2
    assert large - small < 10 * act_bytes_per_graph
