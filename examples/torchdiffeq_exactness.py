"""Prints, for every torchdiffeq method, the relative gradient error of the symplectic adjoint against
backprop through the same accepted steps (the exact gradient of the discrete solution), in float64 and
float32, next to the error of torchdiffeq's continuous adjoint against the same reference.

    python examples/torchdiffeq_exactness.py                       # every method; under a minute
    python examples/torchdiffeq_exactness.py --methods dopri5,rk4   # some of them
    python examples/torchdiffeq_exactness.py --quick                # dopri5 and rk4: a smoke run
"""

from __future__ import annotations

import argparse

import torch
import torchdiffeq

from symadj_plugins.torchdiffeq import initial_step, odeint_symplectic_adjoint, supported_methods


class Field(torch.nn.Module):
    """A time-dependent tanh MLP: ``f(t, y) = MLP(y)·(1 + t) + 0.1 sin(3t)``."""

    def __init__(self, dim: int = 4, width: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y) * (1 + t) + 0.1 * torch.sin(3 * t)


def errors(method: str, dtype: torch.dtype) -> tuple[float, float, int]:
    torch.manual_seed(0)
    func = Field().to(dtype)
    y0 = torch.randn(8, 4, dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 0.37, 1.0, 1.5], dtype=dtype)  # outputs between steps
    adaptive = method in ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "tsit5")
    kwargs = dict(rtol=1e-5, atol=1e-6, method=method)
    options = {} if adaptive else {"step_size": 0.05}
    if adaptive:
        options["first_step"] = initial_step(func, y0, t, options=options, **kwargs)
    steps = []
    func.callback_step = lambda t0, y, dt: steps.append(1)
    inputs = [y0, *func.parameters()]

    def grads(solve):
        out = solve(func, y0, t, options=options, **kwargs)
        return torch.autograd.grad((out ** 2).sum() + out.sin().sum(), inputs)

    reference = grads(torchdiffeq.odeint)
    del func.callback_step

    def rel(got):
        return max(((g - r).norm() / r.norm()).item() for g, r in zip(got, reference))

    return rel(grads(odeint_symplectic_adjoint)), rel(grads(torchdiffeq.odeint_adjoint)), len(steps)


QUICK = dict(methods="dopri5,rk4")  # --quick: a smoke run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(supported_methods()),
                        help="comma-separated torchdiffeq methods (default: every supported one)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run ({QUICK}); explicit flags win")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in supported_methods()]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(supported_methods())}")

    print("relative gradient error w.r.t. y0 and all parameters, against backprop through the same accepted steps")
    print(f"| {'method':<14} | {'steps':>5} | {'ours f64':>9} | {'ours f32':>9} | {'odeint_adjoint f64':>18} |")
    print(f"|{'-' * 16}|{'-' * 7}|{'-' * 11}|{'-' * 11}|{'-' * 20}|")
    for method in methods:
        ours64, adjoint64, steps = errors(method, torch.float64)
        ours32, _, _ = errors(method, torch.float32)
        print(f"| {method:<14} | {steps:>5} | {ours64:>9.1e} | {ours32:>9.1e} | {adjoint64:>18.1e} |")


if __name__ == "__main__":
    main()
