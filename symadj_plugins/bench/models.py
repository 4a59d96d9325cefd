"""Vector fields used by the benchmark problems, and the counter that wraps them.

Every field is an ``nn.Module`` called as ``f(t, y)`` with ``y`` a single tensor (torchdyn takes no tuple
states), so that every gradient method sees exactly the same function.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-conditioned layer: ``Linear(x) * sigmoid(gate(t)) + bias(t)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(1, 1).to(x.dtype)
        return self.layer(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class CNFField(nn.Module):
    """FFJORD-style continuous normalizing flow on the state ``y = [z, Δlogp]`` of shape ``(batch, d + 1)``.

    ``dz/dt = g(t, z)`` (concatsquash MLP, softplus), ``dΔlogp/dt = -εᵀ (∂g/∂z) ε`` (Hutchinson's estimator
    with a *fixed* Rademacher noise ``ε``, so the ODE is deterministic and every method solves the same one).
    ``(∂g/∂z) ε`` is propagated alongside the forward pass of the MLP (forward mode by hand; FFJORD computes the
    same ``εᵀ (∂g/∂z) ε`` by a reverse-mode ``torch.autograd.grad`` inside ``f``). Either way, differentiating
    ``f`` differentiates through a derivative. Doing it by hand keeps autograd calls out of ``f``: non-reentrant
    ``torch.utils.checkpoint`` answers an ``autograd.grad`` inside the checkpointed region by recomputing the
    region, which would make the checkpointing baselines quadratic in the number of stages.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...], batch: int, weight_gain: float = 2.5,
                 time_gain: float = 10.0, seed: int = 0):
        super().__init__()
        dims = (dim, *hidden, dim)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        # An untrained flow is nearly linear and takes a handful of steps; a trained one is not. Larger
        # weights and a stronger time dependence stand in for training (about 15 dopri5 steps at rtol=1e-6).
        with torch.no_grad():
            for layer in self.layers:
                nn.init.normal_(layer.layer.weight, std=weight_gain / layer.layer.in_features ** 0.5)
                nn.init.normal_(layer.hyper_gate.weight, std=time_gain)
                nn.init.normal_(layer.hyper_bias.weight, std=time_gain * 0.1)
        self.dim = dim
        gen = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("noise", torch.randint(0, 2, (batch, dim), generator=gen).float() * 2 - 1)

    def net_and_jvp(self, t: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(t, z)`` and the Jacobian–vector product ``(∂g/∂z) v``, propagated layer by layer."""
        for i, cs in enumerate(self.layers):
            tt = t.reshape(1, 1).to(z.dtype)
            gate = torch.sigmoid(cs.hyper_gate(tt))
            h = cs.layer(z) * gate + cs.hyper_bias(tt)
            v = nn.functional.linear(v, cs.layer.weight) * gate
            if i < len(self.layers) - 1:
                v = torch.sigmoid(h) * v  # softplus' = sigmoid
                h = nn.functional.softplus(h)
            z = h
        return z, v

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = y[:, :self.dim]
        noise = self.noise.to(z.dtype)
        dz, jvp = self.net_and_jvp(t, z, noise)
        div = (jvp * noise).sum(1, keepdim=True)
        return torch.cat([dz, -div], dim=1)


def cnf_nll(y_final: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean negative log-likelihood of the data under the flow: ``-(log N(z(T); 0, I) - Δlogp(T))``."""
    z, delta_logp = y_final[:, :dim], y_final[:, dim]
    log_pz = -0.5 * (z ** 2).sum(1) - 0.5 * dim * math.log(2 * math.pi)
    return -(log_pz - delta_logp).mean()


class MLPField(nn.Module):
    """``f(t, y) = MLP([y, t])`` with tanh activations: a plain neural ODE whose graph per call is ``L`` layers."""

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 1, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.to(y.dtype).expand(*y.shape[:-1], 1)
        return self.net(torch.cat([y, tt], dim=-1))


class KdVField(nn.Module):
    """A discretised Korteweg–de Vries equation with a learned nonlinearity, on a periodic grid of ``m`` points::

        du/dt = -D₁ N_θ(u) - δ² D₃ u

    ``D₁``, ``D₃``: central differences for ∂x and ∂x³ (circular); ``N_θ``: a small convolutional network
    over a 3-point stencil, initialised near KdV's ``3u²``. The ``D₃`` term makes the system stiff-ish
    (its spectral radius grows like ``1/Δx³``), so tolerances, not stability, set the adaptive step size.
    """

    def __init__(self, m: int = 64, length: float = 2 * math.pi, delta: float = 0.15, width: int = 16):
        super().__init__()
        self.dx = length / m
        self.delta2 = delta ** 2
        self.conv1 = nn.Conv1d(1, width, 3, padding=1, padding_mode="circular")
        self.conv2 = nn.Conv1d(width, 1, 1)
        self.a = nn.Parameter(torch.tensor(3.0))

    @staticmethod
    def _shift(u: torch.Tensor, k: int) -> torch.Tensor:
        return torch.roll(u, shifts=k, dims=-1)

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        nonlin = self.a * u ** 2 + 0.1 * self.conv2(torch.tanh(self.conv1(u.unsqueeze(1)))).squeeze(1)
        d1 = (self._shift(nonlin, -1) - self._shift(nonlin, 1)) / (2 * self.dx)
        d3 = (self._shift(u, -2) - 2 * self._shift(u, -1) + 2 * self._shift(u, 1) - self._shift(u, 2)) / (
            2 * self.dx ** 3)
        return -d1 - self.delta2 * d3


class CountingField(nn.Module):
    """Wraps a field, counting its calls per phase (``"forward"``/``"backward"``) and the solver's steps.

    Accepted steps come from torchdiffeq's callbacks (``callback_accept_step`` for adaptive solvers,
    ``callback_step`` for fixed-grid ones, and their ``_adjoint`` variants for the continuous adjoint's
    backward solve). Only the callbacks the solver supports are installed, so torchdiffeq does not warn.
    """

    def __init__(self, field: nn.Module, adaptive: bool):
        super().__init__()
        self.field = field
        self.phase = "forward"
        self.nfe = {"forward": 0, "backward": 0}
        self.steps = {"forward": 0, "backward": 0}
        self.step_log: list | None = None  # when a list, accepted steps are appended as (t0, dt)
        step_name = "callback_accept_step" if adaptive else "callback_step"
        setattr(self, step_name, self._on_step)
        setattr(self, step_name + "_adjoint", self._on_adjoint_step)

    def _on_step(self, t0, y0, dt):
        self.steps[self.phase] += 1
        if self.step_log is not None:
            self.step_log.append((t0, dt))

    def _on_adjoint_step(self, t0, y0, dt):
        self.steps["backward"] += 1

    def reset(self) -> None:
        self.phase = "forward"
        self.nfe = {"forward": 0, "backward": 0}
        self.steps = {"forward": 0, "backward": 0}

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe[self.phase] += 1
        return self.field(t, y)

    def plain(self):
        """The same counted function without the step callbacks (for replays whose steps are known)."""
        return lambda t, y: self(t, y)
