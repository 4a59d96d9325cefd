"""Exactness and memory of torchdyn's gradient methods, ``sensitivity="symplectic_adjoint"`` included.

For each torchdyn solver: the relative gradient error (w.r.t. the input and all parameters) of
``sensitivity="symplectic_adjoint"`` against backpropagation through the same accepted steps with the step
sizes held constant (torchdyn's ``'autograd'`` with the one step size it differentiates, the first from
``init_step``, detached), against torchdyn's ``'autograd'``, ``'adjoint'`` and ``'interpolated_adjoint'``; and the
bytes autograd holds between forward and backward (saved tensors, parameters and input excluded, each storage
once) for two network widths (their last layer starting at zero, so that both take the same steps).
Batch 16, state dimension 2, ``t_span = linspace(0, 1, 3)``, adaptive solvers and torchdyn's adjoints at
``atol = rtol = 1e-8`` (float64) / ``1e-5`` (float32).

    python examples/torchdyn_exactness.py                    # about a minute on 2 CPU cores
    python examples/torchdyn_exactness.py --solvers dopri5   # one solver
    python examples/torchdyn_exactness.py --quick            # euler and dopri5: a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import warnings

import torch
from torch import nn
from torchdyn.core import NeuralODE

import symadj_plugins
from symadj_plugins.bench.saved import SavedTensorBytes

SOLVERS = ["euler", "midpoint", "rk4", "dopri5", "tsit5"]
METHODS = ["symplectic_adjoint", "adjoint", "interpolated_adjoint", "autograd"]
torchdyn_odeint = importlib.import_module("torchdyn.numerics.odeint")


class Field(nn.Module):
    """``dx/dt = MLP(x)·(1 + t) + 0.1 sin(3t)`` (time-dependent)."""

    def __init__(self, dim: int, width: int, zero_last: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, dim))
        if zero_last:  # then every width gives the same trajectory (same accepted steps)
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, t, x, args=None):
        return self.net(x) * (1 + t) + 0.1 * torch.sin(3 * t)


def loss_of(sol):
    weights = torch.arange(1, sol.shape[0] + 1, dtype=sol.dtype)
    return (sol.pow(2).sum(dim=(1, 2)) * weights).sum() + sol.sin().sum()


def run(method, solver, dtype, width, *, constant_steps=False, zero_last=False, seed=0):
    """``(gradients, bytes held between forward and backward)`` of one solve."""
    torch.manual_seed(seed)
    field = Field(2, width, zero_last).to(dtype)
    x = torch.randn(16, 2, dtype=dtype, requires_grad=True)
    t_span = torch.linspace(0, 1, 3, dtype=dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    model = NeuralODE(field, sensitivity=method, solver=solver, atol=tol, rtol=tol, atol_adjoint=tol,
                      rtol_adjoint=tol)
    meter = SavedTensorBytes([x, *field.parameters()])
    init_step = torchdyn_odeint.init_step
    if constant_steps:
        torchdyn_odeint.init_step = lambda *a, **k: init_step(*a, **k).detach()
    try:
        with meter:
            _, sol = model(x, t_span)
    finally:
        torchdyn_odeint.init_step = init_step
    held = meter.held
    wrt = [x, *field.parameters()]
    grads = torch.autograd.grad(loss_of(sol), wrt, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], held


def relative_error(got, want):
    return max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))


QUICK = dict(solvers="euler,dopri5")  # --quick: a smoke run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs=2, default=[64, 256], help="two MLP widths for the memory columns")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated torchdyn solvers")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run ({QUICK}); explicit flags win")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    solvers = [name.strip() for name in args.solvers.split(",") if name.strip()]
    unknown = [name for name in solvers if name not in SOLVERS]
    if unknown:
        parser.error(f"unknown solver(s) {', '.join(unknown)}; choose from {', '.join(SOLVERS)}")
    warnings.filterwarnings("ignore", category=UserWarning)
    symadj_plugins.register()
    small, large = args.widths

    print("Relative gradient error of sensitivity='symplectic_adjoint', ||g - g_other|| / ||g_other||, against:")
    print("  same steps: backprop through the same accepted steps, step sizes constant (the exact reference)")
    print("  autograd:   torchdyn's 'autograd' as is (adaptive solvers: it also differentiates init_step's dt)")
    print("  adjoint / interp_adj: torchdyn's continuous adjoints (float64, adjoint tolerances = solver's)")
    header = ["same steps f64", "same steps f32", "autograd f64", "adjoint f64", "interp_adj f64"]
    print(f"{'solver':9} " + " ".join(f"{h:>15}" for h in header))
    for solver in solvers:
        row = []
        for dtype in (torch.float64, torch.float32):
            reference, _ = run("autograd", solver, dtype, small, constant_steps=True)
            row.append(relative_error(run("symplectic_adjoint", solver, dtype, small)[0], reference))
        ours, _ = run("symplectic_adjoint", solver, torch.float64, small)
        for method in ("autograd", "adjoint", "interpolated_adjoint"):
            try:
                row.append(relative_error(ours, run(method, solver, torch.float64, small)[0]))
            except Exception as exc:  # torchdyn's own failures are part of the picture
                row.append(type(exc).__name__)
        print(f"{solver:9} " + " ".join(f"{v:>15.1e}" if isinstance(v, float) else f"{v:>15}" for v in row))

    print(f"\nBytes held between forward and backward (float32, batch 16, 2-layer MLP of width {small} / {large}, "
          "last layer zero so that both widths take the same steps)")
    print(f"{'solver':9} " + " ".join(f"{m:>27}" for m in METHODS))
    for solver in solvers:
        cells = []
        for method in METHODS:
            try:
                held = [run(method, solver, torch.float32, width, zero_last=True)[1] for width in (small, large)]
                cells.append(f"{held[0]:>12,} / {held[1]:>12,}")
            except Exception as exc:
                cells.append(f"{type(exc).__name__:>27}")
        print(f"{solver:9} " + " ".join(f"{c:>27}" for c in cells))


if __name__ == "__main__":
    main()
