"""Fit a neural ODE to a spiral, written the way torchdiffeq's own examples are (``odeint_adjoint`` for memory).

This file is deliberately *un*-migrated: it is what users have before switching. Switch it with::

    python -m symadj_plugins.migrate examples/train_torchdiffeq_style.py           # show the diff
    python -m symadj_plugins.migrate examples/train_torchdiffeq_style.py --write   # apply it

``--check-grad`` compares the gradient of one batch with backpropagation through ``torchdiffeq.odeint`` (same
solver, same steps) and prints the largest relative error. Before migration it is the continuous adjoint's
error (about the backward tolerance); after, the symplectic adjoint's (rounding, ~1e-15 in float64).
``tests/test_migrate_example.py`` migrates a copy of this file, runs it, and checks exactly that.

    python examples/train_torchdiffeq_style.py --niters 200 --viz-free   # a real (small) run
    python examples/train_torchdiffeq_style.py --quick --check-grad      # 20 iterations: a smoke run
"""

import argparse
import time

import torch
import torch.nn as nn
from torchdiffeq import odeint, odeint_adjoint

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--method", default="dopri5")
parser.add_argument("--data-size", type=int, default=200)
parser.add_argument("--batch-time", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--niters", type=int, default=200)
parser.add_argument("--hidden", type=int, default=32)
parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--check-grad", action="store_true", help="compare one batch's gradient with backprop")
parser.add_argument("--viz-free", action="store_true", help="accepted for compatibility; nothing is plotted")
parser.add_argument("--quick", action="store_true", help="a smoke run (20 iterations); explicit flags win")
QUICK = dict(niters=20)


class ODEFunc(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0, std=0.1)
                nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y**3)


def make_data(args, dtype):
    true_y0 = torch.tensor([[2.0, 0.0]], dtype=dtype)
    t = torch.linspace(0.0, 25.0, args.data_size, dtype=dtype)
    true_a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=dtype)
    with torch.no_grad():
        true_y = odeint(lambda t, y: torch.mm(y**3, true_a), true_y0, t, method="dopri5")
    return t, true_y


def get_batch(args, t, true_y, generator):
    s = torch.randperm(args.data_size - args.batch_time, generator=generator)[:args.batch_size]
    batch_y0 = true_y[s]  # (M, 1, D)
    batch_t = t[:args.batch_time]  # (T)
    batch_y = torch.stack([true_y[s + i] for i in range(args.batch_time)], dim=0)  # (T, M, 1, D)
    return batch_y0, batch_t, batch_y


def check_gradients(func, batch_y0, batch_t, batch_y, method):
    """Largest relative error of the gradient of one batch against backprop through ``torchdiffeq.odeint``.

    A fixed ``first_step`` makes both solves take the same steps without torchdiffeq's backprop also
    differentiating its initial step-size heuristic (which the adjoint methods, rightly, do not).
    """
    options = dict(first_step=1e-2) if method in ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun") else None
    params = list(func.parameters())

    pred = odeint_adjoint(func, batch_y0, batch_t, rtol=1e-7, atol=1e-9, method=method, options=options,
                          adjoint_rtol=1e-4, adjoint_atol=1e-6)
    grads = torch.autograd.grad((pred - batch_y).abs().mean(), params)

    pred_ref = odeint(func, batch_y0, batch_t, rtol=1e-7, atol=1e-9, method=method, options=options)
    grads_ref = torch.autograd.grad((pred_ref - batch_y).abs().mean(), params)
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, grads_ref))


def main(argv=None):
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    t, true_y = make_data(args, dtype)
    func = ODEFunc(args.hidden).to(dtype)
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)

    losses = []
    start = time.perf_counter()
    for itr in range(1, args.niters + 1):
        optimizer.zero_grad()
        batch_y0, batch_t, batch_y = get_batch(args, t, true_y, generator)
        pred_y = odeint_adjoint(func, batch_y0, batch_t, rtol=1e-7, atol=1e-9, method=args.method,
                                adjoint_rtol=1e-4, adjoint_atol=1e-6)
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if itr % 20 == 0 or itr == args.niters:
            print(f"iter {itr:4d} | loss {loss.item():.6f} | {time.perf_counter() - start:.1f}s")

    result = {"losses": losses}
    if args.check_grad:
        batch_y0, batch_t, batch_y = get_batch(args, t, true_y, generator)
        result["grad_error"] = check_gradients(func, batch_y0, batch_t, batch_y, args.method)
        print(f"max relative gradient error vs backprop: {result['grad_error']:.3e}")
    return result


if __name__ == "__main__":
    main()
