"""Side by side on a small neural ODE: torchdiffeq's odeint (backprop), odeint_adjoint (continuous adjoint)
and the symplectic adjoint. Prints, for each: gradient error against backprop through the same accepted steps
(the exact gradient of the discrete solution), forward+backward time, and peak memory.

    python examples/demo.py                           # about a minute on one CPU thread
    python examples/demo.py [--repeats 3] [--width 256] [--threads 1] [--quick]

Timings use one thread by default (``--threads 1``): on a shared or busy machine, idle-waiting intra-op
threads make multi-threaded timings erratic. ``--quick`` (width 32, one repeat) is a smoke run in seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler (memory measurement) quiet

import torch  # noqa: E402
import torchdiffeq  # noqa: E402

from symadj_plugins.bench.memory import PeakMemory  # noqa: E402
from symadj_plugins.torchdiffeq import initial_step, odeint_symplectic_adjoint  # noqa: E402


class Field(torch.nn.Module):
    """A 3-layer tanh MLP vector field, ``dim -> width -> width -> dim``."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(),
                                       torch.nn.Linear(width, width), torch.nn.Tanh(),
                                       torch.nn.Linear(width, dim))

    def forward(self, t, y):
        return 4.0 * self.net(y)


QUICK = dict(width=32, repeats=1)  # --quick: a smoke run in seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported)")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the vector field")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: stable timings)")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({QUICK}); explicit flags win")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dtype = torch.float64
    func = Field(dim=16, width=args.width).to(dtype)
    y0 = torch.randn(128, 16, dtype=dtype, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 7, dtype=dtype)
    solve = dict(rtol=1e-7, atol=1e-9, method="dopri5")
    solve["options"] = {"first_step": initial_step(func, y0, t, **solve)}
    params = [y0, *func.parameters()]

    steps = []
    func.callback_accept_step = lambda t0, y, dt: steps.append(1)
    with torch.no_grad():
        torchdiffeq.odeint(func, y0, t, **solve)
    del func.callback_accept_step

    methods = {
        "torchdiffeq.odeint (backprop)": lambda: torchdiffeq.odeint(func, y0, t, **solve),
        "torchdiffeq.odeint_adjoint": lambda: torchdiffeq.odeint_adjoint(func, y0, t, **solve),
        "symplectic adjoint (ours)": lambda: odeint_symplectic_adjoint(func, y0, t, **solve),
    }

    def run(solver):
        out = solver()
        loss = out.pow(2).mean()
        return torch.autograd.grad(loss, params)

    reference = run(methods["torchdiffeq.odeint (backprop)"])
    rows = []
    for name, solver in methods.items():
        grads = run(solver)  # warm-up, and the gradient we compare
        err = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(solver)
            times.append(time.perf_counter() - start)
        with PeakMemory("cpu") as meter:
            run(solver)
        rows.append((name, err, statistics.median(times), meter.report.peak_bytes / 2**20))

    print(f"neural ODE: 3-layer MLP width {args.width}, state 128x16 float64, dopri5 rtol=1e-7 atol=1e-9, "
          f"{len(steps)} accepted steps; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"gradient error: relative to backprop through the same accepted steps; time: median of "
          f"{args.repeats} forward+backward; memory: peak live tensor bytes ({meter.report.method})\n")
    print(f"| {'method':<32} | {'gradient error':>14} | {'time (s)':>8} | {'peak memory (MiB)':>17} |")
    print(f"|{'-' * 34}|{'-' * 16}|{'-' * 10}|{'-' * 19}|")
    for name, err, seconds, mib in rows:
        print(f"| {name:<32} | {err:>14.2e} | {seconds:>8.3f} | {mib:>17.1f} |")


if __name__ == "__main__":
    main()
