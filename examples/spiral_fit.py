"""Fit a neural ODE to a spiral, the way torchdiffeq's ``ode_demo.py`` users write it, with the symplectic adjoint.

The only changes from a torchdiffeq ``odeint_adjoint`` script: ``symadj_plugins.register()`` before importing
``odeint_adjoint``, and ``adjoint_method="symplectic"`` in the call. The gradient is then exactly backprop's
through the same solver steps (``--check-grad`` prints the difference), with the memory of the adjoint method.

    python examples/spiral_fit.py                  # ~1-2 min on CPU; writes bench_out/examples/spiral_fit.png
    python examples/spiral_fit.py --niters 100 --check-grad --out spiral.png
    python examples/spiral_fit.py --quick          # 10 iterations: a smoke run
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import symadj_plugins  # noqa: E402

symadj_plugins.register()  # before `from torchdiffeq import odeint_adjoint`, so the name is the registered one
from torchdiffeq import odeint, odeint_adjoint  # noqa: E402

QUICK = dict(niters=10, test_freq=5)  # --quick: a smoke run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--method", type=str, choices=["dopri5", "dopri8", "bosh3", "rk4", "midpoint"], default="dopri5")
parser.add_argument("--data-size", type=int, default=1000, help="points on the true trajectory")
parser.add_argument("--batch-time", type=int, default=10, help="time points per training sample")
parser.add_argument("--batch-size", type=int, default=20)
parser.add_argument("--niters", type=int, default=1000, help="training iterations")
parser.add_argument("--test-freq", type=int, default=50, help="evaluate the test loss every this many iterations")
parser.add_argument("--check-grad", action="store_true", help="compare the first batch's gradient with backprop")
parser.add_argument("--out", metavar="PATH", default="bench_out/examples/spiral_fit.png",
                    help="the plot (PNG; '.png' is appended to a name without an extension)")
parser.add_argument("--quick", action="store_true", help=f"a smoke run ({QUICK}); explicit flags win")
args = parser.parse_args()
if args.quick:
    parser.set_defaults(**QUICK)
    args = parser.parse_args()
# matplotlib appends ".png" to a name without an extension: report the file actually written.
args.out = args.out if os.path.splitext(args.out)[1] else args.out + ".png"

torch.manual_seed(0)
true_y0 = torch.tensor([[2.0, 0.0]])
t = torch.linspace(0.0, 25.0, args.data_size)
true_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


class Lambda(nn.Module):
    def forward(self, t, y):
        return torch.mm(y ** 3, true_A)


with torch.no_grad():
    true_y = odeint(Lambda(), true_y0, t, method="dopri5")


def get_batch():
    s = torch.randint(0, args.data_size - args.batch_time, (args.batch_size,))
    batch_y0 = true_y[s]  # (M, 1, 2)
    batch_t = t[:args.batch_time]  # (T,)
    batch_y = torch.stack([true_y[s + i] for i in range(args.batch_time)], dim=0)  # (T, M, 1, 2)
    return batch_y0, batch_t, batch_y


class ODEFunc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0, std=0.1)
                nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y ** 3)


def check_grad(func):
    """The symplectic adjoint's gradient vs backprop through torchdiffeq.odeint (same solver, same steps)."""
    batch_y0, batch_t, batch_y = get_batch()
    grads = []
    for solve in (lambda: odeint_adjoint(func, batch_y0, batch_t, method=args.method, adjoint_method="symplectic"),
                  lambda: odeint(func, batch_y0, batch_t, method=args.method)):
        loss = torch.mean(torch.abs(solve() - batch_y))
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(func.parameters()))]))
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    print(f"gradient vs backprop through the same steps: relative difference {rel:.1e} (float32 rounding)")


def visualize(func, losses, path):
    with torch.no_grad():
        pred_y = odeint(func, true_y0, t, method=args.method)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    axes[0].plot(t, true_y[:, 0, 0], "g-", t, true_y[:, 0, 1], "b-", lw=1)
    axes[0].plot(t, pred_y[:, 0, 0], "g--", t, pred_y[:, 0, 1], "b--", lw=1)
    axes[0].set(title="Trajectories (solid: data, dashed: model)", xlabel="t", ylabel="x, y")
    axes[1].plot(true_y[:, 0, 0], true_y[:, 0, 1], "g-", lw=1, label="data")
    axes[1].plot(pred_y[:, 0, 0], pred_y[:, 0, 1], "b--", lw=1, label="model")
    axes[1].set(title="Phase portrait", xlabel="x", ylabel="y", xlim=(-2, 2), ylim=(-2, 2))
    axes[1].legend(fontsize=8)
    y, x = torch.meshgrid(torch.linspace(-2, 2, 21), torch.linspace(-2, 2, 21), indexing="ij")
    with torch.no_grad():
        dydt = func(0, torch.stack([x, y], -1).reshape(-1, 2)).reshape(21, 21, 2)
    mag = dydt.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    axes[2].streamplot(x.numpy(), y.numpy(), (dydt / mag)[..., 0].numpy(), (dydt / mag)[..., 1].numpy(),
                       color="black", density=1.0)
    axes[2].set(title="Learned vector field", xlabel="x", ylabel="y", xlim=(-2, 2), ylim=(-2, 2))
    axes[3].semilogy(*zip(*losses), "k.-")
    axes[3].set(title="Test loss (full trajectory)", xlabel="iteration")
    fig.suptitle(f"torchdiffeq odeint_adjoint(..., adjoint_method='symplectic'), method={args.method}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    func = ODEFunc()
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    if args.check_grad:
        check_grad(func)
    losses = []
    start = time.time()
    for itr in range(1, args.niters + 1):
        optimizer.zero_grad()
        batch_y0, batch_t, batch_y = get_batch()
        pred_y = odeint_adjoint(func, batch_y0, batch_t, method=args.method, adjoint_method="symplectic")
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        optimizer.step()
        if itr % args.test_freq == 0 or itr == args.niters:
            with torch.no_grad():
                pred_y = odeint(func, true_y0, t, method=args.method)
                test_loss = torch.mean(torch.abs(pred_y - true_y)).item()
            losses.append((itr, test_loss))
            print(f"Iter {itr:4d} | Total Loss {test_loss:.6f} | {time.time() - start:.0f} s")
    visualize(func, losses, args.out)
    print(f"wrote {args.out}")
