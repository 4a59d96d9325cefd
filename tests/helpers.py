"""Small problems and reference gradients shared by the torchdiffeq tests, and a probe of the backward sweep's
dense output shared with the torchdyn tests."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from symadj_plugins.core import adjoint
from symadj_plugins.torchdiffeq import initial_step, supported_methods

# Methods of the installed torchdiffeq (heun2 appeared in 0.2.5, heun3 in 0.2.4, tsit5 after 0.2.5).
ADAPTIVE = [m for m in ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "tsit5") if m in supported_methods()]
FIXED = [m for m in ("euler", "midpoint", "heun2", "heun3", "rk4") if m in supported_methods()]


class TimeDependentField(torch.nn.Module):
    """``f(t, y) = tanh-MLP(y) · (1 + t) + 0.1 sin(3t)``: depends on time, so wrong stage times show."""

    def __init__(self, dim: int = 3, width: int = 16, depth: int = 1):
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(dim, width), torch.nn.Tanh()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        layers.append(torch.nn.Linear(width, dim))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, t, y):
        return self.net(y) * (1 + t) + 0.1 * torch.sin(3 * t)


class TupleField(torch.nn.Module):
    """A field on a tuple state ``(x, v)`` of different shapes."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, t, state):
        x, v = state
        return torch.tanh(self.lin(x)) * v.mean() + t, -self.scale * v * x.sum()


def reference_options(method, func, y0, t, rtol, atol, options):
    """Options that make ``torchdiffeq.odeint`` backprop the exact reference: same accepted steps, step
    sizes constant. Fixed grids need nothing; adaptive solvers get the first step as a constant."""
    options = dict(options or {})
    if method in ADAPTIVE and "first_step" not in options:
        options["first_step"] = initial_step(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    return options


def flat_grads(outputs, inputs):
    grads = torch.autograd.grad(outputs, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def rel_error(got, want) -> float:
    """Largest relative error over a list of tensors (norm-wise, guarded for zero references)."""
    errs = []
    for g, w in zip(got, want):
        scale = w.norm().item()
        errs.append((g - w).norm().item() / (scale if scale > 0 else 1.0))
    return max(errs)


def loss_of(solution):
    """A loss that weights every output time differently (so each output's cotangent differs)."""
    if isinstance(solution, tuple):
        return sum(loss_of(s) for s in solution)
    weights = torch.arange(1, solution.shape[0] + 1, dtype=solution.dtype, device=solution.device)
    return (solution.pow(2).sum(dim=tuple(range(1, solution.ndim))) * weights).sum() + solution.sin().sum()


def run_in_threads(target: Callable[[], None], count: int) -> None:
    """Runs ``target`` in ``count`` threads at once and waits for all of them (``target`` reports its own errors)."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class DenseOutputProbe:
    """Watches the backward sweep's dense output through ``host_class``: ``calls`` holds, per call of its
    ``dense_output``, ``(step, number of output times, number of vector–Jacobian products through its values)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, host_class: type):
        self._calls: list[list] = []  # [step, number of times, VJPs, the values (kept to recognise them)]
        dense_output, vjp = host_class.dense_output, adjoint.vjp

        def watched_dense_output(host, trajectory, n, y0, y1, k, t_out):
            values = dense_output(host, trajectory, n, y0, y1, k, t_out)
            self._calls.append([n, len(t_out), 0, values])
            return values

        def watched_vjp(outputs, *args, **kwargs):
            for call in self._calls:
                call[2] += sum(output is call[3] for output in outputs)
            return vjp(outputs, *args, **kwargs)

        monkeypatch.setattr(host_class, "dense_output", watched_dense_output)
        monkeypatch.setattr(adjoint, "vjp", watched_vjp)

    @property
    def calls(self) -> list[tuple[int, int, int]]:
        return [(n, times, vjps) for n, times, vjps, _ in self._calls]
