"""``sensitivity="symplectic_adjoint"`` where torchdyn users use it: Lightning training loops, continuous
normalizing flows (Hutchinson trace), ``Augmenter`` and ``DepthCat`` layers, data control; and what it holds
in memory between forward and backward (measured with saved-tensor hooks)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import pytorch_lightning as pl
import torch
from helpers import rel_error
from test_torchdyn import SOLVERS, Field, assert_exact, autograd_with_constant_steps, grads, loss_of
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.models import CNF, hutch_trace
from torchdyn.nn import Augmenter, DataControl, DepthCat

import symadj_plugins
from symadj_plugins.bench.saved import SavedTensorBytes

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("registered", "torchdyn_warnings_ignored")


# --------------------------------------------------------------------------------------------------------
# Training loops

class Learner(pl.LightningModule):
    """The torchdyn tutorials' pattern: a LightningModule around a NeuralODE."""

    def __init__(self, model: NeuralODE, t_span: torch.Tensor):
        super().__init__()
        self.model, self.t_span = model, t_span

    def loss(self, batch):
        x, y = batch
        _, sol = self.model(x, self.t_span)
        return (sol[-1] - y).pow(2).mean()

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def test_lightning_training_loop_reduces_the_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    data = torch.utils.data.TensorDataset(x, x @ rotation)
    model = NeuralODE(Field(width=16), sensitivity="symplectic_adjoint", solver="dopri5", atol=1e-4, rtol=1e-4)
    assert isinstance(model, pl.LightningModule)
    learner = Learner(model, torch.linspace(0, 1, 2))
    with torch.no_grad():
        before = learner.loss(data.tensors).item()
    trainer = pl.Trainer(max_steps=25, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers and the like
        trainer.fit(learner, torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    with torch.no_grad():
        after = learner.loss(data.tensors).item()
    assert trainer.global_step == 25
    assert after < 0.7 * before, (before, after)


# --------------------------------------------------------------------------------------------------------
# Continuous normalizing flows, augmentation, depth variables, data control

def cnf_model(sensitivity):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    noise = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    cnf = CNF(net, trace_estimator=hutch_trace, noise_dist=noise)
    return NeuralODE(cnf, sensitivity=sensitivity, solver="rk4"), net


def cnf_loss(model, x, seed):
    torch.manual_seed(seed)  # the Hutchinson noise NeuralODE samples before the solve
    _, sol = model(Augmenter(augment_idx=1, augment_dims=1)(x), torch.linspace(0, 1, 5, dtype=F64))
    z, delta_logp = sol[-1][:, 1:], sol[-1][:, 0]
    return (0.5 * z.pow(2).sum(1) - delta_logp).mean()


def test_cnf_with_hutchinson_trace_gradient_equals_autograd():
    x = torch.randn(6, 2, dtype=F64, requires_grad=True)
    results = []
    for sensitivity in ["symplectic_adjoint", "autograd"]:
        model, net = cnf_model(sensitivity)
        results.append(grads(cnf_loss(model, x, seed=1), [x, *net.parameters()]))
    assert rel_error(*results) <= 1e-12


def test_second_forward_before_backward_does_not_change_the_first_gradient():
    """NeuralODE samples fresh Hutchinson noise (and sets DataControl's input) before each solve; the replay
    uses what the forward pass used."""
    x = torch.randn(6, 2, dtype=F64, requires_grad=True)
    model, net = cnf_model("symplectic_adjoint")
    wrt = [x, *net.parameters()]
    first = cnf_loss(model, x, seed=1)
    cnf_loss(model, x, seed=2)
    delayed = grads(first, wrt)
    assert rel_error(delayed, grads(cnf_loss(model, x, seed=1), wrt)) <= 1e-14

    torch.manual_seed(0)
    controlled = nn.Sequential(DataControl(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    model = NeuralODE(controlled, sensitivity="symplectic_adjoint", solver="midpoint")
    t_span = torch.linspace(0, 1, 4, dtype=F64)
    first = model(x, t_span)[1].pow(2).sum()
    model(torch.randn(6, 2, dtype=F64), t_span)
    delayed = grads(first, [x, *controlled.parameters()])
    again = grads(model(x, t_span)[1].pow(2).sum(), [x, *controlled.parameters()])
    assert rel_error(delayed, again) <= 1e-14


def test_augmented_neural_ode_in_a_sequential():
    torch.manual_seed(0)
    data = torch.randn(5, 2, dtype=F64, requires_grad=True)
    field = Field(dim=4).double()
    head = nn.Linear(4, 1).double()
    results = []
    for sensitivity in ["symplectic_adjoint", "autograd"]:
        model = nn.Sequential(Augmenter(augment_idx=1, augment_dims=2),
                              NeuralODE(field, sensitivity=sensitivity, solver="midpoint", return_t_eval=False), head)
        out = model(data)
        results.append(grads(loss_of(out), [data, *field.parameters(), *head.parameters()]))
    assert rel_error(*results) <= 1e-12


@pytest.mark.parametrize(("solver", "dtype"), [("rk4", F64), ("tsit5", F64), ("dopri5", torch.float32)])
def test_depth_variable_set_by_defunc(solver, dtype, monkeypatch):
    """DEFunc sets ``t`` on DepthCat modules before each call: a time-dependent field made of module state."""
    torch.manual_seed(0)
    field = nn.Sequential(DepthCat(1), nn.Linear(3, 8), nn.Tanh(), DepthCat(1), nn.Linear(9, 2)).to(dtype)
    x = torch.randn(4, 2, dtype=dtype, requires_grad=True)
    t_span = torch.linspace(0, 1, 3, dtype=dtype)
    wrt = [x, *field.parameters()]
    _, sol = NeuralODE(field, sensitivity="symplectic_adjoint", solver=solver, atol=1e-5, rtol=1e-5)(x, t_span)
    ours = grads(loss_of(sol), wrt)
    autograd_with_constant_steps(monkeypatch)
    _, sol_ref = NeuralODE(field, sensitivity="autograd", solver=solver, atol=1e-5, rtol=1e-5)(x, t_span)
    assert torch.equal(sol, sol_ref)
    assert_exact(rel_error(ours, grads(loss_of(sol_ref), wrt)), dtype, solver)


# --------------------------------------------------------------------------------------------------------
# Memory held between forward and backward

class SizeIndependentField(nn.Module):
    """``MLP(x) - (1 + t)·x/2`` with the MLP's last layer at zero: the same trajectory (and adaptive steps)
    for every width and depth, while the network is evaluated, and differentiated, at every stage."""

    def __init__(self, dim=4, width=8, depth=1):
        super().__init__()
        self.net = Field(dim, width, depth).net
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t, x, args=None):
        return self.net(x) - 0.5 * (1 + t) * x


def held_between_forward_and_backward(sensitivity, solver, width, depth, dtype=torch.float32, memory_budget="stages"):
    """Bytes autograd holds for one solve, measured while its graph is alive (ours at ``memory_budget``: "stages"
    keeps no graph, so nothing that grows with the network)."""
    torch.manual_seed(0)
    field = SizeIndependentField(width=width, depth=depth).to(dtype)
    x = torch.randn(8, 4, dtype=dtype, requires_grad=True)
    t_span = torch.linspace(0, 1, 3, dtype=dtype)
    model = NeuralODE(field, sensitivity=sensitivity, solver=solver, atol=1e-4, rtol=1e-4)
    meter = SavedTensorBytes(exclude=[*field.parameters(), x])
    with meter, symadj_plugins.options(memory_budget=memory_budget):
        _, sol = model(x, t_span)
    held = meter.held
    sol.sum().backward()  # the measured graph is a usable one
    return held


@pytest.mark.parametrize("solver", SOLVERS)
def test_memory_held_does_not_grow_with_the_network(solver):
    sizes = [(8, 1), (64, 1), (8, 3)]
    ours = [held_between_forward_and_backward("symplectic_adjoint", solver, *size) for size in sizes]
    theirs = [held_between_forward_and_backward("autograd", solver, *size) for size in sizes]
    assert ours[0] > 0
    assert ours[0] == ours[1] == ours[2], ours
    assert theirs[1] > theirs[0] and theirs[2] > theirs[0], theirs
    assert ours[0] < theirs[0]


def _peak_forward_backward(n_steps: int, save_at_ends: bool, memory_budget="trajectory") -> int:
    from symadj_plugins.bench.memory import PeakMemory

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    model = NeuralODE(f, solver="rk4", sensitivity="symplectic_adjoint", return_t_eval=False)
    x = torch.randn(64, 16)  # one state: 4 KiB
    t_span = torch.linspace(0, 1, n_steps + 1)
    save_at = t_span[[0, -1]] if save_at_ends else ()
    budget = contextlib.nullcontext() if memory_budget is None else symadj_plugins.options(memory_budget=memory_budget)
    with PeakMemory("cpu") as memory, budget:
        sol = model(x, t_span, save_at=save_at)
        loss = sol[-1].pow(2).sum()
        torch.autograd.grad(loss, list(f.parameters()))
    return memory.report.peak_bytes


@pytest.mark.parametrize("save_at_ends", [False, True], ids=["every step returned", "save_at=[t0, T]"])
def test_peak_memory_grows_by_about_one_state_per_step(registered, save_at_ends):
    # memory_budget="trajectory": one state per step ("stages" also keeps each step's stage inputs: the next test).
    # The trajectory holds one state per step. When torchdyn returns only some of the step ends (save_at), the
    # backward pass must not allocate a cotangent for every step end besides (that was a second state per step).
    state_bytes = 64 * 16 * 4
    slope = (_peak_forward_backward(300, save_at_ends) - _peak_forward_backward(100, save_at_ends)) / 200
    # Every step end returned: torchdyn's _fixed_odeint stacks its list of step states into the returned solution, a
    # second state per step, and the cotangent of that solution is a third. The trajectory keeps its own copy of the
    # states rather than views of the solution, so that the caller may write into the solution before backward() (as
    # with backprop); the list torchdyn stacked is that copy.
    limit = 1.5 if save_at_ends else 3.5
    assert state_bytes * 0.9 < slope < limit * state_bytes, slope / state_bytes


def test_stages_add_the_stage_inputs_of_each_step_and_the_default_stays_within_twice_trajectory(registered):
    # rk4: stages 2-4 are new states (stage 1's input is the step's state itself), so 3 more states per step than
    # memory_budget="trajectory", whatever the network.
    state_bytes = 64 * 16 * 4
    trajectory = (_peak_forward_backward(300, True) - _peak_forward_backward(100, True)) / 200
    stages = (_peak_forward_backward(300, True, "stages") - _peak_forward_backward(100, True, "stages")) / 200
    assert 2.5 * state_bytes < stages - trajectory < 3.5 * state_bytes, (stages - trajectory) / state_bytes
    # The default spends at most what "trajectory" holds again (and one graph of f), on stage inputs here.
    default = _peak_forward_backward(300, True, None)
    assert _peak_forward_backward(300, True) < default <= 2 * _peak_forward_backward(300, True)
