"""Train a 2-D continuous normalizing flow with torchdyn and ``sensitivity="symplectic_adjoint"``; plot its density.

Written like torchdyn's CNF tutorial (``CNF`` + ``Augmenter`` + ``NeuralODE``); the only change is the
``sensitivity`` string, after ``symadj_plugins.register()``. The data (two moons) are generated here.

    python examples/cnf_toy_density.py              # minutes on CPU; writes bench_out/examples/cnf_toy_density.png
    python examples/cnf_toy_density.py --niters 50  # a first look
    python examples/cnf_toy_density.py --quick      # 3 iterations, batch 64: a smoke run
"""

import argparse
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributions import MultivariateNormal  # noqa: E402

import symadj_plugins  # noqa: E402

symadj_plugins.register()  # adds sensitivity="symplectic_adjoint" to torchdyn
from torchdyn.core import NeuralODE  # noqa: E402
from torchdyn.models import CNF  # noqa: E402
from torchdyn.nn import Augmenter, DepthCat  # noqa: E402

QUICK = dict(niters=3, batch_size=64)  # --quick: a smoke run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--niters", type=int, default=1000, help="training iterations")
parser.add_argument("--batch-size", type=int, default=512, help="samples per iteration")
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument("--tol", type=float, default=1e-4, help="atol = rtol of dopri5")
parser.add_argument("--sensitivity", default="symplectic_adjoint",
                    help="any torchdyn sensitivity (autograd, adjoint, interpolated_adjoint, symplectic_adjoint)")
parser.add_argument("--out", metavar="PATH", default="bench_out/examples/cnf_toy_density.png",
                    help="the plot (PNG; '.png' is appended to a name without an extension)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true", help=f"a smoke run ({QUICK}); explicit flags win")


def two_moons(n: int, noise: float = 0.08) -> torch.Tensor:
    """Two interleaved half circles, standardised (no sklearn needed)."""
    n1 = n // 2
    a = torch.rand(n1) * math.pi
    b = torch.rand(n - n1) * math.pi
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(b), 0.5 - torch.sin(b)], 1)
    x = torch.cat([upper, lower]) + noise * torch.randn(n, 2)
    return (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])


def make_model(hidden: int, sensitivity: str, tol: float) -> nn.Module:
    # A time-dependent vector field: DepthCat appends t (torchdyn sets it before each call).
    net = nn.Sequential(DepthCat(1), nn.Linear(3, hidden), nn.Softplus(),
                        DepthCat(1), nn.Linear(hidden + 1, hidden), nn.Softplus(),
                        nn.Linear(hidden, 2))
    cnf = CNF(net)  # exact trace (two autograd calls in 2-D)
    ode = NeuralODE(cnf, solver="dopri5", sensitivity=sensitivity, atol=tol, rtol=tol)
    return nn.Sequential(Augmenter(augment_idx=1, augment_dims=1), ode)


def log_prob(model: nn.Module, x: torch.Tensor, prior, t_span: torch.Tensor) -> torch.Tensor:
    """``log p(x) = log N(z(1)) - Δlogp(1)``, the flow integrated from data to the prior."""
    _, sol = model[1](model[0](x), t_span)
    z_end = sol[-1]
    return prior.log_prob(z_end[:, 1:]) - z_end[:, 0]


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    # matplotlib appends ".png" to a name without an extension: report the file actually written.
    out = args.out if os.path.splitext(args.out)[1] else args.out + ".png"
    torch.manual_seed(args.seed)
    model = make_model(args.hidden, args.sensitivity, args.tol)
    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    t_span = torch.linspace(0, 1, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-5)
    start = time.time()
    for itr in range(1, args.niters + 1):
        x = two_moons(args.batch_size)
        loss = -log_prob(model, x, prior, t_span).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if itr % 25 == 0 or itr == 1:
            nfe = model[1].vf.nfe
            print(f"iter {itr:4d} | NLL {loss.item():.3f} | {time.time() - start:5.0f} s | NFE so far {nfe:.0f}")

    # Density on a grid (no gradients needed).
    n = 120
    xs = torch.linspace(-2.6, 2.6, n)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        density = torch.cat([log_prob(model, chunk, prior, t_span) for chunk in grid.split(2048)]).exp()
    data = two_moons(2000)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    axes[0].scatter(data[:, 0], data[:, 1], s=2, alpha=0.5)
    axes[0].set(title="data (two moons)", xlim=(-2.6, 2.6), ylim=(-2.6, 2.6), aspect="equal")
    axes[1].imshow(density.reshape(n, n).numpy(), origin="lower", extent=(-2.6, 2.6, -2.6, 2.6), cmap="magma")
    axes[1].set(title=f"learned density (sensitivity='{args.sensitivity}')", aspect="equal")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"final NLL {loss.item():.3f}; wrote {out}")


if __name__ == "__main__":
    main()
